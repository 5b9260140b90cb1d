"""The vLLM side of the retrieval-head KV cache: what `vllm_plugin.register` installs inside vLLM.

Imported only in vLLM's environment (it imports vLLM at the top). In reading order:

1. `SinkWindowSpec` and `SinkWindowManager`: a sliding-window KV-cache spec that also holds the first
   `sink_len` tokens, and its block manager. vLLM's own sliding-window manager frees every block behind
   the window, the first ones too; this one frees the blocks between the sink blocks and the window, so
   a window head's memory stays sink blocks + window blocks whatever the sequence's length, and vLLM's
   admission counts those sink blocks (`max_admission_blocks_per_request`). With `full_prefill` it
   frees nothing until the prompt's last token is computed (vLLM tells a manager the prompt's length),
   then everything between the sinks and the window at once; admission then reserves the whole prompt
   for these heads too, since a prompt holds it until its prefill ends.
2. `SinkWindowImpl` and `SinkWindowBackend`: attention for those layers. vLLM's CPU kernel masks every
   key left of the window, sinks included, so these layers attend in torch: each decoding query reads
   the sink tokens and its last `window` tokens (key position k is seen by query position p when k <= p
   and (k < sink or k > p - window)). Prefill queries read the same keys (the semantics of attnkit's own
   cache with `prefill="window"`) or, with `full_prefill`, every earlier key of the prompt (attnkit's
   `prefill="full"`: every head reads the whole prompt, the cache is trimmed when it ends). The layer's
   cache holds keys and values in a plain [block, kv head, slot, dim] layout that this impl writes and
   reads itself.
3. `HeadSplit`: one model's attention layer split per KV head, each KV head (with its query heads) a vLLM
   attention layer of its own with the plan's cache: full, or sink + window.
4. `split_model` and the registered model classes: the stock vLLM model for Llama, Mistral, Qwen2 and
   Qwen3, built as vLLM builds it, then every decoder layer's `self_attn.attn` swapped for a `HeadSplit`
   (the model's own projections, norms and rotary embedding stay untouched).

Prefix caching is refused for a sink + window layer (its cache hits would need the sink blocks too):
`attnkit serve --engine vllm` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from attnkit.kvcache.vllm_form import ARCHITECTURES, PLAN_KEY, head_letters, read_plan

QUERY_CHUNK = 256  # prefill queries attended at once (each chunk reads sink + window + chunk keys)


# ---------------------------------------------------------------- 1. the cache: sink blocks + window blocks

@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """A sliding window that also keeps the blocks holding the first `sink_len` tokens."""

    sink_len: int = 0
    full_prefill: bool = False  # the whole prompt held (and read) until its prefill ends

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sink_len, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        if self.full_prefill:  # a prompt holds every block until its prefill ends: reserve as a full head does
            return cdiv(max_model_len, self.block_size)
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + self.sink_blocks, cdiv(max_model_len, self.block_size) + 1)


class SinkWindowManager(SlidingWindowManager):
    """vLLM's sliding-window manager, freeing [sink blocks, first block the window still reads); with
    `full_prefill`, only once the prompt's tokens are all computed."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        if self.enable_caching:
            raise ValueError("attnkit's sink + window heads cannot share prefix-cache blocks: start vLLM with "
                             "--no-enable-prefix-caching")
        self.sink_blocks = kv_cache_spec.sink_blocks
        self.full_prefill = kv_cache_spec.full_prefill

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if self.full_prefill and (num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens):
            return  # the prompt's later queries still read every key
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        if skipped <= 0 or request_id not in self.req_to_blocks:
            return
        last = min(skipped // self.block_size, len(self.req_to_blocks[request_id]))
        self._remove_blocks_in_range(request_id, self.sink_blocks, last)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0  # never reached: caching is refused above


def register_cache_spec() -> None:
    """Register the spec with vLLM (after its built-in specs: the registry fills itself only when empty)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SlidingWindowSpec)


# ---------------------------------------------------------------- 2. attention over sink + window

def _halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [blocks, kv heads, block size, dim] of a layer's cache [blocks, kv heads, block size, 2 dim]."""
    blocks, heads, size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, 2 * size, -1).chunk(2, dim=2)


