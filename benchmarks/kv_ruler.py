"""The retrieval-head KV cache on RULER's tasks: full cache, heads by the recipe, random heads of the
same count, every head windowed, and token budgets inside the window heads, on the same generated prompts.

    python benchmarks/kv_ruler.py --model smollm2-135m-instruct \
        --scores results/study/smollm2-135m-instruct/head_scores.json \
        --tasks niah_single_1,niah_multikey_1 --lengths 4096 --samples 24 --no-all-window \
        --haystack ../shared/data/retrieval_head/PaulGrahamEssays

Heads are chosen by the copy scores of --scores combined with echo and induction scores measured on the
model (the recipe, `--no-recipe`: the file alone), the cache trimmed after a whole-prompt prefill.
`--token-budgets RATIO:FULL:SPLIT,...` adds caches at RATIO of the model's own KV memory (at the longest
length): the top FULL fraction of KV heads full, every other KV head keeping sink + window plus a token
budget (the per-head average that reaches RATIO), shared by importance or evenly (SPLIT: importance |
uniform), the tokens chosen by the prompt's last 64 queries (SnapKV inside each head). Per
system and length: KV memory against the model's own cache, each task's mean RULER score with its 95%
bootstrap interval and n, the NIAH average, and the paired difference from the full cache. The
trials go to --trials as they finish (a rerun resumes, and refuses other settings); the summary rows go
to the record file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import Record, add_record_option

from attnkit.core.kvconfig import HeadKVConfig
from attnkit.core.loading import load_model
from attnkit.evals import ruler as R
from attnkit.evals import stats
from attnkit.evals.systems import System
from attnkit.heads.kvcompare import kv_ratio, label
from attnkit.heads.kvplan import RECIPE, budget_for_ratio, load_score_sets, plan
from attnkit.heads.patterns import pattern_scores


def systems_for(model, tok, scores_path: str, budgets: list[float], sink: int, window: int, chunk: int,
                recipe: bool, all_window: bool = True, random_at: list[float] | None = None,
                token_budgets: list[tuple[float, float, str]] = (), tokens: int = 4096
                ) -> list[tuple[System, HeadKVConfig | None]]:
    sets = load_score_sets(scores_path)
    if recipe:
        sets = sets + list(pattern_scores(model, tok))
    importance = "+".join(["copy", *RECIPE] if recipe else ["copy"])
    options = dict(sink=sink, window=window, prefill_chunk=chunk, prefill_mode="full")
    out = [(System("full cache", {"cache": "full"}), None)]
    if all_window:
        none = plan(sets, model.config, "none", 0.0, **options)
        out.append((System(label("none", 0.0, none), {"cache": label("none", 0.0, none)}, none), none))
    for full in budgets:
        chosen = plan(sets, model.config, "retrieval", full, **options)
        name = label("retrieval", full, chosen, importance=importance)
        out.append((System(name, {"cache": name}, chosen), chosen))
        if random_at is not None and full not in random_at:
            continue
        rand = plan(sets, model.config, "random", full, len(chosen.full), seed=0, **options)
        name = label("random", full, rand, heads=len(chosen.full))
        out.append((System(name, {"cache": name}, rand), rand))
    for ratio, full, split in token_budgets:
        heads = plan(sets, model.config, "retrieval" if full > 0 else "none", full, **options)
        per_head = budget_for_ratio(ratio, len(heads.full), model.config, tokens, sink, window)
        cfg = plan(sets, model.config, "retrieval" if full > 0 else "none", full, **options, head_tokens=per_head,
                   split=split)
        name = label("retrieval" if full > 0 else "none", full, cfg, importance=importance, split=split)
        out.append((System(name, {"cache": name, "head_tokens": per_head}, cfg), cfg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scores", required=True, help="copy (retrieval) scores of this model, e.g. the study's")
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue")
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--budgets", default="0.25", help="fractions of KV heads with the full cache")
    ap.add_argument("--random-at", default=None, help="fractions of --budgets with a random-heads row (default: all)")
    ap.add_argument("--token-budgets", default="", help="RATIO:FULL:SPLIT,... caches with token budgets (see above)")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--haystack", type=Path, default=None, help="essays for the essay tasks (a .txt or a folder, "
                    "e.g. ../shared/data/retrieval_head/PaulGrahamEssays); default: attnkit's filler prose")
    ap.add_argument("--no-all-window", action="store_true", help="leave out the every-head-windowed row")
    ap.add_argument("--no-recipe", action="store_true", help="choose by the score file alone")
    ap.add_argument("--trials", type=Path, default=None, help="JSONL of every answer (default: beside the record)")
    ap.add_argument("--device", default="cpu")
    add_record_option(ap, "kv_ruler")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    budgets = [float(x) for x in args.budgets.split(",")]
    random_at = None if args.random_at is None else [float(x) for x in args.random_at.split(",")]
    token_budgets = []
    for spec in filter(None, (x.strip() for x in args.token_budgets.split(","))):
        try:
            ratio, full, split = spec.split(":")
            token_budgets.append((float(ratio), float(full), split))
        except ValueError:
            ap.error(f"--token-budgets: {spec!r} is not RATIO:FULL:SPLIT (e.g. 0.27:0.1:importance)")
    args.dtype = "float32"
    model, tok = load_model(args.model, device=args.device, dtype=torch.float32)
    record = Record(args, "kv_ruler", {"tasks": tasks, "lengths": lengths, "samples": args.samples,
                                       "scores": args.scores, "recipe": not args.no_recipe, "all_window": not args.no_all_window,
                                       "budgets": budgets, "random_at": random_at, "token_budgets": token_budgets, "sink": args.sink,
                                       "window": args.window, "prefill": "full (the whole prompt, then trimmed)",
                                       "haystack": args.haystack.name if args.haystack else "attnkit filler prose"})
    trials = args.trials or (record.path.with_name(record.path.stem + "_trials.jsonl") if record.path else None)
    chosen = systems_for(model, tok, args.scores, budgets, args.sink, args.window, max(lengths) + 256,
                         not args.no_recipe, not args.no_all_window, random_at, token_budgets, max(lengths))
    from attnkit.evals.niah import load_haystack
    essays = load_haystack(args.haystack) if args.haystack else None
    rows = R.evaluate_ruler(model, tok, tasks, lengths, args.samples, [s for s, _ in chosen], trials, essays=essays)
    pairs = [c for c in chosen if c[1] is not None and c[1].full and not c[1].budgets]  # recipe, then its random
    controls = {a[0].name: b[0].name for a, b in zip(pairs, pairs[1:]) if b[0].name.startswith("random")
                and not a[0].name.startswith("random")}
    # each token-budget cache against the full-heads-only recipe cache nearest its memory (within 0.03x)
    plain = [(c[0].name, kv_ratio(c[1], model.config, max(lengths))) for c in pairs
             if not c[0].name.startswith("random")]
    same_memory = {}
    for system, cfg in chosen:
        if cfg is not None and cfg.budgets and plain:
            name, ratio = min(plain, key=lambda p: abs(p[1] - kv_ratio(cfg, model.config, max(lengths))))
            if abs(ratio - kv_ratio(cfg, model.config, max(lengths))) <= 0.03:
                same_memory[system.name] = name
    for L in lengths:
        def scores_of(name):
            return {(r["task"], r["index"]): r["score"] for r in rows if r["system"] == name and r["length"] == L}
        full = scores_of("full cache")
        for system, cfg in chosen:
            mine = [r for r in rows if r["system"] == system.name and r["length"] == L]
            keys = sorted((r["task"], r["index"]) for r in mine)
            by_key = {(r["task"], r["index"]): r["score"] for r in mine}
            niah = stats.bootstrap_mean([by_key[k] for k in keys if k[0] in R.NIAH_TASKS])
            diff = stats.paired_difference([full.get(k) for k in keys], [by_key[k] for k in keys])
            record.emit({"length": L, "system": system.name, "full_heads": None if cfg is None else len(cfg.full),
                         "head_tokens": system.fields.get("head_tokens", 0),
                         "kv_ratio": 1.0 if cfg is None else round(kv_ratio(cfg, model.config, L), 4),
                         "tasks": {t: stats.bootstrap_mean([r["score"] for r in mine if r["task"] == t]).as_dict()
                                   for t in tasks},
                         "niah_average": niah.as_dict(), "minus_full": diff.as_dict(),
                         **({"minus_random": stats.paired_difference(
                             [scores_of(controls[system.name]).get(k) for k in keys],
                             [by_key[k] for k in keys]).as_dict()} if system.name in controls else {}),
                         **({"minus_full_heads_same_memory": {"vs": same_memory[system.name], **stats.paired_difference(
                             [scores_of(same_memory[system.name]).get(k) for k in keys],
                             [by_key[k] for k in keys]).as_dict()}} if system.name in same_memory else {})})
    if record.path is not None:
        plot(record.rows, record.path.with_suffix(".png"), args.model)


def family(row: dict) -> str:
    """Which line of the plot a summary row belongs to."""
    name = row["system"]
    if name == "full cache":
        return "full cache"
    if name.startswith("random"):
        return "random heads full (same count)"
    if name.endswith(" evenly"):
        return "no full heads, token budgets evenly (SnapKV layout)"
    if "middle tokens" in name:
        return "recipe heads full + token budgets by importance"
    return "recipe heads full, the rest sink + window"


def plot(rows: list[dict], path: Path, model: str) -> None:
    """RULER NIAH average against KV memory, one line per cache family, 95% intervals as bars."""
    from attnkit.evals.plots import memory_curve

    for L in sorted({r["length"] for r in rows}):
        points = [{"family": family(r), "kv_ratio": r["kv_ratio"], "mean": r["niah_average"]["mean"],
                   "low": r["niah_average"]["ci95"][0], "high": r["niah_average"]["ci95"][1]}
                  for r in rows if r["length"] == L]
        out = path if len({r["length"] for r in rows}) == 1 else path.with_name(f"{path.stem}_{L}.png")
        memory_curve(points, out, title=f"{model}, {L} tokens: RULER NIAH average against KV memory "
                                        f"(n={rows[0]['niah_average']['n']} per point)")


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-only":  # redraw from a record file
        lines = [json.loads(x) for x in Path(sys.argv[2]).read_text().splitlines()]
        head = lines[0]
        plot(lines[1:], Path(sys.argv[2]).with_suffix(".png"), head.get("model", ""))
    else:
        main()
