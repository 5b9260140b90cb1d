"""Resumable result files: each finished cell is appended to a JSONL file at once.

The first line of a file records what produced it (`{"attnkit_run": {...settings}}`: model identity,
data, prompt options, grid, decoding). A rerun resumes only under the same settings; with others it
stops with an error naming the difference, so rows of two runs never mix. The one change allowed is
more systems: a rerun whose settings equal the file's but for systems added (those already there
defined as before) runs only the new systems' cells, and the first line then names them all. A torn last line (a crash
mid-write) is cut away before appending, and a lock keeps a second process off the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from attnkit.core.say import say
from attnkit.errors import AttnkitError

HEADER = "attnkit_run"


def cell_key(row: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(row[f] for f in fields)


def digest(value) -> str:
    """A short stable hash of text or of JSON-able data."""
    raw = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class ResultFile:
    """A results file held for one run: locked, checked against `settings`, resumable."""

    def __init__(self, path: Path, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it will read back
        self.handle = None

    def __enter__(self) -> "ResultFile":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise AttnkitError(f"{self.path} is being written by another attnkit process; "
                               "wait for it or choose another --out") from None
        try:
            self.done = self._read()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _read(self) -> list[dict]:
        self.handle.seek(0)
        text = self.handle.read()
        if not text:
            self._write({HEADER: self.settings})
            return []
        if not text.endswith("\n"):  # a crash mid-write left half a row: cut it away
            text = text[:text.rfind("\n") + 1]
            self.handle.truncate(len(text.encode()))
        lines = text.splitlines()
        try:
            header = json.loads(lines[0])[HEADER] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            header = None
        if header is None:
            raise AttnkitError(f"{self.path} does not start with attnkit's settings line (an older or foreign "
                               "file?): move it away or choose another --out")
        if header != self.settings and _adds_systems(header, self.settings):
            self._rewrite_header(lines[1:])
        elif header != self.settings:
            raise AttnkitError(f"{self.path} holds results of other settings ({_difference(header, self.settings)}): "
                               "choose another --out, or delete the file to start over")
        rows = []
        for n, line in enumerate(lines[1:], 2):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise AttnkitError(f"{self.path}, line {n}: not a JSON row; the file is damaged") from None
        return rows

    def _rewrite_header(self, rows: list[str]) -> None:
        """The first line names the systems added; the rows stay. Written beside and moved over the
        file (a crash leaves the old file or the new one whole), the new file locked before the move."""
        import os

        tmp = self.path.with_name(self.path.name + ".tmp")
        handle = open(tmp, "w+")
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("\n".join([json.dumps({HEADER: self.settings}), *rows]) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = handle

    def _write(self, row: dict) -> None:
        self.handle.seek(0, 2)
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def append(self, row: dict) -> None:
        self._write(row)

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _adds_systems(old: dict, new: dict) -> bool:
    """Whether `new` is `old` with systems added: every other setting equal, every old system unchanged."""
    was, now = old.get("systems"), new.get("systems")
    if not isinstance(was, dict) or not isinstance(now, dict) or len(now) <= len(was):
        return False
    rest = lambda d: {k: v for k, v in d.items() if k != "systems"}  # noqa: E731
    return rest(old) == rest(new) and all(now.get(name) == fields for name, fields in was.items())


def _difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {_short(old.get(key))} in the file, {_short(new.get(key))} now"
    return "unknown difference"


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def progress_bar(quiet: bool = False):
    """A rich bar on a terminal; off a terminal (logs, CI, nohup) a plain line every 10% and at the end,
    since a rich bar there is drawn only once, when it is finished."""
    if not quiet and not sys.stderr.isatty():
        return _LineProgress()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=quiet, transient=False)


@dataclass
class _Line:
    description: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    printed_decile: int = -1


class _LineProgress:
    """What `progress_bar` gives off a terminal: the same add_task/advance calls, printed as lines."""

    def __init__(self):
        self.tasks: list[_Line] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: int, completed: int = 0) -> int:
        self.tasks.append(_Line(description, total, completed))
        return len(self.tasks) - 1

    def advance(self, task: int, n: int = 1) -> None:
        t = self.tasks[task]
        t.done += n
        decile = 10 * t.done // max(1, t.total)
        if decile > t.printed_decile:
            t.printed_decile = decile
            elapsed = time.monotonic() - t.started
            left = elapsed / t.done * (t.total - t.done) if t.done else 0
            say(f"{t.description}: {t.done}/{t.total} ({elapsed:.0f} s, about {left:.0f} s left)")


def run_grid(cells: list[dict], fields: tuple[str, ...], work, out: Path | None = None,
             description: str = "trials", quiet: bool = False, settings: dict | None = None) -> list[dict]:
    """Run `work(cell) -> row` for every cell not already in `out`; return all rows in cell order.
    `settings` (what produced the rows) heads the file; see `ResultFile`."""
    if out is None:
        return _run(cells, fields, work, {}, None, description, quiet)
    with ResultFile(out, settings or {}) as results:
        done = {}
        for row in results.done:
            try:
                done[cell_key(row, fields)] = row
            except KeyError:
                continue  # rows of another kind sharing the file (e.g. other conditions) keep their place
        return _run(cells, fields, work, done, results, description, quiet)


def _run(cells, fields, work, done: dict, results: ResultFile | None, description: str, quiet: bool) -> list[dict]:
    rows = []
    with progress_bar(quiet) as bar:
        task = bar.add_task(description, total=len(cells))
        for cell in cells:
            key = cell_key(cell, fields)
            if key not in done:
                row = {**cell, **work(cell)}
                done[key] = row
                if results is not None:
                    results.append(row)
            rows.append(done[key])
            bar.advance(task)
    return rows
