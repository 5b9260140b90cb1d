"""Attention Buckets as a registered technique (`--technique buckets --set bases=...` or `--set search=true`)."""

from __future__ import annotations

from attnkit.core.registry import Entry, Option, register

OPTIONS = (
    Option("bases", list, [], "RoPE bases, comma-separated (one model row each)"),
    Option("search", bool, False, "search the bases from the model's own base instead"),
    Option("combine", str, "paper", "how the rows' next-token outputs combine: paper or reference"),
)


def build(model_config, s: dict):
    from attnkit.buckets.model import BucketsConfig
    from attnkit.buckets.search import choose_bases
    from attnkit.errors import AttnkitError

    try:
        given = [float(b) for b in s["bases"]] or None
    except ValueError:
        raise AttnkitError(f"buckets: bases must be numbers, got {','.join(s['bases'])}") from None
    bases, message = choose_bases(model_config, given, s["search"])
    if message:  # what the search could not do; the command line shows warnings on stderr
        import warnings
        warnings.warn(message, stacklevel=2)
    return BucketsConfig(bases, s["combine"])


def systems(cfg, model, name: str) -> list:
    from attnkit.buckets.model import single_vs_buckets
    return single_vs_buckets(model, cfg)  # the model's own base on the same prompts, then the buckets


def report(cfg, s: dict, summaries: dict) -> dict:
    return {"buckets": {**list(summaries.values())[1], "bases": cfg.bases, "combine": cfg.combine}}


ENTRY = register(Entry("buckets", "Attention Buckets: several RoPE bases in parallel, outputs combined by "
                       "confidence", OPTIONS, build, label=lambda cfg, s: cfg.label, row_field="system",
                       systems=systems, report=report,
                       vllm="a request needs one model row per RoPE base, each row its own rotary base, and the "
                            "rows' next-token logits combined before sampling; vLLM applies one rotary embedding "
                            "to every sequence and samples each sequence on its own"))