class SinkWindowImpl(CPUAttentionBackendImpl):
    """Attention of a sink + window layer; `sink` and `full_prefill` are set by `SinkWindowAttention`."""

    sink: int = 0
    full_prefill: bool = False

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        keys, values = _halves(kv_cache)
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        real = slots >= 0
        if not bool(real.all()):
            slots, key, value = slots[real], key[:n][real], value[:n][real]
        else:
            key, value = key[:n], value[:n]
        size = keys.shape[2]
        keys[slots // size, :, slots % size] = key.to(keys.dtype)
        values[slots // size, :, slots % size] = value.to(values.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query [tokens, heads, dim]; output [tokens, heads, dim], written in place."""
        if attn_metadata is None:  # warm-up
            return output
        keys, values = _halves(kv_cache)
        size = keys.shape[2]
        starts = attn_metadata.query_start_loc.tolist()
        lengths = attn_metadata.seq_lens.tolist()
        table = attn_metadata.block_table
        heads, kv_heads = self.num_heads, self.num_kv_heads
        group = heads // kv_heads
        one = [i for i in range(len(lengths)) if starts[i + 1] - starts[i] == 1]
        if one:  # decoding requests together: each reads sink + window keys, gathered in one go
            self._decode(query, keys, values, table, starts, lengths, one, output, attn_metadata)
        for i, length in enumerate(lengths):
            a, b = starts[i], starts[i + 1]
            if b - a <= 1:
                continue
            first = length - (b - a)  # position of the request's first query in this step
            for c0 in range(first, length, QUERY_CHUNK):
                c1 = min(c0 + QUERY_CHUNK, length)
                # the chunk's first query reads from `low` (and the sinks before it)
                low = 0 if self.full_prefill else max(0, c0 - self.sliding_window + 1)
                pos = torch.cat([torch.arange(min(self.sink, low)), torch.arange(low, c1)])
                blocks = table[i, pos // size].long()
                k = keys[blocks, :, pos % size].float()  # [keys, kv heads, dim]
                v = values[blocks, :, pos % size].float()
                q = query[a + c0 - first:a + c1 - first].float().view(c1 - c0, kv_heads, group, -1)
                q_pos = torch.arange(c0, c1)[:, None]
                seen = pos[None] <= q_pos  # [queries, keys]
                if not self.full_prefill:
                    seen &= (pos[None] < self.sink) | (pos[None] > q_pos - self.sliding_window)
                shape = (kv_heads, group, len(pos), k.shape[-1])  # every query head of a KV head reads its keys
                out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.transpose(0, 1)[:, None].expand(shape),
                                                     v.transpose(0, 1)[:, None].expand(shape), attn_mask=seen,
                                                     scale=self.scale)  # [kv heads, group, queries, dim]
                output[a + c0 - first:a + c1 - first] = out.permute(2, 0, 1, 3).reshape(c1 - c0, heads, -1).to(output.dtype)
        return output

    def _decode_index(self, attn_metadata, table, starts, lengths, rows, size):
        """Where the decoding rows' sink + window keys lie: (query index [R], blocks [R, P], positions
        [R, P], seen [R, P]). The same for every layer of the group in a step, so kept on the step's
        metadata and built once."""
        key = (self.sink, self.sliding_window, size)
        found = getattr(attn_metadata, "_attnkit_decode_index", None)
        if found is not None and found[0] == key:
            return found[1]
        at = torch.tensor([starts[i] for i in rows])
        last = torch.tensor([lengths[i] - 1 for i in rows])[:, None]  # [R, 1]
        pos = torch.cat([torch.arange(self.sink).expand(len(rows), -1),
                         last - self.sliding_window + 1 + torch.arange(self.sliding_window)], dim=1)  # [R, P]
        seen = (pos >= 0) & (pos <= last) & ((pos < self.sink) | (pos > last - self.sliding_window))
        seen[:, self.sink:] &= pos[:, self.sink:] >= self.sink  # a window position inside the sink: read once
        pos = pos.clamp(0)
        blocks = table[torch.tensor(rows)[:, None], pos // size].long()
        attn_metadata._attnkit_decode_index = (key, (at, blocks, pos, seen))
        return at, blocks, pos, seen

    def _decode(self, query, keys, values, table, starts, lengths, rows, output, attn_metadata) -> None:
        """One query per request in `rows`: keys at positions [0, sink) and (p - window, p], where p
        is the request's last position; positions past p or below 0 masked."""
        at, blocks, pos, seen = self._decode_index(attn_metadata, table, starts, lengths, rows, keys.shape[2])
        size = keys.shape[2]
        k = keys[blocks, :, pos % size].float()  # [R, P, kv heads, dim]
        v = values[blocks, :, pos % size].float()
        q = query[at].float().view(len(rows), self.num_kv_heads, self.num_heads // self.num_kv_heads, -1)
        logits = torch.einsum("rhgd,rphd->rhgp", q, k) * self.scale
        weights = logits.masked_fill(~seen[:, None, None], float("-inf")).softmax(-1)
        out = torch.einsum("rhgp,rphd->rhgd", weights, v)
        output[at] = out.reshape(len(rows), self.num_heads, -1).to(output.dtype)


class SinkWindowBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return SinkWindowImpl


class SinkWindowAttention(Attention):
    """A vLLM attention layer whose cache keeps `sink` first tokens beside its sliding window (and, with
    `full_prefill`, the whole prompt until its prefill ends)."""

    def __init__(self, *args, sink: int, full_prefill: bool = False, **kwargs):
        super().__init__(*args, attn_backend=SinkWindowBackend, **kwargs)
        self.sink, self.full_prefill = sink, full_prefill
        self.impl.sink, self.impl.full_prefill = sink, full_prefill

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        given = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
        return SinkWindowSpec(**given, sink_len=self.sink, full_prefill=self.full_prefill)


# ---------------------------------------------------------------- 3. one attention layer, split per KV head

class HeadSplit(nn.Module):
    """Takes the place of a decoder layer's `self_attn.attn`: q [tokens, heads x dim], k and v
    [tokens, kv heads x dim] in, [tokens, heads x dim] out, each KV head through its own vLLM layer."""

    def __init__(self, stock: Attention, layer: int, plan: dict, cache_config, quant_config):
        super().__init__()
        self.kv_heads, self.dim = stock.num_kv_heads, stock.head_size
        self.group = stock.num_heads // self.kv_heads  # query heads per KV head
        full = {tuple(h) for h in plan["full"]}
        # a window head: vLLM's own window where it does the same (no sink, window prefill), attnkit's otherwise
        full_prefill = plan["prefill"] == "full"
        ours = plan["sink"] > 0 or full_prefill
        heads = []
        for h in range(self.kv_heads):
            windowed = (layer, h) not in full
            kind, extra = ((SinkWindowAttention, {"sink": plan["sink"], "full_prefill": full_prefill})
                           if windowed and ours else (Attention, {}))
            heads.append(kind(self.group, self.dim, stock.impl.scale, num_kv_heads=1, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{stock.layer_name}_{head_letters(h)}",
                              # a full head keeps the model's own window (None would inherit it anyway)
                              per_layer_sliding_window=plan["window"] if windowed else stock.sliding_window,
                              **extra))
        self.heads = nn.ModuleList(heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = q.view(-1, self.kv_heads, self.group * self.dim)
        k, v = k.view(-1, self.kv_heads, self.dim), v.view(-1, self.kv_heads, self.dim)
        return torch.cat([attn(q[:, h].contiguous(), k[:, h].contiguous(), v[:, h].contiguous())
                          for h, attn in enumerate(self.heads)], dim=-1)


# ---------------------------------------------------------------- 4. the models

def split_model(model: nn.Module, vllm_config) -> None:
    """Swap every decoder layer's attention for its per-KV-head split, by the plan in the model config."""
    config = vllm_config.model_config.hf_config
    plan = read_plan(getattr(config, PLAN_KEY, None))
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        raise ValueError("attnkit's per-KV-head split runs without tensor parallelism (one KV head per vLLM layer)")
    context = get_current_vllm_config().compilation_config.static_forward_context
    for decoder in model.model.layers:
        attention = getattr(decoder, "self_attn", None)
        stock = getattr(attention, "attn", None)
        if not isinstance(stock, Attention):
            continue
        layer = extract_layer_index(stock.layer_name)
        del context[stock.layer_name]  # its name would get a full cache of its own
        attention.attn = HeadSplit(stock, layer, plan, vllm_config.cache_config, vllm_config.quant_config)


def _split(base: type) -> type:
    class Split(base):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            split_model(self, vllm_config)

    Split.__name__ = Split.__qualname__ = ARCHITECTURES[base.__name__]
    return Split


AttnkitHeadSplitLlama = _split(LlamaForCausalLM)
AttnkitHeadSplitMistral = _split(MistralForCausalLM)
AttnkitHeadSplitQwen2 = _split(Qwen2ForCausalLM)
AttnkitHeadSplitQwen3 = _split(Qwen3ForCausalLM)
