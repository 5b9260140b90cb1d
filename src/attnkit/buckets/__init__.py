"""Attention Buckets (Chen et al. 2024, arXiv 2312.04455): RoPE waveform, base search, multi-base inference."""

__all__ = ["BucketedModel", "BucketsConfig", "Generation", "SearchResult", "combine", "search_bases",
           "single_vs_buckets", "waveform"]

_LAZY = {"BucketedModel": ".model", "BucketsConfig": ".model", "Generation": ".model", "combine": ".model", "single_vs_buckets": ".model",
         "SearchResult": ".search", "search_bases": ".search", "waveform": "attnkit.core.rope"}


def __getattr__(name: str):
    """Names load on first use, so that the command line starts without importing torch."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
