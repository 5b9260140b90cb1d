"""RoPE utilities: the attention waveform and a rotary module that gives every batch row its own base.

Attention Buckets runs one model with several RoPE bases at once. Rather than patch attention, we
swap the model's rotary-embedding module (the one that turns position ids into cos/sin once per
forward) for `PerRowRotary`, which asks a copy of the original rotary class, built from a config
whose rope_theta is changed, for each base's cos/sin. Every scaling type transformers knows
(linear, dynamic, yarn, llama3, longrope ...) therefore keeps working unchanged.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import AttnkitError
from .loading import head_dim, rope_base


def waveform(bases, head_dim: int = 128, distances=None, inv_freq=None) -> np.ndarray:
    """Upper bound of attention at relative distance m with all-ones q and k, per base.

    f(m) = (2 / sqrt(d)) * sum_j cos(m * theta_j), theta_j = base^(-2j/d), j < d/2. Returns an array
    [len(bases), len(distances)]. `inv_freq` ([d/2] or [len(bases), d/2]) replaces the plain
    frequencies, e.g. those of a scaled RoPE from `inv_freq_for`.
    """
    m = np.arange(0, 4096) if distances is None else np.asarray(distances)
    if inv_freq is None:
        bases = np.atleast_1d(np.asarray(bases, dtype=np.float64))
        j = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        inv_freq = bases[:, None] ** -j[None, :]
    else:
        inv_freq = np.atleast_2d(np.asarray(inv_freq, dtype=np.float64))
        head_dim = 2 * inv_freq.shape[1]
    # [bases, m, d/2] can be large; sum one base at a time
    out = np.empty((inv_freq.shape[0], len(m)))
    for i, theta in enumerate(inv_freq):
        out[i] = np.cos(np.outer(m, theta)).sum(axis=1)
    return out * 2.0 / math.sqrt(head_dim)


def rotary_modules(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) for every rotary-embedding module of the model."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if "Rotary" in type(child).__name__ and hasattr(child, "config"):
                found.append((parent, name, child))
    return found


def require_rope(model) -> float:
    """The model's RoPE base; a clear error when it has no rotary embedding."""
    base = rope_base(model.config)
    if base is None or not rotary_modules(model):
        raise AttnkitError(f"{type(model).__name__} has no rotary position embedding; "
                           "Attention Buckets needs a RoPE model")
    return base


def config_with_base(config, base: float):
    """A copy of `config` whose RoPE base is `base`. With RoPE parameters per layer type (Gemma 3) the
    rule is: the base applies to the full-attention (global) layers, and sliding-window layers keep
    their own. Their short window never reaches the distances the buckets are chosen for."""
    cfg = copy.deepcopy(config)
    params = copy.deepcopy(getattr(cfg, "rope_parameters", None) or {})
    if "rope_theta" in params:
        params["rope_theta"] = float(base)
        cfg.rope_parameters = params
    elif params and all(isinstance(v, dict) for v in params.values()):
        if "full_attention" not in params:
            raise AttnkitError(f"RoPE parameters per layer type without full-attention layers "
                               f"({', '.join(params)}): attnkit does not know which base to move")
        params["full_attention"]["rope_theta"] = float(base)
        cfg.rope_parameters = params
    else:
        cfg.rope_theta = float(base)
    return cfg


def _global_params(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("full_attention", params) if all(isinstance(v, dict) for v in params.values()) else params


def inv_freq_for(config, base: float) -> torch.Tensor:
    """Inverse frequencies transformers would use for this config's (global) layers with RoPE base `base`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = config_with_base(config, base)
    rope_type = _global_params(cfg).get("rope_type", "default")
    if rope_type == "default":
        dim = int(head_dim(cfg) * getattr(cfg, "partial_rotary_factor", 1.0))
        return 1.0 / (float(base) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if _global_params(cfg) is not getattr(cfg, "rope_parameters", None):
        return ROPE_INIT_FUNCTIONS[rope_type](cfg, None, layer_type="full_attention")[0]
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, None)[0]


class PerRowRotary(torch.nn.Module):
    """cos/sin for a batch whose rows cycle through `bases`: row r uses bases[r % len(bases)]."""

    def __init__(self, original: torch.nn.Module, bases: list[float]):
        super().__init__()
        device = next(original.buffers()).device
        self.per_base = torch.nn.ModuleList(
            type(original)(config=config_with_base(original.config, b)).to(device) for b in bases)

    def forward(self, x, position_ids, *args, **kwargs):
        n = len(self.per_base)
        if position_ids.shape[0] != x.shape[0]:
            position_ids = position_ids.expand(x.shape[0], -1)
        parts = [rot(x[b::n], position_ids[b::n], *args, **kwargs) for b, rot in enumerate(self.per_base)]
        # stack on dim 1 then flatten so that row i*n + b holds prompt i with base b
        cos = torch.stack([p[0] for p in parts], dim=1).flatten(0, 1)
        sin = torch.stack([p[1] for p in parts], dim=1).flatten(0, 1)
        return cos, sin


@contextmanager
def per_row_bases(model, bases: list[float]):
    """Inside the block, batch row r of `model` runs with RoPE base bases[r % len(bases)]."""
    require_rope(model)
    swapped = rotary_modules(model)
    for parent, name, module in swapped:
        setattr(parent, name, PerRowRotary(module, bases))
    try:
        yield model
    finally:
        for parent, name, module in swapped:
            setattr(parent, name, module)
