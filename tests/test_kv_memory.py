"""A memory target (`--set memory=0.1`): the plan chosen at each prompt's length holds that fraction of
the model's own cache within one token per head, the cache planned when the prompt ends decodes what
that plan's own cache decodes, and the setting reaches every command through the registry."""

import json

import pytest
import torch

from attnkit.core import registry
from attnkit.core.family import architecture
from attnkit.core.generate import generate
from attnkit.errors import AttnkitError
from attnkit.kvcache.config import HeadKVConfig, native_kv_bytes, share_tokens
from attnkit.kvcache.plan import plan
from conftest import run_cli, tiny_model
from test_generate import _Tok
from test_kvfork import _prompts

TOK = _Tok()


def _importance(model):
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    return tuple((k, 1.0 / (1 + i)) for i, k in enumerate(heads))  # a ranking: the first head matters most


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("memory", [0.9, 0.6, 0.35])
def test_the_resolved_plan_holds_the_target_within_one_token_per_head(family, memory):
    model = tiny_model(family, 2)
    arch = architecture(model.config)
    target = HeadKVConfig(sink=2, window=6, prefill="full", memory=memory, importance=_importance(model))
    per_token = 2 * arch.head_dim * 2  # one KV head, one token, 2-byte values
    heads = len(arch.full_layers) * arch.kv_heads
    for tokens in (64, 100, 200):
        plan = target.resolve(arch, tokens)
        assert plan.memory == 0 and not set(dict(plan.budgets)) & plan.full
        held, wanted = plan.kv_bytes(arch, tokens), memory * native_kv_bytes(arch, tokens)
        assert wanted - heads * per_token <= held <= wanted, (tokens, held, wanted)
        assert target.kv_bytes(arch, tokens) == held
        if plan.full:  # the full heads are the most important ones
            ranked = [k for k, _ in target.importance][:len(plan.full)]
            assert plan.full == frozenset(ranked)


def test_share_tokens_is_exact_proportional_and_capped():
    assert share_tokens({"a": 3.0, "b": 1.0}, 8) == {"a": 6, "b": 2}
    assert share_tokens({"a": 3.0, "b": 1.0}, 8, cap=5) == {"a": 5, "b": 3}  # what a cannot take goes to b
    assert share_tokens({"a": 0.0, "b": 0.0}, 5) == {"a": 3, "b": 2}  # no weight: evenly
    assert share_tokens({"a": 1.0, "b": 1.0}, 9, cap=4) == {"a": 4, "b": 4}  # every key at its cap


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_cache_planned_at_the_prompts_end_decodes_what_that_plans_own_cache_decodes(family):
    model = tiny_model(family, 2)
    arch = architecture(model.config)
    ids, mask = _prompts(model.config.vocab_size, 0)
    target = HeadKVConfig(sink=2, window=6, prefill="full", memory=0.5, importance=_importance(model),
                          select_window=8, select_kernel=3)
    with target.prepare(model) as session:
        out = generate(model, TOK, ids, mask, session, 10, stop_rule="eos")
    plan = session.plans[ids.shape[1]]
    assert plan == target.resolve(arch, ids.shape[1]) and plan.budgets
    assert out.ids == generate(model, TOK, ids, mask, plan, 10, stop_rule="eos").ids
    assert out.ids != generate(model, TOK, ids, mask, None, 10, stop_rule="eos").ids  # the plan changes the output
    shared = HeadKVConfig.prefill_once(model, ids, mask, select_window=8)  # one prefill serves it too
    assert generate(model, TOK, ids, mask, target, 10, stop_rule="eos", prefilled=shared.start(model, target)).ids == out.ids
    with torch.no_grad(), target.prepare(model) as session:
        cache = session.new_cache()
        session.prefill(ids, mask, cache=cache)
        assert cache.kv_bytes() == plan.kv_bytes(arch, ids.shape[1], batch=2, bytes_per_value=4)


def test_a_memory_target_is_checked_and_planned_from_scores(tmp_path):
    model = tiny_model("llama", 2)
    with pytest.raises(AttnkitError, match="in \\(0, 1\\]"):
        HeadKVConfig(prefill="full", memory=1.5, importance=_importance(model))
    with pytest.raises(AttnkitError, match="prefill 'full'"):
        HeadKVConfig(memory=0.2, importance=_importance(model))
    with pytest.raises(AttnkitError, match="score file"):
        HeadKVConfig(prefill="full", memory=0.2)
    with pytest.raises(AttnkitError, match="planned per prompt"):
        from attnkit.kvcache.cache import HeadKVCache
        HeadKVCache(model, HeadKVConfig(prefill="full", memory=0.2, importance=_importance(model)))
    scores = {(l, h): [0.5 if (l, h) == (2, 1) else 0.01] for l in range(3) for h in range(4)}
    cfg = plan(scores, model.config, prefill_mode="full", memory=0.4)
    assert cfg.memory == 0.4 and dict(cfg.importance)[(2, 0)] == max(v for _, v in cfg.importance)  # KV head of 2-1


def test_the_memory_setting_reaches_niah_through_the_registry(embedded, tmp_path):
    from attnkit.heads import scores as S

    S.save_scores({(l, h): [0.9 if l in (5, 6) and h < 4 else 0.0] for l in range(8) for h in range(8)},
                  tmp_path / "s.json")
    r = run_cli("niah", "--lengths", "512", "--depths", "50", "--needles", "passkey", "--json",
                "--kv-scores", tmp_path / "s.json", "--kv-memory", "0.3", "--no-kv-recipe")
    assert r.returncode == 0, r.stdout + r.stderr
    cache = json.loads(r.stdout.strip().splitlines()[-1])["cache"]
    assert cache["memory"] == 0.3 and cache["memory_full"] == 0.5
    bad = run_cli("niah", "--kv-scores", tmp_path / "s.json", "--kv-memory", "0.3", "--kv-head-tokens", "8")
    assert bad.returncode == 2 and "head_tokens" in bad.stderr
    assert registry.choice("kv-cache", ["memory=0.2"]).settings["memory"] == 0.2


