"""Masking ablations: NIAH recall with no mask, the top-K retrieval heads masked, and K random heads.

Random heads come from outside the retrieval heads: heads ranked in the top 100 with a score above 0
are never drawn. (The authors' sampler meant to exclude them, but its membership test compared a tuple
with lists and so never excluded anything.)
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

from attnkit.core.hook import HeadMask, intervene
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from attnkit.heads.scores import ranked


def excluded_heads(scores: dict, top: int = 100) -> set[tuple[int, int]]:
    """Heads random draws must avoid: the top `top` by mean score, or all scoring heads when fewer."""
    return {(l, h) for l, h, m in ranked(scores)[:top] if m > 0}


def random_heads(layers: int, heads: int, k: int, exclude: set, seed: int) -> list[tuple[int, int]]:
    pool = [(l, h) for l in range(layers) for h in range(heads) if (l, h) not in exclude]
    if k > len(pool):
        raise AttnkitError(f"cannot draw {k} random heads: only {len(pool)} heads lie outside the retrieval heads")
    return sorted(random.Random(seed).sample(pool, k))


def ablate(model, tokenizer, scores: dict, k: int, needles, haystack: str, lengths, depths,
           mode: str = "uniform", phase: str = "decode", seeds: int = 3, out: Path | None = None,
           quiet: bool = False) -> dict:
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    outside = [key for key in scores if not (0 <= key[0] < layers and 0 <= key[1] < heads)]
    if outside:
        raise AttnkitError(f"score file head {outside[0]} does not exist in this model ({layers} x {heads})")
    top = [(l, h) for l, h, _ in ranked(scores)[:k]]
    exclude = excluded_heads(scores)
    conditions = [("none", 0, []), ("top", 0, top)]
    conditions += [("random", s, random_heads(layers, heads, k, exclude, s)) for s in range(seeds)]
    result = {"k": k, "mode": mode, "phase": phase, "top_heads": top, "random_heads": {}, "grids": {}}
    means = {"none": [], "top": [], "random": []}
    for name, seed, chosen in conditions:
        mask = HeadMask(chosen, mode=mode, phase=phase) if chosen else None
        with intervene(model, mask=mask):
            rows = N.evaluate(model, tokenizer, needles, haystack, lengths, depths, out=out, quiet=quiet,
                              label=f"{name} (seed {seed})" if name == "random" else name,
                              extra={"condition": name, "seed": seed, "k": k if chosen else 0, "mode": mode,
                                     "phase": phase})
        summary = N.summarize(rows)
        means[name].append(summary["mean_recall"])
        result["grids"][name if name != "random" else f"random_seed{seed}"] = summary["grid"]
        if name == "random":
            result["random_heads"][seed] = chosen
    result["none"], result["top"] = means["none"][0], means["top"][0]
    rand = [m for m in means["random"] if m is not None]
    result["random"] = round(statistics.fmean(rand), 2) if rand else None
    result["random_std"] = round(statistics.pstdev(rand), 2) if len(rand) > 1 else 0.0
    return result


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
