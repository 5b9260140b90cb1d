"""One prefill, many caches: a prompt run once, then the cache each system would hold after its own prefill.

With `prefill="full"` every KV head of the retrieval-head cache reads the whole prompt; the cache is
trimmed only when the prompt ends (`HeadKVLayer.end_prefill`). The prompt's forward pass is therefore
the same for the full cache and for every such cache, whatever its full heads, sink, window, token
budgets or compensation token: only what each keeps afterwards differs. A benchmark comparing ten
caches on 8K prompts need not run every prompt ten times.

    shared = HeadKVConfig.prefill_once(model, ids, mask)  # one forward over the prompt
    for technique in (None, recipe_cfg, budget_cfg):     # None / PLAIN: the model's own cache
        out = generate(model, tok, ids, mask, technique, 20, prefilled=shared.start(model, technique))

`HeadKVConfig.prefill_once` runs the prompt into a recording cache (`record_prefill`): every full-attention layer keeps every key and
value of every KV head (a `HeadKVCache` that never trims) and the prompt's last queries, which token
budgets are chosen by. `SharedPrefill.start(model, technique)` builds, from copies of those tensors,
the cache `technique` would hold after its own prefill, its prompt not yet ended, then ends it (the
trim and the budgets' choice run as they would), and hands it to `generate` with the prompt's last
logits. The equality with separate prefills is tested token for token (tests/test_kvfork.py). A
window prefill (window heads see only their window during the prompt) changes the forward pass
itself, so it cannot share; neither can Attention Buckets (one model row per base).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from attnkit.core.family import architecture
from attnkit.core.generate import Plain, Prefilled, prefill
from attnkit.kvcache.attention import query_heads
from attnkit.kvcache.cache import HeadKVCache, head_kv
from attnkit.kvcache.layer import HeadKVLayer
from attnkit.errors import AttnkitError


class Recorder(HeadKVCache):
    """Every full-attention KV head windowed with a token budget (so each keeps every key and the last
    queries while the prompt runs) and a prompt that never ends: nothing is trimmed or chosen."""

    def end_prefill(self) -> None:
        pass

    def expect_prompt(self, tokens: int) -> None:
        pass


@dataclass
class SharedPrefill:
    """A prompt run once (`prefill_once`); `start` gives each technique its own cache from it."""

    cache: Recorder
    logits: torch.Tensor  # [rows, vocab]: the prompt's last-position logits
    select_window: int  # the most observed queries a token budget may ask for

    def start(self, model, technique=None) -> Prefilled:
        """The cache `technique` (None / `Plain`: the model's own; a `HeadKVConfig` with prefill
        "full") holds after its own prefill of this prompt, with the prompt's last logits."""
        if technique is None or isinstance(technique, Plain):
            return Prefilled(self._dynamic(model), self.logits)
        if not hasattr(technique, "prefill_once"):  # not a retrieval-head cache's record
            raise AttnkitError(f"a shared prefill serves the full cache and retrieval-head caches, not "
                               f"{type(technique).__name__}")
        if getattr(technique, "memory", 0):  # a memory target: its plan at this prompt's length
            tokens = next(layer.seen for layer in self.cache.layers if isinstance(layer, HeadKVLayer))
            technique = technique.resolve(architecture(model.config), tokens)
        if technique.prefill != "full":
            raise AttnkitError("a shared prefill serves caches with prefill 'full': a window prefill changes "
                               "the prompt's forward pass itself")
        if technique.budgets and technique.select_window > self.select_window:
            raise AttnkitError(f"this prefill kept the last {self.select_window} queries; the cache asks for "
                               f"{technique.select_window} (prefill_once(select_window=...))")
        cache = HeadKVCache(model, technique)
        group = architecture(model.config).group
        for i, (mine, seen) in enumerate(zip(cache.layers, self.cache.layers)):
            if isinstance(mine, HeadKVLayer):
                _fill(mine, seen, group)
            else:
                cache.layers[i] = copy.deepcopy(seen)  # a native sliding layer: the model's own
        cache.end_prefill()
        return Prefilled(cache, self.logits)

    def _dynamic(self, model):
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for i, seen in enumerate(self.cache.layers):
            if isinstance(seen, HeadKVLayer):
                cache.layers[i].update(seen.win_keys, seen.win_values)  # update concatenates: a copy of its own
            else:
                cache.layers[i] = copy.deepcopy(seen)
        return cache


def _fill(layer: HeadKVLayer, seen: HeadKVLayer, group: int) -> None:
    """`layer` as its own full prefill would leave it before the prompt's end, from the recording
    layer `seen`, which holds every KV head in its window store."""
    if not layer.full_prefill:
        raise AttnkitError("a shared prefill serves caches with prefill 'full'")
    keys, values = seen.win_keys, seen.win_values  # [b, kv heads, n, d]: every head, every position
    layer.lazy_initialization(keys, values)
    layer.seen = seen.seen
    if layer.full:
        layer.keys, layer.values = keys.index_select(1, layer._full_idx), values.index_select(1, layer._full_idx)
    if not layer.windowed:
        return
    real = seen._real  # [b, n] which positions are real tokens
    rank = real.long().cumsum(-1) - 1
    layer.win_keys, layer.win_values = keys.index_select(1, layer._win_idx), values.index_select(1, layer._win_idx)
    layer.win_pos = seen.win_pos.clone()
    layer.win_sink = real & (rank < layer.sink)
    layer.valid_count = real.sum(-1)
    layer._real = real.clone()
    if layer.choosing:
        queries, positions, scale = seen._obs  # queries of every query head, in head order
        idx = query_heads(layer.windowed, group, queries.device)
        w = layer.select_window
        layer._obs = (queries.index_select(1, idx)[:, :, -w:], positions[-w:], scale)


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor, attention_mask, config, chunk: int | None) -> SharedPrefill:
    """The prompt rows run into a recording cache of `config` (every KV head windowed with a token
    budget, so it keeps every key, and the last queries; built by `HeadKVConfig.prefill_once`)."""
    device = next(model.parameters()).device
    mask = attention_mask.to(device) if attention_mask is not None else None
    with head_kv(model, config):
        cache = Recorder(model, config)
        out = prefill(model, input_ids.to(device), mask, cache, chunk)
    return SharedPrefill(cache, out.logits[:, -1], config.select_window)
