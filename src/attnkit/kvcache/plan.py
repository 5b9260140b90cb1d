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
from attnkit.kvcache.config import FULL_FRACTION, KV_DEFAULTS, HeadKVConfig, share_tokens
from attnkit.errors import AttnkitError
from attnkit.heads.scores import THRESHOLD, mean_scores

Choice = Literal["retrieval", "random", "none", "all"]
CHOICES = ("retrieval", "random", "none", "all")
Spread = Literal["global", "layer"]
SPREADS = ("global", "layer")
Split = Literal["importance", "uniform"]
SPLITS = ("importance", "uniform")


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


def combine(score_sets: list[dict], layers: int, heads: int, kv_heads: int,
            reduce: Literal["max", "mean"] = "max") -> dict[tuple[int, int], float]:
    """{(layer, kv head): importance}: one source's KV-head scores, or the max over several sources
    of each one's scores divided by its best KV head (so every source counts on the same 0..1 scale)."""
    per_source = [kv_head_scores(s, layers, heads, kv_heads, reduce) for s in score_sets]
    if len(per_source) == 1:
        return per_source[0]
    scaled = []
    for kv in per_source:
        top = max(kv.values())
        scaled.append({k: (v / top if top > 0 else 0.0) for k, v in kv.items()})
    return {k: max(s[k] for s in scaled) for k in scaled[0]}


def _score_sets(scores) -> list[dict]:
    """One score dict, or a list of them, as a list (None stays None)."""
    if scores is None or isinstance(scores, list):
        return scores
    return [scores]


def budget_count(full: float | None, count: int | None, total: int) -> int:
    """How many KV heads keep the full cache: a fraction of all of them, or a count."""
    if count is not None:
        if not 0 <= count <= total:
            raise AttnkitError(f"full-cache head count must be in [0, {total}], got {count}")
        return count
    if full is None or not 0.0 <= full <= 1.0:
        raise AttnkitError(f"full fraction must be in [0, 1], got {full}")
    return round(full * total)


