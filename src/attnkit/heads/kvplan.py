"""Which KV heads keep the full cache, chosen from retrieval scores (or at random, or none).

The unit is the KV head: under GQA every query head of a group reads the same keys, so a KV head
keeps the full cache when it is chosen, and its score is the max over its query heads (the head the
group cannot lose; `reduce="mean"` is the alternative).
"""

from __future__ import annotations

import random
from typing import Literal

from attnkit.core.kvcache import HeadKVConfig
from attnkit.errors import AttnkitError
from attnkit.heads.scores import THRESHOLD, mean_scores

Choice = Literal["retrieval", "random", "none", "all"]
CHOICES = ("retrieval", "random", "none", "all")


def model_shape(config) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model config."""
    heads = config.num_attention_heads
    return config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads


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

    retrieval: the top KV heads by score; random: as many, drawn (seeded) from the KV heads that are
    not retrieval heads (score <= 0.1); none: no head (StreamingLLM); all: every head (full cache).
    """
    layers, heads, kv_heads = model_shape(model_config)
    total = layers * kv_heads
    if how not in CHOICES:
        raise AttnkitError(f"unknown head choice {how!r}: use one of {', '.join(CHOICES)}")
    if how == "none":
        return frozenset()
    if how == "all":
        return frozenset((l, g) for l in range(layers) for g in range(kv_heads))
    n = budget_count(full, count, total)
    if scores is None:
        raise AttnkitError(f"choosing heads by '{how}' needs a retrieval-score file")
    kv_scores = kv_head_scores(scores, layers, heads, kv_heads, reduce)
    ranked = sorted(kv_scores, key=lambda k: (-kv_scores[k], k))
    if how == "retrieval":
        return frozenset(ranked[:n])
    pool = [k for k in sorted(kv_scores) if kv_scores[k] <= THRESHOLD]
    if n > len(pool):
        raise AttnkitError(f"cannot draw {n} random KV heads: only {len(pool)} of {total} are not retrieval heads")
    return frozenset(random.Random(seed).sample(pool, n))


def plan(scores: dict | None, model_config, how: Choice = "retrieval", full: float | None = 0.25,
         count: int | None = None, sink: int = 16, window: int = 128, prefill_chunk: int = 2048,
         reduce: Literal["max", "mean"] = "max", seed: int = 0) -> HeadKVConfig:
    """A `HeadKVConfig` with heads chosen by `choose_full_heads`."""
    HeadKVConfig(sink=sink, window=window, prefill_chunk=prefill_chunk)  # validate before any work
    chosen = choose_full_heads(scores, model_config, how, full, count, reduce, seed)
    return HeadKVConfig(chosen, sink, window, prefill_chunk)