def test_the_server_keeps_the_plan_of_its_longest_context(embedded):
    """Running requests share one cache layout, so `serve` resolves a memory target once, at the
    model's context length, and answers with that plan."""
    from attnkit.serve.engine import Engine

    model, tok = embedded
    arch = architecture(model.config)
    target = HeadKVConfig(sink=4, window=32, prefill="full", memory=0.3, importance=_importance(model))
    engine = Engine(model, tok, target, 2048)
    try:
        assert engine.technique == target.resolve(arch, 2048) and engine.technique.full
    finally:
        engine.close()


def test_a_memory_target_shares_one_prefill_with_the_full_cache(embedded):
    """Its token budgets are chosen when the prompt ends, by the prompt's last queries: a shared prefill
    keeps them for it, and its answers equal its own prefill's."""
    from attnkit.evals import ruler as R
    from attnkit.evals.systems import System

    model, tok = embedded
    target = HeadKVConfig(sink=4, window=16, prefill="full", memory=0.3, importance=_importance(model))
    assert target.observed_queries == target.select_window and HeadKVConfig().observed_queries == 0
    systems = [System("full cache", {}), System("memory 0.3", {}, target)]
    args = (model, tok, ["niah_multikey_1"], [384], 2, systems)
    shared = R.evaluate_ruler(*args, quiet=True, share_prefill=True, max_new_tokens=24)
    alone = R.evaluate_ruler(*args, quiet=True, share_prefill=False, max_new_tokens=24)
    assert [r["answer"] for r in shared] == [r["answer"] for r in alone]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_prompt_in_one_forward_peaks_at_the_trimmed_cache_plus_one_layer(family, monkeypatch):
    """Each layer trims as soon as its attention has read the prompt's last token, so the full keys of at
    most one layer are held at once; the answers are those of trimming every layer after the prompt."""
    from attnkit.kvcache.cache import HeadKVCache, head_kv

    model = tiny_model(family, 2)
    arch = architecture(model.config)
    ids, mask = _prompts(model.config.vocab_size, 5)
    target = HeadKVConfig(sink=2, window=6, prefill="full", memory=0.35, importance=_importance(model),
                          select_window=8)
    chosen = target.resolve(arch, ids.shape[1])
    assert chosen.full and chosen.budgets
    full = native_kv_bytes(arch, ids.shape[1], batch=2, bytes_per_value=4)
    one_layer = full // arch.layers

    def peak_and_held(technique):
        with torch.no_grad(), (technique.prepare(model) if technique.memory else head_kv(model, technique)) as kv:
            cache = kv.new_cache()
            kv.prefill(ids, mask, cache=cache)
        return cache.peak_kv_bytes, cache.kv_bytes()

    for technique in (chosen, target):  # a plan, and a memory target planned before the prompt runs
        peak, held = peak_and_held(technique)
        assert held == chosen.kv_bytes(arch, ids.shape[1], batch=2, bytes_per_value=4)
        assert held < peak <= held + one_layer < full, (peak, held, one_layer, full)
    fast = generate(model, TOK, ids, mask, chosen, 10, stop_rule="eos").ids
    monkeypatch.setattr(HeadKVCache, "expect_prompt", lambda self, tokens: None)  # trim after the whole prompt
    peak, held = peak_and_held(chosen)
    assert peak == full and held == chosen.kv_bytes(arch, ids.shape[1], batch=2, bytes_per_value=4)
    assert generate(model, TOK, ids, mask, chosen, 10, stop_rule="eos").ids == fast


def test_the_ruler_benchmark_takes_a_share_per_memory_target_and_refuses_a_bad_one(tmp_path):
    """`kv_ruler.py --memory 0.25:0.75` spends 0.75 of that target on full heads (a sweep of shares in
    one run); a spec that is not TARGET or TARGET:SHARE ends in one line, before any model loads."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    r = subprocess.run([sys.executable, str(bench / "kv_ruler.py"), "--scores", str(tmp_path / "s.json"),
                        "--memory", "0.25:half"], capture_output=True, text=True, cwd=bench)
    assert r.returncode == 2 and "--memory: '0.25:half' is not TARGET or TARGET:SHARE" in r.stderr
    assert "Traceback" not in r.stderr
    sys.path.insert(0, str(bench))
    try:
        import kv_ruler
    finally:
        sys.path.remove(str(bench))
    from attnkit.heads import scores as S

    model = tiny_model("llama", 2)
    S.save_scores({(l, h): [1.0 - 0.1 * (4 * l + h)] for l in range(3) for h in range(4)}, tmp_path / "s.json")
    chosen = kv_ruler.systems_for(model, None, str(tmp_path / "s.json"), [], 1, 2, 64, recipe=False,
                                  all_window=False, memory=[(0.5, 0.25), (0.5, 1.0)])
    (low, a), (high, b) = chosen[1:]
    assert "0.25 of it on full heads" in low.name and "1 of it on full heads" in high.name
    arch = architecture(model.config)
    few, many = a.resolve(arch, 64), b.resolve(arch, 64)
    middle = [sum(n for _, n in c.budgets) for c in (few, many)]
    assert len(few.full) < len(many.full) and middle[0] > middle[1]  # the rest of the target: middle tokens
