"""Lost in the Middle on a real model: multi-document QA accuracy against the gold passage's position,
the model as it is and (with --bases or --search) Attention Buckets on the same prompts.

    python benchmarks/mdqa_curve.py --model smollm2-135m-instruct --docs 10 --questions 50 \
        --data ../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz
    python benchmarks/mdqa_curve.py ... --docs 20 --positions 0,10,19 --questions 30 --search --cost 5 \
        --trials <the one-base run's trials file> --record <another record>   # buckets on the same prompts

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
    ap.add_argument("--buckets-n", type=int, default=3, help="--search: how many bases (one model row each)")
    ap.add_argument("--cost", type=int, default=0, help="also time this many examples (middle position) per system, "
                    "back to back in this run: seconds per example")
    ap.add_argument("--trials", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    add_record_option(ap, "mdqa")
    args = ap.parse_args()
    positions = [int(x) for x in args.positions.split(",")] if args.positions else Q.positions_for(args.docs)
    args.dtype = "float32"
    model, tok = load_model(args.model, device=args.device, dtype=torch.float32)
    systems = [System("one base", {"system": "single"})]  # the name every run gives it, so a rerun reuses its rows
    if args.bases or args.search:
        from attnkit.buckets import BucketsConfig
        from attnkit.buckets.search import search_for_model
        bases = [float(b) for b in args.bases.split(",")] if args.bases else \
            list(search_for_model(model.config, n=args.buckets_n)[0].bases)
        cfg = BucketsConfig(bases)
        systems.append(System(f"buckets ({', '.join(f'{b:g}' for b in bases)})", {"system": cfg.label}, cfg))
    record = Record(args, "mdqa", {"docs": args.docs, "questions": args.questions, "positions": positions,
                                   "data": args.data.name, "systems": [s.name for s in systems]})
    trials = args.trials or (record.path.with_name(record.path.stem + "_trials.jsonl") if record.path else None)
    questions = Q.load_nq(args.data)
    rows = Q.evaluate_mdqa(model, tok, questions, list(range(args.questions)), args.docs, positions, systems, trials)
    curve = Q.curve(rows)
    base = systems[0].name
    cost = time_examples(model, tok, questions, args, positions, systems) if args.cost else {}
    for system in systems:
        c = curve[system.name][str(args.docs)]
        out = {"system": system.name, "docs": args.docs, "accuracy": c["accuracy"],
               "ends_minus_middle": c["ends_minus_middle"], "first_minus_middle": c.get("first_minus_middle"),
               "last_minus_middle": c.get("last_minus_middle"),
               "tokens": round(sum(r["tokens"] for r in rows) / len(rows))}
        if system.name in cost:
            out["seconds_per_example"] = cost[system.name]
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


def time_examples(model, tok, questions, args, positions, systems) -> dict:
    """Seconds per example of each system on the first --cost questions at the middle position, the
    systems taking turns on each example (so the machine's load falls on both alike)."""
    import time

    from attnkit.core.decode import use_chat_template
    from attnkit.core.generate import encode_prompts, generate

    chat = use_chat_template(tok, None)
    spent = {s.name: 0.0 for s in systems}
    for i in range(args.cost):
        ids, mask = encode_prompts(tok, [Q.build(questions, i, args.docs, positions[len(positions) // 2]).prompt()], chat)
        for s in systems:
            t = time.perf_counter()
            generate(model, tok, ids, mask, s.technique, Q.ANSWER_TOKENS, stop_rule="eos", stop_strings=("\n",))
            spent[s.name] += time.perf_counter() - t
    return {name: round(v / args.cost, 3) for name, v in spent.items()}


if __name__ == "__main__":
    main()
