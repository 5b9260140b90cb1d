"""The model-family layer: what every technique needs to know about a model's attention, read in one
place from its config (and tokenizer), never in place.

    arch = architecture(model.config)
    arch.layers, arch.query_heads, arch.kv_heads, arch.head_dim
    arch.layer_types          # ("full", "sliding", ...) one per layer
    arch.windows              # (None, 512, ...) the sliding window of each layer, None for full attention
    arch.rope_bases           # (10000.0, 1000000.0, ...) RoPE base of each layer (None without RoPE)
    arch.rope_base            # the base of the full-attention layers (the one Attention Buckets moves)
    end_of_turn_ids(model, tokenizer)   # EOS plus the chat end-of-turn tokens (<end_of_turn>, <|im_end|> ...)

Multimodal configs are read through their text config. Per-model-type differences live in the tables
below, not in the techniques.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.errors import AttnkitError

# config.layer_types values -> attnkit's two kinds
LAYER_KINDS = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "sliding"}

# tokens that end an assistant turn in the chat formats of the families attnkit knows; any of them
# present in a tokenizer's vocabulary stops generation (besides the model's EOS)
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # "full" or "sliding", per layer
    windows: tuple[int | None, ...]  # sliding window per layer (None: full attention)
    rope_bases: tuple[float | None, ...]  # RoPE base per layer (None: no RoPE)
    rope_type: str | None
    max_positions: int | None

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.query_heads // self.kv_heads

    @property
    def hybrid(self) -> bool:
        return "sliding" in self.layer_types and "full" in self.layer_types

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full"]

    @property
    def rope_base(self) -> float | None:
        """The RoPE base of the full-attention layers (of every layer when all are sliding)."""
        full = [b for b, t in zip(self.rope_bases, self.layer_types) if t == "full" and b is not None]
        rest = [b for b in self.rope_bases if b is not None]
        return (full or rest or [None])[0]

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer]

    def kv_head_of(self, head: int) -> int:
        return head // self.group

    def check_head(self, layer: int, head: int, kv: bool = False) -> None:
        limit = self.kv_heads if kv else self.query_heads
        if not (0 <= layer < self.layers and 0 <= head < limit):
            raise AttnkitError(f"head {(layer, head)} is outside the model ({self.layers} layers x {limit} "
                               f"{'KV ' if kv else ''}heads)")

    def describe_layers(self) -> list[dict]:
        """Runs of consecutive layers of one kind: [{"layers": "0-4", "type": "sliding", "window": 512,
        "rope_base": 10000.0}, ...]."""
        runs: list[dict] = []
        for i, (t, w, b) in enumerate(zip(self.layer_types, self.windows, self.rope_bases)):
            if runs and (runs[-1]["type"], runs[-1]["window"], runs[-1]["rope_base"]) == (t, w, b):
                runs[-1]["last"] = i
            else:
                runs.append({"first": i, "last": i, "type": t, "window": w, "rope_base": b})
        return [{"layers": f"{r['first']}-{r['last']}" if r["last"] > r["first"] else str(r["first"]),
                 "type": r["type"], "window": r["window"], "rope_base": r["rope_base"]} for r in runs]


def text_config(config):
    """The language model's config (multimodal configs hold it as their text config)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _layer_types(cfg, layers: int) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        kinds = tuple(LAYER_KINDS.get(t, "full") for t in types)
    elif window and getattr(cfg, "use_sliding_window", True) is not False and cfg.model_type in ("mistral",):
        kinds = ("sliding",) * layers  # Mistral-style: every layer slides
    else:
        kinds = ("full",) * layers
    limit = getattr(cfg, "max_position_embeddings", None)
    if window and limit and window >= limit:  # a window as long as the context slides nothing
        window = None
    windows = tuple(int(window) if k == "sliding" and window else None for k in kinds)
    kinds = tuple("full" if k == "sliding" and w is None else k for k, w in zip(kinds, windows))
    return kinds, windows


def _rope(cfg, raw_types) -> tuple[tuple[float | None, ...], str | None]:
    params = getattr(cfg, "rope_parameters", None) or {}
    layers = cfg.num_hidden_layers
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3)
        kinds = list(raw_types or ["full_attention"] * layers)
        bases = tuple(float(params[t]["rope_theta"]) if t in params and "rope_theta" in params[t] else None
                      for t in kinds)
        rope_type = next(iter(params.values())).get("rope_type", "default")
        return bases, rope_type
    if "rope_theta" in params:
        return (float(params["rope_theta"]),) * layers, params.get("rope_type", "default")
    theta = getattr(cfg, "rope_theta", None)
    return ((float(theta) if theta is not None else None),) * layers, ("default" if theta is not None else None)


def _architecture(cfg) -> Architecture:
    heads = cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    kinds, windows = _layer_types(cfg, layers)
    bases, rope_type = _rope(cfg, getattr(cfg, "layer_types", None))
    return Architecture(
        model_type=cfg.model_type, layers=layers, query_heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        layer_types=kinds, windows=windows, rope_bases=bases, rope_type=rope_type,
        max_positions=getattr(cfg, "max_position_embeddings", None))


def architecture(config) -> Architecture:
    """The attention facts of a model config (or of a model). Computed on each call (a few attribute
    reads): transformers' configs are mutable and unhashable, so there is nothing safe to cache on."""
    config = getattr(config, "config", config)  # a model
    return _architecture(text_config(config))


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the generation config's and the tokenizer's EOS, and the chat
    end-of-turn tokens of `END_OF_TURN_TOKENS` that the vocabulary holds."""
    ids = set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    ids |= set(_as_list(tokenizer.eos_token_id))
    vocab = _special_vocab(tokenizer)
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return ids


def _special_vocab(tokenizer) -> dict[str, int]:
    """The tokenizer's special and added tokens by text (cheap: no walk over the whole vocabulary)."""
    found = dict(getattr(tokenizer, "added_tokens_encoder", None) or {})
    if not hasattr(tokenizer, "convert_tokens_to_ids"):
        return found
    for t in END_OF_TURN_TOKENS:
        if t not in found:
            i = tokenizer.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(i) == t:
                found[t] = i
    return found


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
