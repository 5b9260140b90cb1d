"""The process's peak resident memory over a stretch of work (Linux), importing nothing but the standard
library, so that attnkit's benchmarks and the kvpress worker (in kvpress's own venv) read it alike.

    with PeakRSS() as peak:
        run_the_prompt()
    peak.gib  # the most resident memory the process held inside the block (None where unreadable)

The kernel's high-water mark (VmHWM) is reset on entry by writing 5 to /proc/self/clear_refs, so the
figure is the block's own peak, not the model load's before it.
"""

from __future__ import annotations

from pathlib import Path


def _hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    def __init__(self):
        self.gib: float | None = None

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            self._reset = False
        return self

    def __exit__(self, *exc) -> None:
        kib = _hwm_kib()
        self.gib = round(kib / 2**20, 3) if kib is not None and self._reset else None
