import copy

import pytest
import torch

from attnkit.core.decode import cache_kwarg
from transformers import DynamicCache

from attnkit.heads.copying import copy_scores, trial
from conftest import tiny_config


class _Tok:
    """Just what greedy_decode needs from a tokenizer: no EOS, no newline tokens."""
    eos_token_id = None

    def decode(self, ids):
        return "x"


def _small_vocab_model(family, kv, attn):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, kv, attn)
    config.vocab_size = 6  # a small vocabulary makes copies (top key holds the generated token) common
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def naive_reference(model, ids, span, steps, count, first_token):
    """A naive scorer for every option: eager attention, output_attentions=True, Python loops over layers
    and heads. (The authors' own loop, ported literally, is in test_authors_reference.py: it equals
    count="repeats" with first_token=True.)"""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    start, end = span
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    score = torch.zeros(n_layers, n_heads)
    seen = [[set() for _ in range(n_heads)] for _ in range(n_layers)]
    seq = ids[0].tolist()
    cache = DynamicCache(config=eager.config)
    with torch.no_grad():
        out = eager(input_ids=ids, **cache_kwarg(eager, cache), use_cache=True, output_attentions=True)
        for step in range(steps):
            token = int(out.logits[0, -1].argmax())
            if step > 0 or first_token:
                for l in range(n_layers):
                    for h in range(n_heads):
                        i = int(out.attentions[l][0, h, -1].argmax())
                        if start <= i < end and seq[i] == token:
                            if count == "repeats":
                                score[l, h] += 1 / (end - start)
                            else:
                                seen[l][h].add(i)
            seq.append(token)
            out = eager(input_ids=torch.tensor([[token]]), **cache_kwarg(eager, cache), use_cache=True,
                        output_attentions=True)
    if count == "unique":
        score = torch.tensor([[len(s) / (end - start) for s in row] for row in seen])
    return score


@pytest.mark.parametrize("family,kv", [("llama", 2), ("qwen2", 4), ("mistral", 1)])
@pytest.mark.parametrize("count", ["unique", "repeats"])
@pytest.mark.parametrize("first_token", [True, False])
def test_trial_scores_equal_naive_eager_reference(family, kv, count, first_token):
    model = _small_vocab_model(family, kv, "sdpa")
    torch.manual_seed(2)
    ids = torch.randint(0, 6, (1, 48))
    span = (10, 30)
    got, generated = trial(model, _Tok(), ids, span, max_new_tokens=12, count=count, first_token=first_token)
    ref = naive_reference(model, ids, span, len(generated), count, first_token)
    assert got.sum() > 0, "the test prompt should produce some copies"
    torch.testing.assert_close(got, ref)
    if count == "unique":
        assert got.max() <= 1


def test_copy_scores_unique_vs_repeats_by_hand():
    seq = torch.tensor([7, 5, 6, 5, 9, 9])
    span = (1, 4)  # tokens 5 6 5
    # 2 steps, 1 layer, 2 heads: head 0 copies position 1 twice; head 1 copies 1 then 3
    positions = torch.tensor([[[1, 1]], [[1, 3]]])
    generated = torch.tensor([5, 5])
    rep = copy_scores(positions, generated, seq, span, "repeats")
    uni = copy_scores(positions, generated, seq, span, "unique")
    assert torch.allclose(rep, torch.tensor([[2 / 3, 2 / 3]]))
    assert torch.allclose(uni, torch.tensor([[1 / 3, 2 / 3]]))
    miss = copy_scores(torch.tensor([[[4, 2]]]), torch.tensor([9]), seq, span, "repeats")
    assert miss.sum() == 0  # position 4 is outside the span; position 2 holds 6, not 9
