"""The retrieval-head KV cache as a registered technique (`--technique kv-cache --set ...`): its options,
written once, for `niah`, `eval ruler` and `serve` (whose `--kv-*` options spell the same settings)."""

from __future__ import annotations

from attnkit.kvcache.config import FULL_FRACTION, KV_DEFAULTS
from attnkit.core.registry import Entry, Option, register

OPTIONS = (
    Option("scores", list, [], "score file(s) choosing the full-cache heads (comma-separated: combined); "
                               "default: the scores shipped for a pulled model"),
    Option("choose", str, "retrieval", "retrieval, random or none"),
    Option("full", float, FULL_FRACTION, "fraction of KV heads with the full cache"),
    Option("sink", int, KV_DEFAULTS.sink, "first tokens every window head keeps"),
    Option("window", int, KV_DEFAULTS.window, "recent tokens every window head sees"),
    Option("chunk", int, KV_DEFAULTS.prefill_chunk, "prefill chunk (tokens)"),
    Option("compensate", bool, False, "window heads keep a compensation token (RazorAttention)"),
    Option("prefill", str, "full", "full (every head reads the prompt, trimmed when it ends) or window"),
    Option("recipe", bool, True, "combine the score files with echo and induction scores measured on the model"),
    Option("head-tokens", int, 0, "middle tokens each window head also keeps, on average (token budgets)"),
    Option("memory", float, 0.0, "a memory target: the fraction of the model's own cache kept at each prompt's "
                                 "length (0: off); the full heads and token budgets are chosen per prompt, "
                                 "full and head-tokens do not apply"),
    Option("memory-full", float, 0.5, "with memory: the share of the target spent on full heads (the rest: "
                                      "token budgets by importance)"),
)


def build(model_config, s: dict):
    """The cache these settings describe, from the model's config alone (bad settings fail before any
    weights load); with the recipe on, `finish` chooses the full heads again once the model is loaded."""
    from attnkit.heads.scores import shipped_scores
    from attnkit.kvcache.plan import load_score_sets, plan

    if not s["scores"] and s["choose"] == "retrieval":  # a pulled model's own scores, shipped with attnkit
        found = shipped_scores(model_config)
        if found is not None:
            s["scores"] = [str(found)]  # the settings now name the file, for finish, the label and the report
    return plan(load_score_sets(s["scores"] or None), model_config, s["choose"], s["full"], sink=s["sink"],
                window=s["window"], prefill_chunk=s["chunk"], compensate=s["compensate"], prefill_mode=s["prefill"],
                head_tokens=s["head-tokens"], memory=s["memory"], memory_full=s["memory-full"])


def finish(kv, model, tokenizer, s: dict):
    from attnkit.kvcache.plan import with_recipe

    if not (s["recipe"] and s["choose"] == "retrieval" and s["scores"]):
        return kv
    return with_recipe(kv, model, tokenizer, s["scores"], s["full"], s["head-tokens"])


def chosen_by(s: dict) -> list[str]:
    """What chose the full heads, as `with_recipe` names it: the score files, and echo + induction
    when the recipe ran (retrieval choice, a file given)."""
    from pathlib import Path

    from attnkit.kvcache.plan import RECIPE

    names = [Path(p).stem for p in s["scores"]]
    return names + list(RECIPE) if s["choose"] == "retrieval" and s["recipe"] and names else names


def label(kv, s: dict) -> str:
    """The name result rows carry (the same as `niah --kv-*` rows always had, so old files resume)."""
    from attnkit.kvcache.compare import label as kv_label

    names = chosen_by(s)
    importance = "+".join(names) if len(names) > 1 else "retrieval"
    if kv.memory:  # the plan is chosen per prompt: the rows name the target and how it is spent
        return f"{importance} memory {kv.memory:g} full share {kv.memory_full:g} sink {kv.sink} window {kv.window}"
    return kv_label(s["choose"], s["full"], kv, importance=importance)


def report(kv, s: dict, summaries: dict) -> dict:
    if kv.memory:
        return {"cache": {"memory": kv.memory, "memory_full": kv.memory_full, "sink": kv.sink, "window": kv.window,
                          "prefill": kv.prefill, "chosen_by": chosen_by(s)}}
    return {"cache": {"full_heads": sorted(kv.full), "sink": kv.sink, "window": kv.window, "choose": s["choose"],
                      "full": s["full"], "prefill": kv.prefill, "head_tokens": s["head-tokens"],
                      "chosen_by": chosen_by(s) if s["choose"] == "retrieval" else []}}


def vllm_overrides(kv, model_config) -> dict:
    """The `--hf-overrides` that load the model in vLLM with the plugin's per-KV-head split
    (`kvcache/vllm_plugin.py`): full heads, sink + window heads; a clear error for what vLLM's cache
    does not hold."""
    from attnkit.errors import AttnkitError
    from attnkit.kvcache.vllm_form import ARCHITECTURES, PLAN_KEY

    archs = tuple(getattr(model_config, "architectures", None) or ())
    base = next((a for a in archs if a in ARCHITECTURES), None)
    if base is None:
        raise AttnkitError(f"the KV cache through vLLM runs on {', '.join(ARCHITECTURES)} models; "
                           f"this one is {', '.join(archs) or 'unnamed'}")
    if kv.compensate or kv.budgets or kv.memory:
        raise AttnkitError("the compensation token, token budgets and a memory target are not in vLLM's cache: "
                           "leave them off with --engine vllm")
    return {"architectures": [ARCHITECTURES[base]],
            PLAN_KEY: {"full": [list(h) for h in sorted(kv.full)], "window": int(kv.window), "sink": int(kv.sink),
                      "prefill": kv.prefill}}


ENTRY = register(Entry("kv-cache", "the retrieval-head KV cache: full cache for chosen KV heads, sink + window "
                       "(+ token budgets) for the rest", OPTIONS, build, finish, label, row_field="cache",
                       report=report, vllm=vllm_overrides))
