"""The retrieval-head KV cache inside vLLM: a vLLM plugin (entry point `vllm.general_plugins`).

Runs in vLLM's environment, not attnkit's; this file imports nothing of vLLM until vLLM calls
`register`, so attnkit reads its names (architectures, the plan's form) without vLLM installed. The
vLLM classes live in `vllm_engine.py`.

It registers one architecture per supported base (`ARCHITECTURES`): the stock vLLM model whose attention
layers are split per KV head. Each KV head, with the query heads that read it, is an attention layer of
its own for vLLM, so it gets its own KV-cache spec: heads of the plan's full set keep vLLM's full-attention
cache; the others a sliding window that also keeps the first `sink` tokens (a cache spec and block
manager of attnkit's: the blocks between the sink blocks and the window are freed, as vLLM's own window
frees the blocks behind it). One KV head per vLLM layer keeps every page the same size, which vLLM's
hybrid cache manager requires.

The plan travels in the model config (`--hf-overrides`), so every vLLM process sees it:

    {"architectures": ["AttnkitHeadSplitQwen2"],
     "attnkit_kv_plan": {"full": [[layer, kv_head], ...], "window": 128, "sink": 16}}

`attnkit serve --engine vllm --technique kv-cache ...` writes it (`kvcache.technique.vllm_overrides`),
with the plan's prefill: "full" (the default: window heads read the whole prompt, their blocks held until
it ends, then trimmed to sink + window) or "window" (window heads attend within sink + window during
prefill too, their blocks freed as it moves on). attnkit's own cache with the same plan and prefill
decodes the same tokens (tested, greedy, float32).
"""

from __future__ import annotations

from attnkit.kvcache.vllm_form import ARCHITECTURES


def register() -> None:
    """vLLM calls this in every process (API server, engine core, workers) before it builds a model."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for ours in ARCHITECTURES.values():
        if ours not in known:
            ModelRegistry.register_model(ours, f"attnkit.kvcache.vllm_engine:{ours}")
    from attnkit.kvcache.vllm_engine import register_cache_spec

    register_cache_spec()
