"""Which KV heads keep the full cache, chosen from retrieval scores (or at random, or none).

The unit is the KV head: under GQA every query head of a group reads the same keys, so a KV head
keeps the full cache when it is chosen, and its score is the max over its query heads (the head the
group cannot lose; `reduce="mean"` is the alternative).

Only KV heads of full-attention layers can be chosen: a hybrid model's sliding layers (Gemma 3)
keep their own window whatever the plan says, so budgets are fractions of the full-attention KV
heads. A retrieval choice takes heads that scored above 0 only: when fewer did than the budget
asks, the rest of the budget stays unused (and `kv plan` says so) rather than going to score-0
heads picked by index order.
"""

from __future__ import annotations

import random
from typing import Literal

from attnkit.core.family import architecture
from attnkit.core.kvconfig import KV_DEFAULTS, HeadKVConfig
from attnkit.errors import AttnkitError
from attnkit.heads.scores import THRESHOLD, mean_scores

Choice = Literal["retrieval", "random", "none", "all"]
CHOICES = ("retrieval", "random", "none", "all")


def model_shape(config) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model config."""
    arch = architecture(config)
    return arch.layers, arch.query_heads, arch.kv_heads


def choosable(model_config) -> list[tuple[int, int]]:
    """The (layer, KV head) pairs a plan may give the full cache: those of full-attention layers."""
    arch = architecture(model_config)
    return [(l, g) for l in arch.full_layers for g in range(arch.kv_heads)]


def check_shape(scores: dict, layers: int, heads: int) -> None:
    file_layers = 1 + max(l for l, _ in scores)
    file_heads = 1 + max(h for _, h in scores)
    if (file_layers, file_heads) != (layers, heads):
        raise AttnkitError(f"the score file is for {file_layers} layers x {file_heads} heads, the model has "
                           f"{layers} x {heads}: scores from another model?")


def kv_head_scores(scores: dict, layers: int, heads: int, kv_heads: int,
                   reduce: Literal["max", "mean"] = "max") -> dict[tuple[int, int], float]:
    """{(layer, kv head): score} from per-query-head score lists."""
    check_shape(scores, layers, heads)
    if reduce not in ("max", "mean"):
        raise AttnkitError(f"reduce must be max or mean, not {reduce!r}")
    means = mean_scores(scores)
    group = heads // kv_heads
    out = {}
    for l in range(layers):
        for g in range(kv_heads):
            vals = [means.get((l, g * group + i), 0.0) for i in range(group)]
            out[(l, g)] = max(vals) if reduce == "max" else sum(vals) / len(vals)
    return out


def budget_count(full: float | None, count: int | None, total: int) -> int:
    """How many KV heads keep the full cache: a fraction of all of them, or a count."""
    if count is not None:
        if not 0 <= count <= total:
            raise AttnkitError(f"full-cache head count must be in [0, {total}], got {count}")
        return count
    if full is None or not 0.0 <= full <= 1.0:
        raise AttnkitError(f"full fraction must be in [0, 1], got {full}")
    return round(full * total)


def choose_full_heads(scores: dict | None, model_config, how: Choice = "retrieval", full: float | None = 0.25,
                      count: int | None = None, reduce: Literal["max", "mean"] = "max",
                      seed: int = 0) -> frozenset[tuple[int, int]]:
    """The (layer, KV head) pairs that keep the full cache.

    Heads come from the full-attention layers (`choosable`); `full` is a fraction of those.
    retrieval: the top KV heads by score, among those scoring above 0; random: as many as the budget,
    drawn (seeded) from the KV heads that are not retrieval heads (score <= 0.1); none: no head
    (StreamingLLM); all: every choosable head (the model's own cache).
    """
    layers, heads, kv_heads = model_shape(model_config)
    pool_all = choosable(model_config)
    total = len(pool_all)
    if how not in CHOICES:
        raise AttnkitError(f"unknown head choice {how!r}: use one of {', '.join(CHOICES)}")
    if how == "none":
        return frozenset()
    if how == "all":
        return frozenset(pool_all)
    n = budget_count(full, count, total)
    if scores is None:
        raise AttnkitError(f"choosing heads by '{how}' needs a retrieval-score file")
    kv_scores = kv_head_scores(scores, layers, heads, kv_heads, reduce)
    if how == "retrieval":
        ranked = sorted((k for k in pool_all if kv_scores[k] > 0), key=lambda k: (-kv_scores[k], k))
        return frozenset(ranked[:n])
    pool = [k for k in pool_all if kv_scores[k] <= THRESHOLD]
    if n > len(pool):
        raise AttnkitError(f"cannot draw {n} random KV heads: only {len(pool)} of {total} are not retrieval heads")
    return frozenset(random.Random(seed).sample(pool, n))


def plan(scores: dict | None, model_config, how: Choice = "retrieval", full: float | None = 0.25,
         count: int | None = None, sink: int = KV_DEFAULTS.sink, window: int = KV_DEFAULTS.window,
         prefill_chunk: int = KV_DEFAULTS.prefill_chunk,
         reduce: Literal["max", "mean"] = "max", seed: int = 0) -> HeadKVConfig:
    """A `HeadKVConfig` with heads chosen by `choose_full_heads`."""
    HeadKVConfig(sink=sink, window=window, prefill_chunk=prefill_chunk)  # validate before any work
    chosen = choose_full_heads(scores, model_config, how, full, count, reduce, seed)
    return HeadKVConfig(chosen, sink, window, prefill_chunk)


def plan_from_options(model_config, scores_path, choose: str, full: float, count: int | None, sink: int,
                      window: int, chunk: int, reduce: str = "max", seed: int = 0) -> HeadKVConfig:
    """A HeadKVConfig from the `kv plan` / `--kv-*` options: the score file (a path, or None) read here."""
    from attnkit.heads.scores import load_scores

    data = load_scores(scores_path) if scores_path is not None else None
    return plan(data, model_config, choose, full, count, sink, window, chunk, reduce, seed)


def cache_from_options(model_config, scores_path, choose: str | None, full: float, sink: int, window: int,
                       chunk: int, with_buckets: bool) -> HeadKVConfig | None:
    """The `--kv-*` options of `niah` and `serve` as a HeadKVConfig, or None when none is given; read
    from the model's config alone, so bad options fail before any weights load."""
    if scores_path is None and choose is None:
        return None
    if with_buckets:
        raise AttnkitError("the retrieval-head KV cache cannot be combined with Attention Buckets (--bases/--search)")
    return plan_from_options(model_config, scores_path, choose or "retrieval", full, None, sink, window, chunk)
