"""attnkit: fix and explain how large language models use their context."""

from attnkit.errors import AttnkitError

__all__ = ["AttnkitError", "HeadKVConfig", "HeadMask", "Intervention", "Probe", "Sampling", "generate", "head_kv",
           "intervene", "load_model", "model_info", "use"]
__version__ = "0.1.0"

_LAZY = {"HeadMask": "attnkit.core.hook", "Probe": "attnkit.core.hook", "intervene": "attnkit.core.hook",
         "load_model": "attnkit.core.loading", "model_info": "attnkit.core.loading",
         "Intervention": "attnkit.core.hook", "generate": "attnkit.core.generate", "Sampling": "attnkit.core.generate",
         "HeadKVConfig": "attnkit.kvcache.config", "head_kv": "attnkit.kvcache.cache", "use": "attnkit.hf"}


def __getattr__(name: str):
    """Names load on first use, so that `import attnkit` (and `attnkit --help`) does not import torch."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
