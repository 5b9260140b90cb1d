"""A KV cache that keeps every token for some KV heads and only sink + recent tokens for the others.

Per layer, each KV head is `full` (keeps all keys) or `window` (keeps the first `sink` real tokens
and the last `window` tokens). A query at position t of a window head sees keys [0, sink) and
(t - window, t] and nothing else, in prefill and in decoding (DuoAttention / RazorAttention's
streaming heads). Two pieces work together:

* `HeadKVCache`, a transformers `Cache` of `HeadKVLayer`s. `update` appends to the full heads and
  returns their keys as usual; the window heads' candidate keys are left on the layer for
* the attention function `attnkit_kv_<base>`, registered with `AttentionInterface` like the hook's.
  It attends the full heads with the model's own mask, the window heads with that mask gathered at
  the kept key positions and restricted to sink + window, writes both into the model's head order,
  and then trims the window heads back to sink + window tokens.

The hand-off is explicit: transformers' attention modules pass their forward's keyword arguments to
`cache.update(..., kwargs=kwargs)` and then splat the same dict into the attention function, so
`update` puts its layer there (`KV_LAYER_KWARG`) and the attention function takes it out. Keys are
stored after RoPE, so they keep their positions.

With `prefill="full"` nothing leaves during the prompt: every head reads all of it, in any chunks, and
`end_prefill()` (called by `core.generate.prefill` once the prompt is in) trims the window heads. A
window head with a **token budget** then first keeps its middle tokens (neither sink nor window) that
the prompt's last `select_window` queries attended most, averaged and pooled as SnapKV does; they sit
in a store of their own per head (`mid`: keys, values, positions; -1 marks an empty slot) that later
queries of that head read beside the window store, one attention call per such head.

Hybrid models (Gemma 3: five sliding-window layers per global layer) keep their native sliding
layers as transformers' own `DynamicSlidingWindowLayer`: those already hold only their window, so
full-cache heads are chosen among the full-attention layers alone, and sizes are counted per layer
type (`kv_bytes`, `native_kv_bytes`).

    out = generate(model, tok, ids, technique=HeadKVConfig(full={(5, 3), (6, 1)}, sink=16, window=128))
    with head_kv(model, config) as kv:                  # or by hand / with transformers' generate
        out = kv.generate(**inputs, max_new_tokens=20)   # chunked prefill, then decoding
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import Cache

from attnkit.core.decode import cache_kwarg
from attnkit.core.family import architecture
from attnkit.core.generate import Session
from attnkit.core.hook import swap
from attnkit.errors import AttnkitError
from attnkit.kvcache.attention import KV_LAYER_KWARG, SUPPORTED_BASES, make_attention
from attnkit.kvcache.layer import HeadKVLayer

KV_PREFIX = "attnkit_kv_"  # the attention functions this cache registers (`attnkit_kv_sdpa`, ...)
WHAT = "the retrieval-head KV cache"


class HeadKVCache(Cache):
    """A transformers `Cache` of `HeadKVLayer`s; usable only where `head_kv(model, ...)` is active."""

    def __init__(self, model, config, ends_prompt: bool | int = False):  # config: a kvcache.config.HeadKVConfig
        from transformers.cache_utils import DynamicSlidingWindowLayer

        if getattr(config, "memory", 0):
            raise AttnkitError("a memory target is planned per prompt, when it ends: run it through "
                               "config.prepare(model) (kvcache.target), not head_kv")
        arch = architecture(model.config)
        config.check(arch)
        self._model_config = model.config
        layers = [DynamicSlidingWindowLayer(sliding_window=arch.windows[i]) if kind == "sliding" else
                  HeadKVLayer(i, arch.kv_heads, [h for l, h in config.full if l == i], config.sink, config.window,
                              config.compensate, config.prefill == "full",
                              {h: n for (l, h), n in config.budgets if l == i}, config.select_window,
                              config.select_kernel)
                  for i, kind in enumerate(arch.layer_types)]
        super().__init__(layers=layers)
        # transformers' generate never says where the prompt ends: with `ends_prompt` the cache says it
        # itself (what a full prefill waits for): True, at the first one-token step after a longer one;
        # an int, once that many positions (the prompt's, padding included) are in
        self.ends_prompt = ends_prompt
        self._first = next((i for i, layer in enumerate(layers) if isinstance(layer, HeadKVLayer)), None)
        # the most key and value bytes held at once so far, read after each layer's update (its window heads'
        # candidate keys included: the store and the prompt's new keys, which its attention reads next)
        self.peak_kv_bytes = 0

    def update(self, key_states, value_states, layer_idx, *args, kwargs: dict | None = None, **_):
        if not self._model_config._attn_implementation.startswith(KV_PREFIX):
            raise AttnkitError("this KV cache works only inside attnkit's head_kv(model, ...) block")
        if self.ends_prompt and layer_idx == self._first and self._prompt_is_in(key_states.shape[2]):
            self.end_prefill()  # the first decoding step: the prompt before it has ended
            self.ends_prompt = False  # found once: decoding steps look no more
        layer = self.layers[layer_idx]
        if isinstance(layer, HeadKVLayer):
            if kwargs is None:
                raise AttnkitError("this model's attention does not pass its keyword arguments to the cache "
                                   "(cache.update(..., kwargs=kwargs)), which the retrieval-head KV cache needs")
            kwargs[KV_LAYER_KWARG] = layer
        out = layer.update(key_states, value_states)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes() + (
            layer.pending_bytes() if isinstance(layer, HeadKVLayer) else 0))
        return out

    def expect_prompt(self, tokens: int) -> None:
        """`tokens` more prompt tokens are coming (`core.generate.prefill` says so before its first forward):
        each layer then ends its prefill (trims, chooses its budgets' tokens) right after its attention has
        read the last of them, so at most one layer holds its whole prompt at a time: with the prompt in
        one forward, the peak is the trimmed cache plus one layer's full keys, as when a press compresses
        each layer in its forward hook."""
        for layer in self.layers:
            if isinstance(layer, HeadKVLayer) and layer.holding:
                layer.ends_at = layer.seen + tokens

    def _prompt_is_in(self, new: int) -> bool:
        held = [x for x in self.layers if isinstance(x, HeadKVLayer) and x.holding and x.seen > 0]
        if not held:
            return False
        if self.ends_prompt is True:
            return new == 1
        return held[0].seen >= int(self.ends_prompt)

    def end_prefill(self) -> None:
        """The prompt has ended (`core.generate.prefill` says so): heads with token budgets choose their
        middle tokens now (a later prompt chunk, e.g. a question given after compression, then reads them)."""
        for layer in self.layers:
            if isinstance(layer, HeadKVLayer):
                layer.end_prefill()
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes())

    def kv_bytes(self) -> int:
        """Bytes of keys and values held now."""
        return sum(layer.kv_bytes() if isinstance(layer, HeadKVLayer) else
                   sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)
                       if isinstance(t, torch.Tensor))
                   for layer in self.layers)


class HeadKV(Session):
    """What `head_kv` yields: the session of `core.generate` for this cache (a fresh `HeadKVCache` per
    generation, prefill in chunks), plus prefill and `model.generate` by hand."""

    def __init__(self, model, config):  # config: a kvcache.config.HeadKVConfig
        super().__init__(model)
        self.config, self.prefill_chunk = config, config.prefill_chunk

    def new_cache(self, ends_prompt: bool | int = False):
        """A fresh cache; `ends_prompt`: for transformers' generate, which never says where the prompt ends
        (True: the cache ends it at the first one-token step; the prompt's length in tokens, padding
        included: once that many are in, which a chunked prefill's one-token last chunk needs)."""
        return HeadKVCache(self.model, self.config, ends_prompt)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, **forward):
        """Run the prompt through the model in chunks of `prefill_chunk` tokens; returns (last output, cache)."""
        from attnkit.core.generate import prefill

        cache = cache if cache is not None else self.new_cache()
        return prefill(self.model, input_ids, attention_mask, cache, self.prefill_chunk, **forward), cache

    def generate(self, **kwargs):
        """`model.generate` with a fresh cache of this kind and chunked prefill; a full prefill's cache ends
        the prompt itself at the first one-token step (the tokens equal `attnkit.generate`'s, tested)."""
        kwargs.setdefault("prefill_chunk_size", self.config.prefill_chunk)
        ids = kwargs.get("input_ids")
        cache = self.new_cache(ends_prompt=ids.shape[1] if ids is not None else True)
        return self.model.generate(**cache_kwarg(self.model, cache), **kwargs)


@contextmanager
def head_kv(model, config):
    """Inside the block the model's attention understands `HeadKVCache` (`config`: a
    `kvcache.config.HeadKVConfig`); other caches work as before."""
    config.check(architecture(model.config))
    with swap(model, KV_PREFIX, WHAT, make_attention, SUPPORTED_BASES):
        yield HeadKV(model, config)
