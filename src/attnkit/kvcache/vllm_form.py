"""The plan's vLLM form, shared by attnkit (`kvcache.technique.vllm_overrides` writes it) and the vLLM
side (`vllm_engine` reads it): the architectures the split registers, the model-config key that carries
the plan, the plan checked, and the names of the per-KV-head layers. Imports nothing.
"""

from __future__ import annotations

ARCHITECTURES = {"LlamaForCausalLM": "AttnkitHeadSplitLlama", "MistralForCausalLM": "AttnkitHeadSplitMistral",
                 "Qwen2ForCausalLM": "AttnkitHeadSplitQwen2", "Qwen3ForCausalLM": "AttnkitHeadSplitQwen3"}
ARCHITECTURE = ARCHITECTURES["LlamaForCausalLM"]
BASES = tuple(ARCHITECTURES)  # the Hugging Face architectures whose vLLM class the split extends
PLAN_KEY = "attnkit_kv_plan"


def read_plan(plan) -> dict:
    """The plan from the model config, checked: {'full': {(layer, kv_head), ...}, 'window': W, 'sink': S,
    'prefill': 'full' | 'window'} (a plan without 'prefill' is a window-prefill plan)."""
    form = (f"the config field {PLAN_KEY} ({{'full': [[layer, kv_head], ...], 'window': W, 'sink': S, "
            f"'prefill': 'full' | 'window'}})")
    if not isinstance(plan, dict) or "full" not in plan or "window" not in plan:
        raise ValueError(f"attnkit's split architectures need {form} through --hf-overrides")
    window, sink, prefill = int(plan["window"]), int(plan.get("sink", 0)), plan.get("prefill", "window")
    if window < 1 or sink < 0:
        raise ValueError(f"{form}: the window must be at least 1 and the sink at least 0")
    if prefill not in ("full", "window"):
        raise ValueError(f"{form}: the prefill is 'full' or 'window', not {prefill!r}")
    return {"full": {(int(layer), int(h)) for layer, h in plan["full"]}, "window": window, "sink": sink,
            "prefill": prefill}


def head_letters(h: int) -> str:
    """A head's name inside a layer name: vLLM reads the layer index as the name's only integer."""
    out = ""
    while True:
        out = chr(ord("a") + h % 26) + out
        h = h // 26 - 1
        if h < 0:
            return out
