"""Fault test of `attnkit reproduce`: SIGKILL it at random moments, rerun, compare with one clean run.

    python scripts/kill_resume.py --model smollm2-135m-instruct --settings S.json --only heads,ablate,kv \
        --kills 5 --record results/kill_resume/smollm2-135m-instruct.json

One uninterrupted run goes to WORK/whole and counts the units of work it prints (trials, cells) after
its start-up; then the same command into WORK/killed is started `--kills` times, and each attempt is
SIGKILLed after a drawn number of newly finished units plus a random part of the next one. Counting units,
not seconds, keeps every kill mid-run on a fast, slow or loaded machine: the draws stay under the run's
units over kills + 1, so the kills together stay short of one run. The study is then run once more to the
end. The figures (every step's result and the report without its wall times) of the two folders must be
equal. The record holds each kill's moment, which attempts the kill caught, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STEPS = ("heads", "ablate", "kv", "buckets", "s2a")


def figures(folder: Path) -> tuple[dict, list[str]]:
    """What a rerun must reproduce: each step file's result, and report.md without its wall times."""
    steps = {p.name: json.loads(p.read_text())["result"] for p in sorted(folder.glob("*.json"))
             if p.name in {f"{s}.json" for s in STEPS}}
    report = [line for line in (folder / "report.md").read_text().splitlines() if "Wall time" not in line]
    return steps, report


def kill_and_resume(model: str, work: Path, settings: Path | None = None, only: str = "heads,ablate,kv",
                    kills: int = 5, seed: int = 7, extra: tuple[str, ...] = ()) -> dict:
    command = [sys.executable, "-m", "attnkit.cli", "reproduce", "--model", model, "--only", only, *extra] \
        + (["--settings", str(settings)] if settings else [])

    def start(out: Path) -> tuple[subprocess.Popen, threading.Event, list]:
        """Start the study. The event is set once it prints its first step line (the model is loaded);
        the list gathers the moment of every progress line after that (one per finished unit of work)."""
        proc = subprocess.Popen(command + ["--out", str(out)], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        begun, units = threading.Event(), []

        def watch() -> None:
            for line in proc.stdout:
                if line.startswith("step: ") or ": done before, kept" in line:
                    begun.set()
                elif begun.is_set() and not line.startswith("report: "):
                    units.append(time.monotonic())
            begun.set()  # ended without a step line: nothing to wait for

        threading.Thread(target=watch, daemon=True).start()
        return proc, begun, units

    t = time.monotonic()
    proc, begun, units = start(work / "whole")
    begun.wait()
    startup = time.monotonic() - t  # the model is loaded and the study has begun
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {proc.returncode})")
    run_s = time.monotonic() - t - startup
    time.sleep(0.2)  # the watcher reads the last lines
    total, unit_s = len(units), run_s / max(1, len(units))
    rng = random.Random(seed)
    attempts = []
    for _ in range(kills):
        # a kill after m more finished units and a random part of the next one; m at most the run's units
        # over kills + 1, so that the kills together stay short of one run on any machine, loaded or not
        m = rng.randint(1, max(1, total // (kills + 1) - 1))
        delay = rng.uniform(0.0, 1.0) * unit_s
        proc, begun, units = start(work / "killed")
        begun.wait()
        while len(units) < m and proc.poll() is None:
            time.sleep(0.01)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        attempts.append({"units_before_kill": m, "then_s": round(delay, 2),
                         "killed": proc.returncode == -signal.SIGKILL})
    unfinished = not all((work / "killed" / f"{s}.json").is_file() for s in only.split(","))
    final = start(work / "killed")[0].wait()
    same = final == 0 and figures(work / "killed") == figures(work / "whole")
    return {"command": " ".join(["attnkit"] + command[3:]), "startup_s": round(startup, 1),
            "run_s": round(run_s, 1), "units": total, "attempts": attempts, "unfinished_after_kills": unfinished,
            "final_exit": final, "figures_equal": same,
            "steps_compared": sorted(figures(work / "whole")[0])}


def environment() -> dict:
    from importlib.metadata import version
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "load_at_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), **{p: version(p) for p in ("attnkit", "torch", "transformers")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--settings", type=Path, help="study settings JSON (default: the full study)")
    ap.add_argument("--only", default="heads,ablate,kv")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", type=Path, help="folder for the two runs (default: a temporary one)")
    ap.add_argument("--record", type=Path, help="write the outcome here as JSON")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="attnkit-kill-"))
    outcome = kill_and_resume(args.model, work, args.settings, args.only, args.kills, args.seed)
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        settings = json.loads(args.settings.read_text()) if args.settings else None
        args.record.write_text(json.dumps({**environment(), "settings": settings, **outcome}, indent=1) + "\n")
    print(json.dumps(outcome, indent=1))
    if not outcome["figures_equal"] or not all(a["killed"] for a in outcome["attempts"]):
        raise SystemExit("the resumed study differs from the uninterrupted one, or a kill came too late")


if __name__ == "__main__":
    main()
