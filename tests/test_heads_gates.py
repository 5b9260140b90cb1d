"""DuoAttention-style gates: the gated attention's definition, and what training learns on a model
where only one head can matter."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from attnkit.core.decode import cache_kwarg
from attnkit.core.family import architecture
from attnkit.kvcache.cache import head_kv
from attnkit.kvcache.config import HeadKVConfig
from attnkit.errors import AttnkitError
from attnkit.heads import gates as G


def _tiny(vocab: int, seed: int = 0):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_gates_one_is_the_model_and_gates_zero_is_the_window_cache():
    model = _tiny(97)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    arch = architecture(model.config)
    gates = G.Gates(arch, sink=3, window=6)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with G.gated(model, gates):
            ones = model(input_ids=ids).logits
            gates.values.data.zero_()
            zeros = model(input_ids=ids).logits
            gates.values.data[1, 0] = 0.5
            half = model(input_ids=ids).logits
        with head_kv(model, HeadKVConfig(full=set(), sink=3, window=6, prefill_chunk=40)) as kv:
            window = model(input_ids=ids, **cache_kwarg(model, kv.new_cache()), use_cache=True).logits
        with head_kv(model, HeadKVConfig(full={(1, 0)}, sink=3, window=6, prefill_chunk=40)) as kv:
            one_full = model(input_ids=ids, **cache_kwarg(model, kv.new_cache()), use_cache=True).logits
    torch.testing.assert_close(ones, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeros, window, atol=1e-5, rtol=1e-5)
    assert (half - window).abs().max() > 1e-4 and (half - one_full).abs().max() > 1e-4  # a gate of 0.5: a mix


def test_training_keeps_the_head_that_matters_and_drops_the_silent_ones(embedded):
    """Every head's output is cut from the residual stream except KV head 0 of layer 1: the others
    cannot change the hidden states, so the sparsity term closes their gates; the live head's
    window attention differs from its full attention, so its gate stays open."""
    _, tok = embedded
    model = _tiny(len(tok), seed=2)
    with torch.no_grad():
        for layer in model.model.layers:
            o = layer.self_attn.o_proj.weight  # [hidden, heads * head_dim]; head h is columns h*8:(h+1)*8
            o[:, :] = 0 if layer is model.model.layers[0] else o
        model.model.layers[1].self_attn.o_proj.weight[:, 16:] = 0  # query heads 2, 3 = KV head 1
        model.model.layers[1].self_attn.o_proj.weight[:, :16] *= 8  # make the live head count
    settings = G.GateTraining(steps=25, length=96, passkeys=2, sink=2, window=8, lr=0.08, l1=0.02)
    scores, log = G.train_gates(model, tok, settings, quiet=True)
    gate = {k: v[0] for k, v in scores.items()}
    assert gate[(1, 0)] > 0.7  # query heads 0 and 1 = KV head 0
    assert max(gate[(0, h)] for h in range(4)) < 0.2 and max(gate[(1, h)] for h in (2, 3)) < 0.2
    assert log[-1]["mean_gate"] < log[0]["mean_gate"]


def test_training_resumes_to_the_same_gates(embedded, tmp_path, monkeypatch):
    _, tok = embedded
    settings = G.GateTraining(steps=4, length=64, passkeys=1, sink=2, window=8, lr=0.1, l1=0.05)
    straight, _ = G.train_gates(_tiny(len(tok), 3), tok, settings, quiet=True)
    real, calls = G.passkey_context, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(G, "passkey_context", interrupted)
    state = tmp_path / "gates.state.pt"
    with pytest.raises(KeyboardInterrupt):
        G.train_gates(_tiny(len(tok), 3), tok, settings, quiet=True, state=state)
    monkeypatch.setattr(G, "passkey_context", real)
    resumed, log = G.train_gates(_tiny(len(tok), 3), tok, settings, quiet=True, state=state)
    assert len(log) == 4
    for k in straight:
        assert resumed[k][0] == pytest.approx(straight[k][0], abs=1e-5)
    with pytest.raises(AttnkitError, match="other settings"):
        G.train_gates(_tiny(len(tok), 3), tok, G.GateTraining(steps=4, length=64, passkeys=1, sink=2, window=8,
                                                              lr=0.2), quiet=True, state=state)


def test_bad_training_settings_are_clear_errors():
    with pytest.raises(AttnkitError, match="nothing to learn"):
        G.GateTraining(length=100, sink=16, window=128)
    with pytest.raises(AttnkitError, match="at least one step"):
        G.GateTraining(steps=0)


def test_heads_gates_command_writes_a_score_file_and_resumes(tmp_path):
    import json

    from attnkit.heads.scores import load_scores
    from conftest import run_cli

    out = tmp_path / "gates.json"
    args = ("heads", "gates", "--model", "embedded", "--steps", "2", "--length", "160", "--sink", "4",
            "--window", "16", "--out", str(out), "--json")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 2 and (tmp_path / "gates.json.state.pt").is_file()
    gates = load_scores(out)
    assert len(gates) == 64 and all(0 <= v[0] <= 1 for v in gates.values())
    again = run_cli(*args)  # resumed: nothing left to train, the same gates
    assert again.returncode == 0 and load_scores(out) == gates
    bad = run_cli("heads", "gates", "--model", "embedded", "--length", "100", "--out", str(out))
    assert bad.returncode != 0 and "nothing to learn" in bad.stderr and "Traceback" not in bad.stderr
