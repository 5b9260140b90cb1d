"""attnkit: fix and explain how large language models use their context."""

from attnkit.core.hook import HeadMask, Probe, intervene
from attnkit.core.loading import load_model, model_info
from attnkit.errors import AttnkitError

__all__ = ["AttnkitError", "HeadMask", "Probe", "intervene", "load_model", "model_info"]
__version__ = "0.1.0"
