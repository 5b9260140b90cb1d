"""Retrieval scores of attention heads for one needle-in-a-haystack trial (Wu et al. 2024).

At each generation step a query head *copies* when its top-1 attended key lies inside the needle's
answer span and the token generated at that step equals the token at that key. Per trial:

* count="unique" (default, the paper's |g ∩ k| / |k|): the number of distinct span positions the head
  copied from, divided by the span length, so a trial scores at most 1;
* count="repeats" (the authors' code): every copy adds 1 / span length, so repeated copies of the
  same token count again and a trial can score above 1. The authors' code is count="repeats" with
  first_token=True (tested against a literal port of their loop).

first_token=True (default) scores every generated token, the first one included: the paper's definition
covers every generated token, and the authors' code does the same (it prefills all prompt tokens but
the last and feeds that one as decode step 0, so step 0 produces, and scores, the first generated
token). first_token=False skips the first generated token, which neither the paper nor the authors do;
it is kept to measure how much that one token weighs.
"""

from __future__ import annotations

from typing import Literal

import torch

from attnkit.core.generate import greedy_decode
from attnkit.core.hook import Intervention, Probe
from attnkit.errors import AttnkitError


Count = Literal["unique", "repeats"]


def copy_scores(positions: torch.Tensor, generated: torch.Tensor, sequence: torch.Tensor,
                span: tuple[int, int], count: Count = "unique") -> torch.Tensor:
    """Scores [layers, heads] from top-1 key indices [steps, layers, heads], the token generated at
    each step [steps], and the token ids of the whole sequence (prompt + generated) [tokens]."""
    start, end = span
    length = end - start
    in_span = (positions >= start) & (positions < end)
    copied = in_span & (sequence[positions] == generated[:, None, None])
    if count == "repeats":
        return copied.sum(0).float() / length
    if count != "unique":
        raise AttnkitError(f"count must be 'unique' or 'repeats', not {count!r}")
    offsets = (positions - start).clamp(0, length - 1).unsqueeze(-1)
    hit = torch.zeros(*positions.shape, length, dtype=torch.bool, device=positions.device)
    hit.scatter_(-1, offsets, copied.unsqueeze(-1))  # each (step, layer, head) sets one slot
    seen = hit.any(0)
    return seen.sum(-1).float() / length


def trial(model, tokenizer, input_ids: torch.Tensor, span: tuple[int, int], max_new_tokens: int = 50,
          count: Count = "unique", first_token: bool = True, stop_rule: Literal["clean", "authors"] = "clean") -> tuple[torch.Tensor, list[int]]:
    """Greedy-decode one prompt with decode probes on; return (scores [layers, heads], generated ids)."""
    with Intervention(probe=Probe(top_k=1, prefill_last=first_token)).prepare(model) as session:
        generated = greedy_decode(model, tokenizer, input_ids, max_new_tokens, session, stop_rule=stop_rule)
    positions = session.controller.positions()[:, :, 0, :, 0]  # [steps, layers, heads]
    gen = torch.tensor(generated, device=positions.device)
    # step s of the probes produced generated[s] (with the prefill row) or generated[s + 1]
    gen = gen[: positions.shape[0]] if first_token else gen[1: positions.shape[0] + 1]
    positions = positions[: len(gen)]
    sequence = torch.cat([input_ids[0].to(positions.device), torch.tensor(generated, device=positions.device)])
    return copy_scores(positions, gen, sequence, span, count), generated
