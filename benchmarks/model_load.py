"""What a pulled real model costs: its download, its folder on disk, loading it (wall time of a fresh
process, float32 on CPU) and the process's peak resident memory, one fresh process per model.

    python benchmarks/model_load.py                   # every installed registry model
    python benchmarks/model_load.py --models qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import Record, add_record_option

PROBE = """
import json, resource, sys, time
t = time.perf_counter()
import attnkit
model, tok = attnkit.load_model(sys.argv[1], device="cpu", dtype="float32")
loaded = time.perf_counter() - t
print(json.dumps({"load_s": round(loaded, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


def main():
    from attnkit.core.models import REGISTRY, is_pulled, model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="registry names, comma-separated (default: every installed one)")
    add_record_option(ap, "model_load")
    args = ap.parse_args()
    wanted = args.models.split(",") if args.models else [m.name for m in REGISTRY if is_pulled(m)]
    args.model = "real"
    rec = Record(args, "model_load")
    for entry in REGISTRY:
        if entry.name not in wanted:
            continue
        if not is_pulled(entry):
            print(f"{entry.name} is not installed: `attnkit models pull {entry.name}`", file=sys.stderr)
            continue
        folder = model_dir(entry)
        disk = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        out = subprocess.run([sys.executable, "-c", PROBE, entry.name], capture_output=True, text=True, check=True)
        facts = json.loads(out.stdout.strip().splitlines()[-1])
        rec.emit({"model": entry.name, "title": entry.title, "download_mb": entry.download_mb,
                  "disk_gib": round(disk / 2**30, 2), **facts})


if __name__ == "__main__":
    main()
