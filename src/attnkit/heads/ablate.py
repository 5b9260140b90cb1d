"""Masking ablations: NIAH recall with no mask, the top-K retrieval heads masked, and K random heads.

Random heads come from outside the retrieval heads: heads ranked in the top 100 with a score above 0
are never drawn. (The authors' sampler meant to exclude them, but its membership test compared a tuple
with lists and so never excluded anything.)
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from typing import Literal

from attnkit.core.family import architecture
from attnkit.core.hook import HeadMask, Intervention
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from attnkit.heads.scores import ranked


Mode = Literal["uniform", "zero"]
Phase = Literal["decode", "prefill", "both"]


def excluded_heads(scores: dict, top: int = 100) -> set[tuple[int, int]]:
    """Heads random draws must avoid: the top `top` by mean score, or all scoring heads when fewer."""
    return {(l, h) for l, h, m in ranked(scores)[:top] if m > 0}


def random_heads(layers: int, heads: int, k: int, exclude: set, seed: int) -> list[tuple[int, int]]:
    pool = [(l, h) for l in range(layers) for h in range(heads) if (l, h) not in exclude]
    if k > len(pool):
        raise AttnkitError(f"cannot draw {k} random heads: only {len(pool)} heads lie outside the retrieval heads")
    return sorted(random.Random(seed).sample(pool, k))


def ablate(model, tokenizer, scores: dict, k: int, grid: N.Grid, mode: Mode = "uniform", phase: Phase = "decode",
           seeds: int = 3, out: Path | None = None, quiet: bool = False, chat_template: bool | None = None) -> dict:
    """NIAH with no mask, the top-K heads masked, and K random non-retrieval heads per seed."""
    return ablate_sweep(model, tokenizer, scores, [k], grid, mode, phase, seeds, out, quiet, chat_template)[0]


def ablate_sweep(model, tokenizer, scores: dict, ks: list[int], grid: N.Grid, mode: Mode = "uniform",
                 phase: Phase = "decode", seeds: int = 3, out: Path | None = None, quiet: bool = False,
                 chat_template: bool | None = None) -> list[dict]:
    """`ablate` for every K in `ks`; the unmasked grid, the same for every K, runs once."""
    arch = architecture(model.config)
    layers, heads = arch.layers, arch.query_heads
    outside = [key for key in scores if not (0 <= key[0] < layers and 0 <= key[1] < heads)]
    if outside:
        raise AttnkitError(f"score file head {outside[0]} does not exist in this model ({layers} x {heads})")

    def run(name: str, seed: int, k: int, chosen: list) -> dict:
        mask = Intervention(HeadMask(chosen, mode=mode, phase=phase)) if chosen else None
        rows = N.evaluate_niah(model, tokenizer, grid.needles, grid.haystack, grid.lengths, grid.depths, out=out, quiet=quiet,
                          label=f"K={k} {name}" + (f" (seed {seed})" if name == "random" else "") if k else name,
                          extra={"condition": name, "seed": seed, "k": k, "mode": mode, "phase": phase},
                          chat_template=chat_template, technique=mask)
        return N.summarize_niah(rows)

    exclude = excluded_heads(scores)
    if max(ks) > layers * heads:
        raise AttnkitError(f"cannot mask {max(ks)} heads: the model has {layers * heads}")
    draws = {k: {s: random_heads(layers, heads, k, exclude, s) for s in range(seeds)} for k in ks}  # fail fast
    none = run("none", 0, 0, [])
    results = []
    for k in ks:
        top = [(l, h) for l, h, _ in ranked(scores)[:k]]
        drawn = draws[k]
        top_summary = run("top", 0, k, top)
        rand = {s: run("random", s, k, chosen) for s, chosen in drawn.items()}
        means = [r["mean_recall"] for r in rand.values() if r["mean_recall"] is not None]
        results.append({
            "k": k, "mode": mode, "phase": phase, "top_heads": top, "random_heads": drawn,
            "top_heads_layer_types": [arch.layer_types[l] for l, _ in top],
            "grids": {"none": none["grid"], "top": top_summary["grid"],
                      **{f"random_seed{s}": r["grid"] for s, r in rand.items()}},
            "none": none["mean_recall"], "top": top_summary["mean_recall"],
            "random": round(statistics.fmean(means), 2) if means else None,
            "random_sd": round(statistics.stdev(means), 2) if len(means) > 1 else None,  # sample SD over seeds
            "recalls": {"none": none["recalls"], "top": top_summary["recalls"],
                        **{f"random_seed{s}": r["recalls"] for s, r in rand.items()}},
        })
    return results


def condition_grids(result: dict) -> dict[str, dict]:
    """The three heatmaps of one ablation: no mask, top-K masked, and K random masked (mean over seeds)."""
    k = result["k"]
    rand: dict = {}
    for name, grid in result["grids"].items():
        if name.startswith("random"):
            for key, v in N.grid_map(grid).items():
                rand.setdefault(key, []).append(v)
    return {"no mask": N.grid_map(result["grids"]["none"]), f"top-{k} masked": N.grid_map(result["grids"]["top"]),
            f"{k} random masked": {key: sum(v) / len(v) for key, v in rand.items()}}
