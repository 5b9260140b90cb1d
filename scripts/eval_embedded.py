"""Measure the embedded model for its model card: NIAH recall per length on its own haystack and
needles, and on the Paul Graham essays with the three retrieval-head detection needles.

    python scripts/eval_embedded.py [--model embedded|DIR] [--shared ../shared/data] [--out runs/embedded_eval]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnkit.core.loading import load_model
from attnkit.evals import niah as N

LENGTHS = [256, 512, 1024, 1536, 2048]
DEPTHS = [0, 25, 50, 75, 100]


def per_length(rows):
    out = {}
    for L in LENGTHS:
        r = [x["recall"] for x in rows if x["length"] == L and x["recall"] is not None]
        out[L] = round(sum(r) / len(r), 1) if r else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded", help="'embedded' or a checkpoint directory")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("runs/embedded_eval"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    setups = {"built-in haystack + needles": (None, None)}
    rh = args.shared / "retrieval_head"
    if rh.is_dir():
        setups["Paul Graham essays + detection needles"] = (rh / "PaulGrahamEssays", rh / "haystack_for_detect/needles.jsonl")
    results = {}
    for i, (name, (hay, needles)) in enumerate(setups.items()):
        rows = N.evaluate_niah(model, tok, N.load_needles(needles), N.load_haystack(hay), LENGTHS, DEPTHS,
                          out=args.out / f"setup{i}.jsonl", label=name)
        results[name] = {"per_length": per_length(rows), "mean": N.summarize_niah(rows)["mean_recall"]}
    print("| setup | " + " | ".join(str(L) for L in LENGTHS) + " | mean |")
    print("|---|" + "---|" * (len(LENGTHS) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(str(r["per_length"][L]) for L in LENGTHS) + f" | {r['mean']} |")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
