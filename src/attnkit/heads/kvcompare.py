"""Side by side: NIAH recall and KV memory of the full cache, retrieval-chosen full heads, randomly
chosen full heads at the same budget, and all-window heads (StreamingLLM).

The paper's thesis in practical form: at the same memory, which heads keep the whole context
decides whether retrieval survives.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from attnkit.core.kvcache import HeadKV, HeadKVConfig, full_kv_bytes
from attnkit.evals import niah as N
from attnkit.heads.kvplan import model_shape, plan


@dataclass(frozen=True)
class CacheSettings:
    sink: int = 16
    window: int = 128
    prefill_chunk: int = 2048


def label(how: str, full: float, settings: CacheSettings, seed: int = 0) -> str:
    """Names a cache system in result rows, so that a resumed run matches on every setting."""
    if how == "all":
        return "full cache"
    tail = f"sink {settings.sink} window {settings.window}"
    if how == "none":
        return f"all-window {tail}"
    return f"{how} {full:g} {tail}" + (f" seed {seed}" if how == "random" else "")


def kv_ratio(config: HeadKVConfig, model_config, tokens: int) -> float:
    layers, heads, kv_heads = model_shape(model_config)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    ours = config.kv_bytes(layers, kv_heads, head_dim, tokens)
    return ours / full_kv_bytes(layers, kv_heads, head_dim, tokens)


def compare(model, tokenizer, scores: dict, budgets: list[float], needles, haystack: str, lengths: list[int],
            depths: list[float], settings: CacheSettings = CacheSettings(), seeds: int = 1,
            out: Path | None = None, quiet: bool = False) -> list[dict]:
    """One result per system: {system, full, kv_ratio (at the longest length), recall, grid}."""
    tokens = max(lengths)

    def run(how: str, full: float, seed: int = 0) -> dict:
        cfg = plan(scores, model.config, how, full, sink=settings.sink, window=settings.window,
                   prefill_chunk=settings.prefill_chunk, seed=seed)
        name = label(how, full, settings, seed)
        decode = None if how == "all" else HeadKV(model, cfg).decoder(tokenizer)
        rows = N.evaluate(model, tokenizer, needles, haystack, lengths, depths, out=out, quiet=quiet,
                          label=name, extra={"cache": name}, decode=decode)
        summary = N.summarize(rows)
        return {"system": how, "full": full, "kv_ratio": round(kv_ratio(cfg, model.config, tokens), 4),
                "recall": summary["mean_recall"], "grid": summary["grid"]}

    results = [run("all", 1.0), run("none", 0.0)]
    for full in budgets:
        if full <= 0 or full >= 1:
            continue  # the all-window and full-cache rows already cover these budgets
        results.append(run("retrieval", full))
        draws = [run("random", full, s) for s in range(seeds)]
        recalls = [d["recall"] for d in draws if d["recall"] is not None]
        results.append({**draws[0], "recall": round(statistics.fmean(recalls), 2) if recalls else None,
                        "recall_std": round(statistics.pstdev(recalls), 2) if len(recalls) > 1 else 0.0,
                        "seeds": seeds})
    return results
