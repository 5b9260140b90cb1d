"""Lost in the Middle on a real model: multi-document QA accuracy against the gold passage's position,
the model as it is and (with --bases or --search) Attention Buckets on the same prompts.

    python benchmarks/mdqa_curve.py --model smollm2-135m-instruct --docs 10 --questions 50 \
        --data ../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz

Rows: per system, accuracy at each gold position (Wilson 95%) and ends minus middle (the first and last
positions' mean accuracy minus the middle one's, paired by question, bootstrap 95%: above 0 is a middle
dip); with buckets, buckets minus one base per position (paired). The answers go to --trials as they
finish (a rerun resumes); the plot goes beside the record.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import Record, add_record_option

from attnkit.core.loading import load_model
from attnkit.evals import mdqa as Q
from attnkit.evals import stats
from attnkit.evals.systems import System


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, required=True, help="nq-open-oracle.jsonl.gz of Lost in the Middle")
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--positions", default=None, help="0-based gold positions (default: 5 from first to last)")
    ap.add_argument("--bases", default=None, help="also Attention Buckets with these RoPE bases")
    ap.add_argument("--search", action="store_true", help="also Attention Buckets with searched bases")
    ap.add_argument("--trials", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    add_record_option(ap, "mdqa")
    args = ap.parse_args()
    positions = [int(x) for x in args.positions.split(",")] if args.positions else Q.positions_for(args.docs)
    args.dtype = "float32"
    model, tok = load_model(args.model, device=args.device, dtype=torch.float32)
    systems = [System("one base", {"system": "single"})]
    if args.bases or args.search:
        from attnkit.core import registry
        choice = registry.choice("buckets", given={"bases": (args.bases or "").split(",") if args.bases else [],
                                                   "search": args.search})
        from attnkit.evals.systems import technique_systems
        systems = technique_systems(choice, choice.build(model.config), model)
    record = Record(args, "mdqa", {"docs": args.docs, "questions": args.questions, "positions": positions,
                                   "data": args.data.name, "systems": [s.name for s in systems]})
    trials = args.trials or (record.path.with_name(record.path.stem + "_trials.jsonl") if record.path else None)
    questions = Q.load_nq(args.data)
    rows = Q.evaluate_mdqa(model, tok, questions, list(range(args.questions)), args.docs, positions, systems, trials)
    curve = Q.curve(rows)
    base = systems[0].name
    for system in systems:
        c = curve[system.name][str(args.docs)]
        out = {"system": system.name, "docs": args.docs, "accuracy": c["accuracy"],
               "ends_minus_middle": c["ends_minus_middle"],
               "tokens": round(sum(r["tokens"] for r in rows) / len(rows))}
        if system.name != base:
            def at(name, p):
                return {r["index"]: float(r["correct"]) * 100 for r in rows if r["system"] == name and r["position"] == p}
            out["minus_one_base"] = {str(p): stats.paired_difference(
                [at(base, p).get(i) for i in range(args.questions)],
                [at(system.name, p).get(i) for i in range(args.questions)]).as_dict() for p in positions}
        record.emit(out)
    if record.path is not None:
        from attnkit.evals.plots import position_curve
        position_curve(curve, record.path.with_suffix(".png"), title=f"{args.model}: multi-document QA, "
                                                                      f"{args.docs} documents")


if __name__ == "__main__":
    main()
