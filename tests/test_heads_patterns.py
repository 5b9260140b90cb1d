"""Echo and induction scores (RazorAttention's definitions) on repeated random blocks."""

import pytest
import torch

from attnkit.errors import AttnkitError
from attnkit.heads.patterns import pattern_scores, random_blocks, scores_from_probabilities
from conftest import tiny_model


class _Tok:  # what pattern_scores reads of a tokenizer
    all_special_ids = [0, 1]
    bos_token_id = 1

    def __len__(self):
        return 97


def test_scores_follow_the_definitions_on_scripted_attention():
    first, length = 1, 5
    tokens = first + 2 * length
    probs = torch.zeros(1, 3, tokens, tokens)
    for p in range(tokens):
        probs[0, 2, p, 0] = 1.0  # head 2: all on the first token (a sink head)
        if p >= first + length:
            probs[0, 0, p, p - length] = 1.0  # head 0: the previous occurrence of the current token
            probs[0, 1, p, min(p - length + 1, p)] = 1.0  # head 1: the token that followed it
    echo, induction = scores_from_probabilities(probs, first, length)
    assert echo[0].tolist() == [1.0, 0.0, 0.0]
    assert induction[0].tolist() == [0.0, 1.0, 0.0]


def test_random_blocks_repeat_and_skip_special_tokens():
    ids, first = random_blocks(_Tok(), 8, 3, seed=2)
    assert first == 1 and ids.shape == (3, 17) and (ids[:, 0] == 1).all()
    assert torch.equal(ids[:, 1:9], ids[:, 9:]) and not torch.isin(ids[:, 1:], torch.tensor([0, 1])).any()
    assert not torch.equal(ids, random_blocks(_Tok(), 8, 3, seed=3)[0])
    with pytest.raises(AttnkitError, match="at least 2"):
        random_blocks(_Tok(), 1, 1)


def test_scores_equal_the_models_own_attention_weights():
    """sdpa model through the hook's observer == eager attention weights (output_attentions)."""
    sdpa, eager = tiny_model("llama", attn="sdpa", seed=3), tiny_model("llama", attn="eager", seed=3)
    echo, induction = pattern_scores(sdpa, _Tok(), length=12, batch=2, seed=5)
    ids, first = random_blocks(_Tok(), 12, 2, seed=5)
    with torch.no_grad():
        attentions = eager(input_ids=ids, output_attentions=True).attentions
    for layer, probs in enumerate(attentions):
        e, i = scores_from_probabilities(probs, first, 12)
        for h in range(4):
            assert echo[(layer, h)] == pytest.approx(e[:, h].tolist(), abs=1e-5)
            assert induction[(layer, h)] == pytest.approx(i[:, h].tolist(), abs=1e-5)


def test_a_planted_echo_head_scores_highest():
    """Layer 0 head 0 made to match equal tokens (query = key = a slice of the normalised input, on
    dimensions RoPE leaves unrotated): it attends to the current token and its earlier occurrence."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "default", "rope_theta": float("inf")}  # only pair 0 rotates
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    attn = model.model.layers[0].self_attn
    pick = torch.zeros(16, 64)
    for i in range(16):
        if i not in (0, 8):  # the rotating pair (rotate_half pairs i with i + 8)
            pick[i, i] = 3.0
    with torch.no_grad():
        attn.q_proj.weight[:16] = pick
        attn.k_proj.weight[:16] = pick
    echo, induction = pattern_scores(model, _Tok(), length=16, batch=4)
    means = {k: sum(v) / len(v) for k, v in echo.items()}
    best = max(means, key=means.get)
    assert best == (0, 0) and means[best] > 0.3
    assert max(m for k, m in means.items() if k != (0, 0)) < 0.2
    assert sum(induction[(0, 0)]) / 4 < 0.1  # it looks at the echo, not at the token after it


def test_blocks_longer_than_the_model_are_refused():
    with pytest.raises(AttnkitError, match="does not fit"):
        pattern_scores(tiny_model(), _Tok(), length=200)


def test_heads_patterns_command_writes_both_score_files(tmp_path):
    import json

    from attnkit.heads.scores import load_scores
    from conftest import run_cli

    r = run_cli("heads", "patterns", "--model", "embedded", "--length", "32", "--batch", "2", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["echo"]["heads"] == 64 and len(load_scores(tmp_path / "induction.json")[(0, 0)]) == 2
    assert run_cli("heads", "patterns", "--model", "embedded", "--batch", "0").returncode == 2
