"""System 2 Attention (Weston & Sukhbaatar 2023, arXiv 2311.11829): rewrite the context, then answer."""

__all__ = ["Completion", "HFBackend", "OpenAIBackend", "Parsed", "S2A", "S2AResult", "ChatSampling", "VARIANTS",
           "make_backend", "parse"]

_LAZY = {"Completion": ".backends", "HFBackend": ".backends", "OpenAIBackend": ".backends", "ChatSampling": ".backends",
         "make_backend": ".backends", "Parsed": ".parse", "parse": ".parse", "S2A": ".pipeline",
         "S2AResult": ".pipeline", "VARIANTS": ".prompts"}


def __getattr__(name: str):
    """Names load on first use, so that the command line starts without importing torch."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
