"""Side by side: NIAH recall and KV memory of the full cache, retrieval-chosen full heads, randomly
chosen full heads at the same budget, and all-window heads (StreamingLLM).

The paper's thesis in practical form: at the same memory, which heads keep the whole context
decides whether retrieval survives.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from attnkit.core.family import architecture
from attnkit.kvcache.config import KV_DEFAULTS, HeadKVConfig, native_kv_bytes
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from attnkit.evals.systems import System
from attnkit.kvcache.plan import plan


def label(how: str, full: float, settings: HeadKVConfig, seed: int = 0, importance: str = "retrieval",
          heads: int | None = None, split: str | None = None) -> str:
    """Names a cache system in result rows, so that a resumed run matches on every setting."""
    if how == "all":
        return "full cache"
    tail = f"sink {settings.sink} window {settings.window}"
    tail += " compensated" if settings.compensate else ""
    tail += " full prefill" if settings.prefill == "full" else ""
    if settings.budgets:  # token budgets: how many middle tokens the window heads keep, all together
        tail += f" +{sum(n for _, n in settings.budgets)} middle tokens" + {"importance": " by importance", "uniform": " evenly"}.get(split, "")
        tail += f" kernel {settings.select_kernel}" if settings.select_kernel != KV_DEFAULTS.select_kernel else ""
    if how == "none":
        return f"all-window {tail}"
    name = importance if how == "retrieval" else how
    sized = f" {heads} heads" if heads is not None else ""  # random heads matched to a later row's count
    return f"{name} {full:g}{sized} {tail}" + (f" seed {seed}" if how == "random" else "")


def score_sources(scores) -> dict[str, list[dict]]:
    """{importance name: score dicts combined for it}; one score dict is {"retrieval": [it]}."""
    if isinstance(scores, dict) and scores and all(isinstance(k, str) for k in scores):
        return {name: (v if isinstance(v, list) else [v]) for name, v in scores.items()}
    return {"retrieval": scores if isinstance(scores, list) else [scores]}


def kv_ratio(config: HeadKVConfig, model_config, tokens: int) -> float:
    """This cache's bytes over the model's own cache (hybrid models: sliding layers counted as they are)."""
    arch = architecture(model_config)
    return config.kv_bytes(arch, tokens) / native_kv_bytes(arch, tokens)


def compare_caches(model, tokenizer, scores, budgets: list[float], grid: N.Grid,
                   settings: HeadKVConfig = KV_DEFAULTS, seeds: int = 1, out: Path | None = None,
                   quiet: bool = False, chat_template: bool | None = None, head_tokens: int = 0,
                   memory: tuple[float, ...] = ()) -> list[dict]:
    """One result per system: {system, importance, full, kv_ratio (at the longest length), recall, grid}.
    With `memory` (fractions of the model's own cache), one more row per target and importance: the
    memory target's cache, planned per prompt (system "memory", `full` holding the target).

    `scores` is one score dict, or {importance name: score dict or list of them (combined)}: each
    name gets its own row per budget; random heads are drawn at each distinct head count the names
    chose (the same memory), from heads that no file calls a retrieval head. With `head_tokens`, the
    window heads also keep that many middle tokens each on average: shared by importance in the
    retrieval rows, evenly in the random and all-window rows (SnapKV in every head), so a control
    holds the same memory and no importance. With the full prefill (`settings.prefill`), each prompt is
    prefilled once for every row (`kvcache.fork`: the answers of one prefill per row)."""
    tokens = max(grid.lengths)
    sources = score_sources(scores)
    every_file = [s for sets in sources.values() for s in sets]
    options = dict(sink=settings.sink, window=settings.window, prefill_chunk=settings.prefill_chunk,
                   compensate=settings.compensate, prefill_mode=settings.prefill)
    planned: list[tuple[System | None, dict]] = []  # every system first, then one run of them all (one prefill
    # per prompt where they all allow it), then a result row per system

    def add(how: str, full: float, seed: int = 0, count: int | None = None, importance: str = "retrieval",
            sets=None, sized: bool = False) -> dict:
        split = "importance" if how == "retrieval" else "uniform"
        cfg = plan(sets if sets is not None else every_file, model.config, how, full, count=count, seed=seed, **options,
                   head_tokens=head_tokens, split=split)
        name = label(how, full, cfg, seed, importance, count if sized else None, split if head_tokens else None)
        row = {"system": how, "importance": importance if how == "retrieval" else None, "full": full,
               "kv_ratio": round(kv_ratio(cfg, model.config, tokens), 4), "full_heads": len(cfg.full)}
        planned.append((System(name, {"cache": name}, None if how == "all" else cfg), row))
        return row

    def add_memory(target: float, importance: str, sets) -> None:
        from attnkit.core.family import architecture

        cfg = plan(sets, model.config, prefill_mode="full", memory=target,
                   **{k: v for k, v in options.items() if k != "prefill_mode"})
        name = f"{importance} memory {target:g} full share {cfg.memory_full:g} {label('none', 0, cfg)[len('all-window '):]}"
        resolved = cfg.resolve(architecture(model.config), tokens)
        planned.append((System(name, {"cache": name}, cfg), {
            "system": "memory", "importance": importance, "full": target,
            "kv_ratio": round(kv_ratio(resolved, model.config, tokens), 4), "full_heads": len(resolved.full),
            "budget_tokens": sum(n for _, n in resolved.budgets)}))

    add("all", 1.0)
    add("none", 0.0)
    for m in memory:
        for name, sets in sources.items():
            add_memory(m, name, sets)
    groups: dict[int, list[dict]] = {}  # the first random draw's row -> every draw of its group (seeds)
    for full in budgets:
        if full <= 0 or full >= 1:
            continue  # the all-window and full-cache rows already cover these budgets
        chosen = [add("retrieval", full, importance=name, sets=sets) for name, sets in sources.items()]
        counts = list(dict.fromkeys(c["full_heads"] for c in chosen))  # the first keeps the unsized label
        for i, same in enumerate(counts):
            try:
                draws = [add("random", full, s, same, sized=i > 0) for s in range(seeds)]
            except AttnkitError as e:  # too few non-retrieval heads to draw from (Gemma-3: 3 full-layer KV heads)
                planned.append((None, {"system": "random", "importance": None, "full": full, "full_heads": same,
                                       "kv_ratio": next(c["kv_ratio"] for c in chosen if c["full_heads"] == same),
                                       "recall": None, "grid": [], "skipped": str(e)}))
                continue
            groups[id(draws[0])] = draws
    summaries = N.compare_systems(model, tokenizer, grid, [s for s, _ in planned if s is not None], out, quiet,
                                  chat_template=chat_template)
    for system, row in planned:
        if system is not None:
            summary = summaries[system.name]
            row.update(recall=summary["mean_recall"], grid=summary["grid"], recalls=summary["recalls"])
    later_draws = {id(d) for draws in groups.values() for d in draws[1:]}
    results = []
    for _, row in planned:  # a random-heads group becomes one row over its seeds
        if id(row) in later_draws:
            continue
        draws = groups.get(id(row))
        if draws:
            recalls = [d["recall"] for d in draws if d["recall"] is not None]
            row = {**row, "recall": round(statistics.fmean(recalls), 2) if recalls else None,
                   "recall_sd": round(statistics.stdev(recalls), 2) if len(recalls) > 1 else None,  # over seeds
                   "seeds": seeds, "recalls_by_seed": [d["recalls"] for d in draws]}
        results.append(row)
    return results
