"""Command-line start-up: `attnkit --help` against importing torch and transformers (what the CLI
would pay if it imported them up front), best of N wall-clock runs of fresh processes.

    python benchmarks/startup.py --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from _common import Record, add_record_option


def best_of(cmd: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return round(best, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    add_record_option(ap, "startup")
    args = ap.parse_args()
    args.model = "cli"
    rec = Record(args, "startup", {"repeats": args.repeats})
    cli = shutil.which("attnkit") or sys.exit("attnkit is not on PATH: pip install -e .")
    heavy = best_of([sys.executable, "-c", "import attnkit.core.loading, torch, transformers"], args.repeats)
    light = best_of([cli, "--help"], args.repeats)
    rec.emit({"what": "attnkit --help", "seconds": light, "ratio": round(light / heavy, 2)})
    rec.emit({"what": "import torch and transformers", "seconds": heavy, "ratio": 1.0})


if __name__ == "__main__":
    main()
