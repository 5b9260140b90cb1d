"""The authors' published retrieval-score files (Wu et al. 2024), ranked by attnkit's reader: how many
heads score above 0.1 in each of their models, so the paper's sparsity figure is checked with the rule
attnkit applies to its own models. Writes results/paper_head_scores.json.

    python scripts/paper_head_scores.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "paper_head_scores.json")
    args = ap.parse_args()
    from attnkit.heads.scores import load_scores, summary

    folder = args.data / "retrieval_head" / "head_score"
    files = sorted(folder.glob("*.json"))
    if not files:
        print(f"error: no score files in {folder}", file=sys.stderr)
        return 2
    models = []
    for f in files:
        s = summary(load_scores(f), top=1)
        top = s["top"][0]
        models.append({"model": f.stem, "heads": s["heads"], "above": s["above_threshold"],
                       "threshold": s["threshold"], "top": [f"{top[0]}-{top[1]}", top[2]]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python scripts/paper_head_scores.py --data ../shared/data",
                                    "source": "the authors' head_score files (retrieval_head repository)",
                                    "models": models}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
