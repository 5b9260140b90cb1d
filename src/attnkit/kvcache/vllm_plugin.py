"""The retrieval-head KV cache inside vLLM: a vLLM plugin (entry point `vllm.general_plugins`).

Runs in vLLM's environment, not attnkit's: it imports vLLM and nothing of attnkit's core. It registers
the architecture `AttnkitHeadSplitLlama`, a Llama-family model (Llama, SmolLM2, Mistral-style GQA) whose
attention layers are split per KV head: each KV head, with the query heads that read it, is an
attention layer of its own for vLLM, so it gets its own KV-cache spec. Heads of the plan's full set
keep vLLM's full-attention cache; the others a sliding window, which vLLM's hybrid KV-cache manager
stores in window-sized memory (blocks before the window are freed). One KV head per vLLM layer keeps
every page the same size, which that manager requires.

The plan travels in the model config (`--hf-overrides`), so every vLLM process sees it:

    {"architectures": ["AttnkitHeadSplitLlama"],
     "attnkit_kv_plan": {"full": [[layer, kv_head], ...], "window": 128}}

`attnkit serve --engine vllm --technique kv-cache ...` writes it (`heads.technique.vllm_overrides`). What vLLM's window cannot do: keep
the sink tokens that attnkit's window heads keep (its sliding-window manager frees every block before
the window, from the first token on), so the vLLM form is a window without sink; attnkit's own cache
gives the same form with `--kv-sink 0 --kv-prefill window`, and the two decode the same tokens.
"""

from __future__ import annotations

import functools

ARCHITECTURE = "AttnkitHeadSplitLlama"
PLAN_KEY = "attnkit_kv_plan"
BASES = ("LlamaForCausalLM",)  # the architectures whose vLLM class the split extends


def register() -> None:
    """vLLM calls this in every process (API server, engine core, workers) before it builds a model."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "attnkit.kvcache.vllm_plugin:HeadSplitLlamaForCausalLM")


def _head_letters(h: int) -> str:
    """A head's name inside a layer name: vLLM reads the layer index as the name's only integer."""
    out = ""
    while True:
        out = chr(ord("a") + h % 26) + out
        h = h // 26 - 1
        if h < 0:
            return out


@functools.lru_cache(maxsize=1)
def _model_classes():
    """The classes, built on first use so that `register` imports nothing heavy."""
    import torch
    from torch import nn
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
    from vllm.model_executor.models.utils import extract_layer_index

    class HeadSplitLlamaAttention(LlamaAttention):
        """LlamaAttention with one vLLM attention layer per KV head: full or sliding window by the plan."""

        def __init__(self, config, *args, prefix: str = "", cache_config=None, quant_config=None, **kwargs):
            super().__init__(config, *args, prefix=prefix, cache_config=cache_config, quant_config=quant_config,
                             **kwargs)
            plan = getattr(config, PLAN_KEY, None)
            if not isinstance(plan, dict) or "full" not in plan or "window" not in plan:
                raise ValueError(f"{ARCHITECTURE} needs the config field {PLAN_KEY} "
                                 "({'full': [[layer, kv_head], ...], 'window': W}) through --hf-overrides")
            if self.total_num_kv_heads != self.num_kv_heads:
                raise ValueError(f"{ARCHITECTURE} runs without tensor parallelism (one KV head per vLLM layer)")
            layer = extract_layer_index(prefix)
            full = {(int(lay), int(h)) for lay, h in plan["full"]}
            # the one attention layer LlamaAttention made goes: its name would get a full cache of its own
            del get_current_vllm_config().compilation_config.static_forward_context[f"{prefix}.attn"]
            del self.attn
            self.group = self.num_heads // self.num_kv_heads  # query heads per KV head
            self.heads = nn.ModuleList(
                Attention(self.group, self.head_dim, self.scaling, num_kv_heads=1, cache_config=cache_config,
                          quant_config=quant_config,
                          per_layer_sliding_window=None if (layer, h) in full else int(plan["window"]),
                          prefix=f"{prefix}.attn_{_head_letters(h)}")
                for h in range(self.num_kv_heads))

        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = self.rotary_emb(positions, q, k)
            d = self.head_dim
            q = q.view(-1, self.num_kv_heads, self.group * d)  # [tokens, kv heads, its query heads x dim]
            k, v = k.view(-1, self.num_kv_heads, d), v.view(-1, self.num_kv_heads, d)
            out = torch.cat([attn(q[:, h].contiguous(), k[:, h].contiguous(), v[:, h].contiguous())
                             for h, attn in enumerate(self.heads)], dim=-1)  # [tokens, heads x dim], head order
            output, _ = self.o_proj(out)
            return output

    class HeadSplitLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, *, vllm_config, prefix: str = ""):
            def layer(*args, **kwargs):
                return LlamaDecoderLayer(*args, attn_layer_type=HeadSplitLlamaAttention, **kwargs)
            super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)

    return HeadSplitLlamaForCausalLM


def __getattr__(name: str):
    if name == "HeadSplitLlamaForCausalLM":
        return _model_classes()
    raise AttributeError(name)
