"""Sink and window sizes from measured attention mass (kvcache/sinks.py, `attnkit kv sinks`)."""

import json

import pytest
import torch

from attnkit.errors import AttnkitError
from attnkit.kvcache import sinks as K
from conftest import real_model, run_cli, tiny_model


def _scripted(tokens=12):
    """Head 0: half on key 0, half on the query itself; head 1: uniform over the last 4 keys."""
    p = torch.zeros(1, 2, tokens, tokens)
    for q in range(tokens):
        p[0, 0, q, 0] += 0.5
        p[0, 0, q, q] += 0.5
        lo = max(0, q - 3)
        p[0, 1, q, lo:q + 1] = 1 / (q + 1 - lo)
    return p


def test_masses_follow_their_definition_on_scripted_attention():
    sink, recent = K.masses(_scripted(), first_query=6, max_sink=2, max_window=5)
    assert sink.shape == (2, 3) and recent.shape == (2, 6)
    torch.testing.assert_close(sink[0], torch.tensor([0.0, 0.5, 0.5]))
    torch.testing.assert_close(sink[1], torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(recent[0], torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(recent[1], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(AttnkitError, match="overlap"):
        K.masses(_scripted(), first_query=3, max_sink=2, max_window=5)


def test_best_split_keeps_the_sink_a_model_uses_and_the_smallest_budget():
    sink, recent = K.masses(_scripted(), first_query=6, max_sink=2, max_window=5)
    profile = K.AttentionProfile(sink_mass=sink.mean(0).tolist(), recent_mass=recent.mean(0).tolist(),
                                 per_layer_sink=[sink.mean(0).tolist()], layers=[0], queries=6, length=12)
    assert K.best_split(profile, 5) == {"sink": 1, "window": 4, "kept_mass": 1.0}  # head 0's sink + head 1's window
    # budget 2: sink 1 + window 1 keeps 0.25 + 0.375; window 2 alone keeps 0.5
    assert K.best_split(profile, 2) == {"sink": 1, "window": 1, "kept_mass": 0.625}
    assert K.smallest_budget(profile, 0.99, budgets=[2, 3, 4, 5, 6]) == {"sink": 1, "window": 4, "kept_mass": 1.0,
                                                                         "budget": 5}
    assert K.smallest_budget(profile, 0.99, budgets=[2, 3]) is None
    with pytest.raises(AttnkitError, match="budget"):
        K.best_split(profile, 99)


def test_profile_equals_eager_attention_probabilities_of_a_tiny_model():
    model = tiny_model("llama", 2, attn="eager")

    class Tok:  # a text of token ids "3 4 5 ..." split on spaces; no BOS
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(t) for t in text.split()]}

    text = " ".join(str(3 + i % 90) for i in range(200))
    profile = K.attention_profile(model, Tok(), text, length=40, max_sink=4, max_window=8, batch=2)
    ids = torch.tensor([[3 + i % 90 for i in range(r * 40, (r + 1) * 40)] for r in range(2)])
    with torch.no_grad():
        probs = model(input_ids=ids, output_attentions=True).attentions  # per layer [b, h, q, k]
    q = torch.arange(12, 40)
    want_sink = torch.stack([p[:, :, 12:, :s].sum(-1).mean() for s in range(5) for p in probs]).view(5, -1).mean(1)
    want_recent = torch.stack([torch.stack([p[:, :, t, t - w + 1:t + 1].sum(-1) for t in q]).mean()
                               for w in range(1, 9) for p in probs]).view(8, -1).mean(1)
    torch.testing.assert_close(torch.tensor(profile.sink_mass), want_sink, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(profile.recent_mass[1:]), want_recent, atol=1e-5, rtol=1e-4)
    assert profile.queries == 28 and profile.layers == list(range(model.config.num_hidden_layers))


def test_kv_sinks_cli_reports_a_split_of_the_budget(tmp_path):
    r = run_cli("kv", "sinks", "--length", 700, "--batch", 1, "--budget", 100, "--max-sink", 16,
                "--max-window", 256, "--out", tmp_path / "s.json", "--plot", tmp_path / "s.png", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    best, profile = got["best"], got["profile"]
    assert best["sink"] + best["window"] == 100
    assert best["kept_mass"] == pytest.approx(profile["sink_mass"][best["sink"]] + profile["recent_mass"][best["window"]],
                                              abs=1e-4)
    others = [profile["sink_mass"][s] + profile["recent_mass"][100 - s] for s in range(0, 17)]
    assert best["kept_mass"] >= max(others) - 1e-4
    assert json.loads((tmp_path / "s.json").read_text())["best"] == best and (tmp_path / "s.png").stat().st_size > 0
    bad = run_cli("kv", "sinks", "--length", 100, "--max-sink", 16, "--max-window", 256)
    assert bad.returncode == 2 and "--length must exceed" in bad.stderr


def test_smollm2_has_an_attention_sink():
    """StreamingLLM's finding on a real model: the first token draws far more attention than its share."""
    model, tok = real_model("smollm2-135m-instruct")
    from attnkit.evals.prose import filler_text

    profile = K.attention_profile(model, tok, filler_text(20_000), length=768, max_sink=16, max_window=256)
    uniform_share = 1 / (768 - 136)  # a key's share under uniform attention at the mean query position
    assert profile.sink_mass[1] > 50 * uniform_share
    assert profile.sink_mass[1] > 0.5 * profile.sink_mass[16]  # the sink is the first token, not the first 16
