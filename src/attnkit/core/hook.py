"""The attention-intervention hook.

One wrapper per base implementation ("attnkit_sdpa", "attnkit_eager", ...) is registered with
transformers' AttentionInterface, and with AttentionMaskInterface under the base's own mask
function, so the model builds exactly the masks it would have built. While `intervene` is active
the model's attention implementation points at the wrapper, and every attention module carries a
reference to the controller that says what to do:

* head masks: `uniform` zeroes a head's query (its attention becomes uniform over visible keys),
  `zero` zeroes the head's output; in prefill, decode or both;
* decode probes: on single-query steps, the top-k attended key positions of every query head;
* an observer: a function given every layer's attention probabilities [batch, heads, queries, keys]
  (echo and induction scores, `heads/patterns.py`).

With nothing active the wrapper calls the base function with the very same arguments.
`Intervention(mask, probe)` is the same as a technique of `core.generate`: its session carries the
`Controller` (`session.controller.positions()` after a probed generation).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from attnkit.core.family import architecture
from attnkit.errors import AttnkitError

WRAPPABLE = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
PREFIX = "attnkit_"  # the head mask / probe wrappers: attnkit_sdpa, attnkit_eager, ...
WHAT = "a head mask or probe (intervene)"
# every attention function attnkit puts in a model's place, by its name's prefix: what it does. Each
# technique that swaps attention adds its own line when it first swaps (`swap`).
SWAPS: dict[str, str] = {PREFIX: WHAT}


def own_attention(model, wanted: str) -> str:
    """The model's own attention implementation, which `wanted` is about to replace; one error, naming
    both, when another of attnkit's attention swaps holds the model already. They do not stack: each
    replaces the attention function with its own (the registry's combination table says the same)."""
    base = model.config._attn_implementation
    for prefix, what in sorted(SWAPS.items(), key=lambda kv: -len(kv[0])):  # the longer prefixes first
        if base.startswith(prefix):
            again = "is already active on this model" if what == wanted else \
                f"cannot be combined with {what}, which is active on this model"
            raise AttnkitError(f"{wanted} {again}: attnkit's attention swaps do not stack")
    return base


@contextmanager
def swap(model, prefix: str, what: str, make, bases: tuple[str, ...] = WRAPPABLE):
    """Put attention function `prefix + base` in the model's place for the block, `base` being the
    model's own implementation; yields `base`. `make(base)` builds the function, registered once with
    transformers' `AttentionInterface` (and `AttentionMaskInterface` under the base's own mask function,
    so the model builds exactly the masks it would have built). The one way attnkit swaps attention:
    head masks and probes, the KV cache and gate training each call it with their own prefix."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    SWAPS.setdefault(prefix, what)
    base = own_attention(model, what)
    if base not in bases:
        raise AttnkitError(f"{what} supports attention implementations {', '.join(bases)}, not '{base}' "
                           "(load the model with attn_implementation='sdpa')")
    name = prefix + base
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, make(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(base)
        raise AttnkitError(f"{type(model).__name__} does not let attnkit set its attention implementation")
    try:
        yield base
    finally:
        model.set_attn_implementation(base)


@dataclass(frozen=True)
class HeadMask:
    """Heads to knock out: (layer, query head) pairs, how, and in which phase."""

    heads: frozenset = field(default_factory=frozenset)
    mode: Literal["uniform", "zero"] = "uniform"  # zero the query (attention goes uniform) or the output
    phase: Literal["decode", "prefill", "both"] = "decode"  # the retrieval-head authors masked decode only

    def __post_init__(self):
        object.__setattr__(self, "heads", frozenset((int(l), int(h)) for l, h in self.heads))
        if self.mode not in ("uniform", "zero"):
            raise AttnkitError(f"unknown mask mode '{self.mode}' (use uniform or zero)")
        if self.phase not in ("decode", "prefill", "both"):
            raise AttnkitError(f"unknown mask phase '{self.phase}' (use decode, prefill or both)")

    def applies(self, query_len: int) -> bool:
        decode = query_len == 1
        return self.phase == "both" or (self.phase == "decode") == decode


@dataclass(frozen=True)
class Probe:
    """Record the top-k attended key positions per query head on decode steps.

    `prefill_last` also probes the last query row of a prefill (the step that produces the first
    generated token).
    """

    top_k: int = 1
    prefill_last: bool = False


def base_function(name: str, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_wrapper(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        ctl: Controller | None = getattr(module, "_attnkit_controller", None)
        if ctl is None:
            return base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        return ctl.attend(module, query, key, value, attention_mask, **kwargs)

    return attention


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """Attention modules by layer index."""
    found = {}
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") and hasattr(m, "config"):
            found[m.layer_idx] = m
    if not found:
        raise AttnkitError(f"{type(model).__name__}: no attention modules that use transformers' AttentionInterface")
    return found


class Controller:
    """What the wrapped attention does for one model; see `intervene`."""

    def __init__(self, model, mask: HeadMask | None = None, probe: Probe | None = None, observer=None):
        self.observer = observer  # called as observer(layer, probabilities [batch, heads, q, keys])
        self.modules = attention_modules(model)
        self.first_layer = min(self.modules)
        base = model.config._attn_implementation.removeprefix(PREFIX)
        self.base_fn = {layer: base_function(base, m) for layer, m in self.modules.items()}  # resolved once
        self.num_layers = len(self.modules)
        self.num_heads = architecture(model.config).query_heads
        self.mask = mask
        self.probe = probe
        self._keep: dict = {}
        self.steps: list[torch.Tensor] = []  # per probed step: [layers, batch, heads, k] key indices
        self.step_probs: list[torch.Tensor] = []

    # --- configuration -------------------------------------------------------------------------
    def set_mask(self, mask: HeadMask | None) -> None:
        if mask is not None:
            bad = [(l, h) for l, h in mask.heads if not (0 <= l < self.num_layers and 0 <= h < self.num_heads)]
            if bad:
                raise AttnkitError(f"head {bad[0]} is outside the model ({self.num_layers} layers x {self.num_heads} heads)")
        self.mask = mask
        self._keep = {}

    # --- results -------------------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """Top-k key indices of all probed steps: [steps, layers, batch, heads, k]."""
        if not self.steps:
            return torch.empty(0, self.num_layers, 0, self.num_heads, self.probe.top_k if self.probe else 1, dtype=torch.long)
        return torch.stack(self.steps)

    def probabilities(self) -> torch.Tensor:
        """Attention weights of those positions, same shape as `positions()`."""
        return torch.stack(self.step_probs) if self.step_probs else torch.empty(0)

    # --- the work ------------------------------------------------------------------------------
    def _keep_vector(self, layer: int, device, dtype) -> torch.Tensor | None:
        key = (layer, device, dtype)
        if key not in self._keep:
            heads = [h for l, h in self.mask.heads if l == layer]
            if not heads:
                self._keep[key] = None
            else:
                keep = torch.ones(self.num_heads, device=device, dtype=dtype)
                keep[heads] = 0
                self._keep[key] = keep
        return self._keep[key]

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        layer, q_len = module.layer_idx, query.shape[2]
        fn = self.base_fn[layer]
        keep = None
        if self.mask is not None and self.mask.heads and self.mask.applies(q_len):
            keep = self._keep_vector(layer, query.device, query.dtype)
        if keep is not None and self.mask.mode == "uniform":
            query = query * keep.view(1, -1, 1, 1)
        if self.probe is not None and (q_len == 1 or self.probe.prefill_last):
            self._probe(module, query[:, :, -1:], key, attention_mask, kwargs)
        if self.observer is not None:
            self.observer(layer, attention_logits(query, key, attention_mask, kwargs).softmax(-1))
        out, weights = fn(module, query, key, value, attention_mask, **kwargs)
        if keep is not None and self.mask.mode == "zero":
            out = out * keep.view(1, 1, -1, 1)  # out is [batch, q_len, heads, head_dim]
        return out, weights

    def _probe(self, module, query, key, attention_mask, kwargs) -> None:
        """Top-k over one [heads x keys] score row per layer; GQA heads read their own KV head."""
        b, h = query.shape[:2]
        scores = attention_logits(query, key, attention_mask, kwargs)[:, :, -1]  # [b, h, keys]
        k = min(self.probe.top_k, scores.shape[-1])
        top, idx = scores.topk(k, dim=-1)
        probs = torch.exp(top - torch.logsumexp(scores, dim=-1, keepdim=True))
        layer = module.layer_idx
        if layer == self.first_layer:  # a new forward pass: open a step
            self.steps.append(torch.zeros(self.num_layers, b, h, k, dtype=torch.long, device=idx.device))
            self.step_probs.append(torch.zeros(self.num_layers, b, h, k, dtype=torch.float32, device=idx.device))
        self.steps[-1][layer] = idx
        self.step_probs[-1][layer] = probs


def attention_logits(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs) -> torch.Tensor:
    """Masked attention logits [batch, heads, q, keys] (float32) as the model's attention computes
    them: its scaling and softcap, GQA heads reading their own KV head, masked keys at -inf."""
    b, h, q, d = query.shape
    kv = key.shape[1]
    scaling = kwargs.get("scaling") or d ** -0.5
    grouped = query.reshape(b, kv, (h // kv) * q, d)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).reshape(b, h, q, -1).float() * scaling
    if kwargs.get("softcap"):
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    keys = scores.shape[-1]
    if attention_mask is None:  # no mask given: causal (the queries are the last q positions)
        causal = torch.ones(q, keys, dtype=torch.bool, device=scores.device).tril(keys - q)
        return scores.masked_fill(~causal, float("-inf"))
    mask = attention_mask
    if mask.dim() == 2:  # [b, keys] padding mask
        return scores.masked_fill(mask[:, None, None, -keys:] == 0, float("-inf"))
    mask = mask[:, :, -q:, :keys]  # [b, 1, q, keys]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()


@dataclass(frozen=True)
class Intervention:
    """Head masks and/or decode probes as a technique of `core.generate`."""

    mask: HeadMask | None = None
    probe: Probe | None = None

    @contextmanager
    def prepare(self, model):
        from attnkit.core.generate import Session

        with intervene(model, self.mask, self.probe) as ctl:
            session = Session(model)
            session.controller = ctl
            yield session

    def describe(self) -> dict:
        return {"technique": "head mask", "masked_heads": len(self.mask.heads) if self.mask else 0,
                "probe": self.probe is not None}


@contextmanager
def intervene(model, mask: HeadMask | None = None, probe: Probe | None = None, observer=None):
    """Wrap the model's attention for the duration of the block; yields the Controller.

        with intervene(model, mask=HeadMask({(3, 1)}, mode="uniform"), probe=Probe()) as ctl:
            model.generate(...)
        ctl.positions()  # [steps, layers, batch, heads, k]
    """
    with swap(model, PREFIX, WHAT, _make_wrapper):
        ctl = Controller(model, probe=probe, observer=observer)
        ctl.set_mask(mask)
        for m in ctl.modules.values():
            m._attnkit_controller = ctl
        try:
            yield ctl
        finally:
            for m in ctl.modules.values():
                m.__dict__.pop("_attnkit_controller", None)
