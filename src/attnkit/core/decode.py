"""Decoding helpers under `core.generate`'s loop: how the installed transformers takes a cache, token
sampling, the set of end-of-sequence ids, chat rendering and the chat-template choice."""

from __future__ import annotations

import functools
import inspect

import torch

from attnkit.errors import AttnkitError


def is_newline(text: str) -> bool:
    """A token made of newlines alone: the authors' stop test (Llama's "<0x0A>"), generalised to
    tokenizers whose newline tokens merge several ("\n\n" in Gemma's vocabulary)."""
    return bool(text) and set(text) == {"\n"}


def cache_kwarg(model, cache) -> dict:
    """The KV cache as the installed transformers wants it passed: `cache` where the model's forward
    takes it (transformers >= 5.2x; `past_key_values` is deprecated there), else `past_key_values`."""
    return {"cache": cache} if _takes(type(model), "cache") else {"past_key_values": cache}


def last_logits_only(model) -> dict:
    """Forward kwargs that keep only the last position's logits, where the model supports it: at long
    context the full [tokens x vocab] logits of a prefill cost more memory than the KV cache."""
    return {"logits_to_keep": 1} if _takes(type(model), "logits_to_keep") else {}


@functools.cache
def _takes(model_class, argument: str) -> bool:
    return argument in inspect.signature(model_class.forward).parameters


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends generation: EOS and the chat end-of-turn tokens (`family.end_of_turn_ids`)."""
    from attnkit.core.family import end_of_turn_ids
    return end_of_turn_ids(model, tokenizer)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (or log-probabilities) [rows, vocab]: greedy at temperature 0,
    else nucleus sampling (the smallest set of tokens whose probability reaches top_p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_padded(tokenizer, texts: list[str], add_special_tokens: bool = True):
    """A batch padded on the left (what generation needs), without changing the tokenizer's own side."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side


def render_plain(messages: list[dict]) -> str:
    """A conversation as plain text, for tokenizers without a chat template."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages) + "\n\nAssistant:"


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer should add special tokens): the chat template where the
    tokenizer has one (it holds the special tokens itself), else the plain rendering."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
    return render_plain(messages), True


def require_chat_template(tokenizer, wanted: bool) -> None:
    if wanted and not getattr(tokenizer, "chat_template", None):
        raise AttnkitError("--chat-template: this tokenizer has no chat template (a base model?); leave the option out")


def use_chat_template(tokenizer, wanted: bool | None) -> bool:
    """Whether prompts go through the chat template: `None` (the default everywhere) means yes when the
    tokenizer has one, so an instruct model is asked the way it was trained; True without a template
    is an error; False opts out."""
    if wanted is None:
        return bool(getattr(tokenizer, "chat_template", None))
    require_chat_template(tokenizer, wanted)
    return bool(wanted)
