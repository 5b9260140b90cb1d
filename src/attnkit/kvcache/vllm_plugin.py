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

`attnkit serve --engine vllm --technique kv-cache ...` writes it (`kvcache.technique.vllm_overrides`).
Window heads attend within sink + window during prefill too: attnkit's own cache with
`--kv-prefill window` and the same plan decodes the same tokens (tested, greedy, float32).
"""

from __future__ import annotations

ARCHITECTURES = {"LlamaForCausalLM": "AttnkitHeadSplitLlama", "MistralForCausalLM": "AttnkitHeadSplitMistral",
                 "Qwen2ForCausalLM": "AttnkitHeadSplitQwen2", "Qwen3ForCausalLM": "AttnkitHeadSplitQwen3"}
ARCHITECTURE = ARCHITECTURES["LlamaForCausalLM"]
BASES = tuple(ARCHITECTURES)  # the Hugging Face architectures whose vLLM class the split extends
PLAN_KEY = "attnkit_kv_plan"


def register() -> None:
    """vLLM calls this in every process (API server, engine core, workers) before it builds a model."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for ours in ARCHITECTURES.values():
        if ours not in known:
            ModelRegistry.register_model(ours, f"attnkit.kvcache.vllm_engine:{ours}")
    from attnkit.kvcache.vllm_engine import register_cache_spec

    register_cache_spec()


def read_plan(plan) -> dict:
    """The plan from the model config, checked: {'full': {(layer, kv_head), ...}, 'window': W, 'sink': S}."""
    form = f"the config field {PLAN_KEY} ({{'full': [[layer, kv_head], ...], 'window': W, 'sink': S}})"
    if not isinstance(plan, dict) or "full" not in plan or "window" not in plan:
        raise ValueError(f"attnkit's split architectures need {form} through --hf-overrides")
    window, sink = int(plan["window"]), int(plan.get("sink", 0))
    if window < 1 or sink < 0:
        raise ValueError(f"{form}: the window must be at least 1 and the sink at least 0")
    return {"full": {(int(layer), int(h)) for layer, h in plan["full"]}, "window": window, "sink": sink}


def head_letters(h: int) -> str:
    """A head's name inside a layer name: vLLM reads the layer index as the name's only integer."""
    out = ""
    while True:
        out = chr(ord("a") + h % 26) + out
        h = h // 26 - 1
        if h < 0:
            return out
