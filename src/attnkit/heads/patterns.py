"""Echo and induction scores of attention heads (RazorAttention, Tang et al. 2024, arXiv 2407.15891).

The model reads a block of random tokens twice: [BOS] t_1 ... t_L t_1 ... t_L. At a query in the
second copy, at position p = first + L + j (t_j again):

* an **echo** head attends to the previous occurrence of the current token, key p - L;
* an **induction** head attends to the token that followed it, key p - L + 1 (the token to predict).

A head's score is its mean attention probability on that key over the second copy's queries
(j = 1 .. L - 1 for induction, whose target must exist) and over `batch` random blocks. Scores lie in
[0, 1]; random attention over ~2L keys gives about 1 / 2L. They are saved in the retrieval-score
file format ("layer-head" -> per-block scores), so `kv plan --scores` takes them like copy scores.

    echo, induction = pattern_scores(model, tokenizer, length=64, batch=4)   # {(layer, head): [..]}
"""

from __future__ import annotations

import torch

from attnkit.core.family import architecture
from attnkit.core.hook import intervene
from attnkit.errors import AttnkitError


def random_blocks(tokenizer, length: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """[batch, first + 2 * length] token ids: an optional BOS, then each random block twice; and
    `first`, the position where the first copy starts. Special tokens are never drawn."""
    if length < 2:
        raise AttnkitError(f"the repeated block needs at least 2 tokens, got {length}")
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([t for t in range(len(tokenizer)) if t not in special])
    g = torch.Generator().manual_seed(seed)
    blocks = vocab[torch.randint(len(vocab), (batch, length), generator=g)]
    ids = torch.cat([blocks, blocks], dim=1)
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids, 0
    return torch.cat([torch.full((batch, 1), bos), ids], dim=1), 1


def scores_from_probabilities(probs: torch.Tensor, first: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block echo and induction scores [batch, heads] from one layer's attention probabilities
    [batch, heads, tokens, tokens] on a repeated block starting at `first`."""
    second = first + length
    queries = torch.arange(second, second + length, device=probs.device)  # p for j = 0 .. L-1
    echo = probs[:, :, queries, queries - length]  # [batch, heads, L]
    induction = probs[:, :, queries[:-1], queries[:-1] - length + 1]  # the last query has no next token
    return echo.mean(-1), induction.mean(-1)


def pattern_scores(model, tokenizer, length: int = 64, batch: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """({(layer, head): [echo score per block]}, {(layer, head): [induction score per block]})."""
    arch = architecture(model.config)
    if 1 + 2 * length > arch.max_positions:
        raise AttnkitError(f"a repeated block of {length} tokens does not fit in {arch.max_positions} positions")
    ids, first = random_blocks(tokenizer, length, batch, seed)
    echo = torch.zeros(arch.layers, batch, arch.query_heads)
    induction = torch.zeros_like(echo)

    def observe(layer, probs):
        e, i = scores_from_probabilities(probs, first, length)
        echo[layer], induction[layer] = e.cpu(), i.cpu()

    device = next(model.parameters()).device
    with torch.no_grad(), intervene(model, observer=observe):
        model(input_ids=ids.to(device), use_cache=False)
    as_file = lambda t: {(l, h): [round(float(x), 6) for x in t[l, :, h]]  # noqa: E731
                         for l in range(arch.layers) for h in range(arch.query_heads)}
    return as_file(echo), as_file(induction)
