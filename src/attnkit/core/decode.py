"""Greedy decoding with a KV cache, one token at a time (so hooks see every decode step)."""

from __future__ import annotations

import functools
import inspect

import torch


@torch.no_grad()
def greedy_decode(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 50,
                  stop_at_newline: bool = True) -> list[int]:
    """Token ids generated after `input_ids` ([1, n]); stops at EOS or a token containing a newline."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), past_key_values=cache, use_cache=True, **last_logits_only(model))
    eos = set(_as_list(model.generation_config.eos_token_id) + _as_list(tokenizer.eos_token_id))
    generated = []
    for step in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token in eos or (stop_at_newline and "\n" in tokenizer.decode([token])):
            break
        if step + 1 < max_new_tokens:
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
    return generated


def last_logits_only(model) -> dict:
    """Forward kwargs that keep only the last position's logits, where the model supports it: at long
    context the full [tokens x vocab] logits of a prefill cost more memory than the KV cache."""
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}


@functools.cache
def _takes_logits_to_keep(model_class) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