def choose_full_heads(scores: dict | list[dict] | None, model_config, how: Choice = "retrieval",
                      full: float | None = FULL_FRACTION, count: int | None = None, reduce: Literal["max", "mean"] = "max",
                      seed: int = 0, spread: Spread = "global") -> frozenset[tuple[int, int]]:
    """The (layer, KV head) pairs that keep the full cache.

    Heads come from the full-attention layers (`choosable`); `full` is a fraction of those.
    `scores` is one score dict or a list of them (combined by `combine`).
    retrieval: the top KV heads by score, among those scoring above 0 (spread "layer": the top
    round(full x KV heads) of every layer); random: as many as the budget, drawn (seeded) from the KV
    heads that are retrieval heads by no source (score <= 0.1 in each); none: no head (StreamingLLM);
    all: every choosable head (the model's own cache).
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
    if spread not in SPREADS:
        raise AttnkitError(f"unknown spread {spread!r}: use global or layer")
    n = budget_count(full, count, total)
    sets = _score_sets(scores)
    if not sets:
        raise AttnkitError(f"choosing heads by '{how}' needs a retrieval-score file")
    kv_scores = combine(sets, layers, heads, kv_heads, reduce)
    if how == "retrieval":
        ranked = sorted((k for k in pool_all if kv_scores[k] > 0), key=lambda k: (-kv_scores[k], k))
        if spread == "global":
            return frozenset(ranked[:n])
        per_layer = round(n / len(architecture(model_config).full_layers))
        kept: dict[int, int] = {}
        chosen = []
        for k in ranked:
            if kept.get(k[0], 0) < per_layer:
                kept[k[0]] = kept.get(k[0], 0) + 1
                chosen.append(k)
        return frozenset(chosen)
    each = [kv_head_scores(s, layers, heads, kv_heads, reduce) for s in sets]
    pool = [k for k in pool_all if all(kv[k] <= THRESHOLD for kv in each)]
    if n > len(pool):
        raise AttnkitError(f"cannot draw {n} random KV heads: only {len(pool)} of {total} are not retrieval heads")
    return frozenset(random.Random(seed).sample(pool, n))


def token_budgets(importance: dict[tuple[int, int], float] | None, heads: list[tuple[int, int]], per_head: int,
                  split: Split = "importance") -> dict[tuple[int, int], int]:
    """{(layer, KV head): middle tokens}: per_head x len(heads) tokens shared among `heads`, in
    proportion to their importance (HeadKV's idea: heads that retrieve get more; negative scores count
    as 0, and all-zero importance falls back to an even split) or evenly ("uniform": the same budget
    in every head, SnapKV's layout). Rounding gives the remainders to the largest fractional parts,
    so the total is exact."""
    if split not in SPLITS:
        raise AttnkitError(f"unknown budget split {split!r}: use one of {', '.join(SPLITS)}")
    if per_head < 0:
        raise AttnkitError(f"the token budget must be >= 0 tokens per head, got {per_head}")
    if not heads or per_head == 0:
        return {}
    weights = {h: 1.0 if split == "uniform" else max(0.0, (importance or {}).get(h, 0.0)) for h in heads}
    return share_tokens(weights, per_head * len(heads))


def budget_for_ratio(ratio: float, full_heads: int, model_config, tokens: int, sink: int = KV_DEFAULTS.sink,
                     window: int = KV_DEFAULTS.window) -> int:
    """The per-head token budget that brings a cache with `full_heads` full KV heads to `ratio` of the
    model's own cache at `tokens` tokens (rounded down; 0 when the full heads alone exceed it)."""
    from attnkit.kvcache.config import native_kv_bytes

    arch = architecture(model_config)
    per_token = 2 * arch.head_dim * 2  # keys and values of one KV head, 2-byte values
    heads = len(choosable(model_config))
    sliding = native_kv_bytes(arch, tokens) - heads * tokens * per_token  # native sliding layers stay as they are
    target = ratio * native_kv_bytes(arch, tokens) - sliding
    window_heads = heads - full_heads
    if window_heads <= 0:
        return 0
    kept = min(tokens, sink + window - 1)
    per_head = (target / per_token - full_heads * tokens) / window_heads - kept
    return max(0, min(int(per_head), max(0, tokens - kept)))


def plan(scores: dict | list[dict] | None, model_config, how: Choice = "retrieval", full: float | None = FULL_FRACTION, *,
         count: int | None = None, sink: int = KV_DEFAULTS.sink, window: int = KV_DEFAULTS.window,
         prefill_chunk: int = KV_DEFAULTS.prefill_chunk,
         reduce: Literal["max", "mean"] = "max", seed: int = 0, spread: Spread = "global",
         compensate: bool = KV_DEFAULTS.compensate, prefill_mode: str = KV_DEFAULTS.prefill,
         head_tokens: int = 0, split: Split = "importance", memory: float = 0.0,
         memory_full: float = 0.5) -> HeadKVConfig:
    """A `HeadKVConfig` with heads chosen by `choose_full_heads`; with `head_tokens` (middle tokens per
    window head, on average), every other KV head of the full-attention layers gets a token budget
    (`token_budgets`: by the same combined importance, or evenly). With `memory` (a fraction of the
    model's own cache), a memory target instead: the combined importance of every choosable KV head,
    from which each prompt's full heads and token budgets are chosen when it ends
    (`HeadKVConfig.resolve`); `how`, `full`, `count` and `head_tokens` do not apply."""
    HeadKVConfig(sink=sink, window=window, prefill_chunk=prefill_chunk, prefill=prefill_mode)  # validate first
    if memory:
        sets = _score_sets(scores)
        if not sets:
            raise AttnkitError("a memory target ranks the KV heads by importance: it needs a score file")
        if head_tokens:
            raise AttnkitError("a memory target chooses the token budgets itself: leave head_tokens at 0")
        layers, heads, kv_heads = model_shape(model_config)
        kv = combine(sets, layers, heads, kv_heads, reduce)
        return HeadKVConfig(frozenset(), sink, window, prefill_chunk, compensate, prefill_mode, memory=memory,
                            memory_full=memory_full, importance=tuple((k, kv[k]) for k in choosable(model_config)))
    if head_tokens < 0:
        raise AttnkitError(f"the token budget must be >= 0 tokens per head, got {head_tokens}")
    if head_tokens and prefill_mode != "full":
        raise AttnkitError("token budgets are chosen from the whole prompt: they need the full prefill")
    chosen = choose_full_heads(scores, model_config, how, full, count, reduce, seed, spread)
    budgets = {}
    if head_tokens:
        sets = _score_sets(scores)
        if split == "importance" and not sets:
            raise AttnkitError("token budgets by importance need a score file (or split 'uniform')")
        layers, heads, kv_heads = model_shape(model_config)
        importance = combine(sets, layers, heads, kv_heads, reduce) if sets else None
        budgets = token_budgets(importance, [k for k in choosable(model_config) if k not in chosen], head_tokens, split)
    return HeadKVConfig(chosen, sink, window, prefill_chunk, compensate, prefill_mode, budgets)


def load_score_sets(paths) -> list[dict] | None:
    """Score files (a path, a list of paths, or None) read; several are combined when heads are chosen."""
    from attnkit.heads.scores import load_scores

    if paths is None:
        return None
    paths = [paths] if not isinstance(paths, (list, tuple)) else list(paths)
    return [load_scores(p) for p in paths] or None


RECIPE = ("echo", "induction")  # measured on the loaded model and combined with the given score files


def with_recipe(kv: HeadKVConfig, model, tokenizer, scores: list, full: float, head_tokens: int = 0) -> HeadKVConfig:
    """The recipe (on by default): the score files `scores` combined with echo and induction scores
    (RazorAttention's patterns, measured in a few seconds on the loaded model), the full heads chosen
    again with `kv`'s other settings."""
    from attnkit.heads.patterns import pattern_scores

    echo, induction = pattern_scores(model, tokenizer)
    return plan(load_score_sets(scores) + [echo, induction], model.config, "retrieval", full, sink=kv.sink,
                window=kv.window, prefill_chunk=kv.prefill_chunk, compensate=kv.compensate,
                prefill_mode=kv.prefill, head_tokens=head_tokens, memory=kv.memory, memory_full=kv.memory_full)
