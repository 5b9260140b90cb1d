"""A needle, and where its answer sits in a prompt: what both NIAH prompt builders (attnkit's clean one
in `niah`, the authors' in `authors_prompt`) share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.errors import AttnkitError


@dataclass(frozen=True)
class Needle:
    needle: str
    question: str
    real_needle: str


@dataclass
class NiahPrompt:
    input_ids: torch.Tensor  # [1, tokens]
    span: tuple[int, int]  # token positions of the answer span inside the prompt
    length: int
    depth: float


def locate_answer(tokenizer, ids: list[int], needle: Needle) -> tuple[int, int]:
    """The answer's span in the prompt; byte-level BPE tokenises a word differently after a space, so
    both spellings are tried. Not found: an AttnkitError (the trial becomes a counted skip)."""
    for spelling in (needle.real_needle, " " + needle.real_needle.lstrip()):
        span = find_span(ids, tokenizer(spelling, add_special_tokens=False)["input_ids"])
        if span[0] >= 0:
            return span
    raise AttnkitError(f"needle not found in the token stream after tokenisation: {needle.needle[:60]!r}")


def find_span(prompt_ids: list[int], answer_ids: list[int]) -> tuple[int, int]:
    """First window of len(answer) tokens whose token set covers > 90% of the answer's token set."""
    want = set(answer_ids)
    n = len(answer_ids)
    for i in range(len(prompt_ids) - n + 1):
        if len(set(prompt_ids[i:i + n]) & want) / len(want) > 0.9:
            return i, i + n
    return -1, -1
