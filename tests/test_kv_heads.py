"""Choosing full-cache KV heads from retrieval scores, and the `attnkit kv` / `niah --kv-*` commands."""

import json

import pytest
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.core.family import architecture
from attnkit.core.loading import load_config
from attnkit.kvcache.config import HeadKVConfig, native_kv_bytes
from attnkit.errors import AttnkitError
from attnkit.kvcache import plan as P
from attnkit.heads import scores as S
from conftest import result_lines, tiny_config


def _scores(layers, heads, high):
    return {(l, h): [high.get((l, h), 0.0)] for l in range(layers) for h in range(heads)}


def test_kv_head_score_is_the_max_or_mean_of_its_query_group():
    scores = _scores(2, 4, {(0, 1): 0.8, (0, 0): 0.2, (1, 3): 0.5})
    got = P.kv_head_scores(scores, 2, 4, 2, "max")
    assert got == {(0, 0): 0.8, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 0.5}
    assert P.kv_head_scores(scores, 2, 4, 2, "mean")[(0, 0)] == pytest.approx(0.5)


def test_choices_retrieval_random_none_all():
    config = tiny_config("llama", kv_heads=2)  # 3 layers x 4 heads, 2 KV heads: 6 KV heads
    scores = _scores(3, 4, {(2, 3): 0.9, (0, 0): 0.4})
    assert P.choose_full_heads(scores, config, "retrieval", count=2) == {(2, 1), (0, 0)}
    # a budget beyond the heads that scored: the rest stays unused, never filled by index order
    assert P.choose_full_heads(scores, config, "retrieval", full=0.5) == {(2, 1), (0, 0)}
    drawn = P.choose_full_heads(scores, config, "random", count=3, seed=1)
    assert len(drawn) == 3 and not drawn & {(2, 1), (0, 0)}  # never a retrieval head
    assert drawn == P.choose_full_heads(scores, config, "random", count=3, seed=1)
    assert P.choose_full_heads(scores, config, "none") == frozenset()
    assert len(P.choose_full_heads(None, config, "all")) == 6
    with pytest.raises(AttnkitError, match="only 4 of 6"):
        P.choose_full_heads(scores, config, "random", count=5)
    with pytest.raises(AttnkitError, match=r"in \[0, 1\]"):
        P.choose_full_heads(scores, config, "retrieval", full=1.5)
    with pytest.raises(AttnkitError, match="another model"):
        P.choose_full_heads(_scores(4, 4, {}), config, "retrieval")
    with pytest.raises(AttnkitError, match="needs a retrieval-score file"):
        P.choose_full_heads(None, config, "retrieval")


def test_published_score_file_chooses_kv_heads_for_its_model(shared_data):
    scores = S.load_scores(shared_data / "retrieval_head/head_score/Mistral-7B-v0.2-hf.json")
    from transformers import MistralConfig
    config = MistralConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           sliding_window=None)  # v0.2 dropped v0.1's 4,096-token window
    chosen = P.choose_full_heads(scores, config, "retrieval", full=0.25)
    assert len(chosen) == 64
    kv = P.kv_head_scores(scores, 32, 32, 8)
    best = max(S.mean_scores(scores).items(), key=lambda kv_: kv_[1])[0]
    assert (best[0], best[1] // 4) in chosen and min(kv[k] for k in chosen) >= max(kv[k] for k in kv if k not in chosen)


def cli(*args):
    return CliRunner().invoke(app, list(args))


def test_kv_plan_reports_the_formula(tmp_path):
    S.save_scores(_scores(8, 8, {(5, 0): 0.9, (6, 3): 0.7}), tmp_path / "s.json")
    r = cli("kv", "plan", "--scores", str(tmp_path / "s.json"), "--full", "0.125", "--tokens", "2048,100000", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert sorted(map(tuple, res["full_heads"])) == [(5, 0), (6, 3)]  # only two heads scored
    assert res["requested"] == 8 and res["unfilled"] == 6
    arch = architecture(load_config("embedded"))
    for size in res["sizes"]:
        t = size["tokens"]
        assert size["full_cache_bytes"] == 2 * 2 * 8 * 8 * 32 * t  # layers x KV heads x head dim, keys and values
        assert size["full_cache_bytes"] == native_kv_bytes(arch, t)
        assert size["bytes"] == HeadKVConfig(frozenset(map(tuple, res["full_heads"]))).kv_bytes(arch, t)


@pytest.mark.slow
def test_kv_compare_and_niah_with_the_cache(tmp_path):
    S.save_scores(_scores(8, 8, {(5, 0): 0.9, (6, 3): 0.7}), tmp_path / "s.json")
    out, plot = tmp_path / "kv.jsonl", tmp_path / "kv.png"
    args = ("kv", "compare", "--scores", str(tmp_path / "s.json"), "--budgets", "0,0.25", "--needles", "passkey",
            "--lengths", "256", "--depths", "50", "--sink", "4", "--window", "32", "--chunk", "100",
            "--prefill", "window", "--no-recipe", "--out", str(out), "--plot", str(plot), "--json")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["results"]
    assert [x["system"] for x in results] == ["all", "none", "retrieval", "random"]
    assert results[0]["kv_ratio"] == 1.0 and results[2]["kv_ratio"] == results[3]["kv_ratio"] < 0.5
    lines = result_lines(out)
    assert len(lines) == 4 * 6 and plot.stat().st_size > 0
    assert cli(*args).exit_code == 0 and len(result_lines(out)) == 24  # resumed, nothing rerun
    r = cli("niah", "--kv-choose", "none", "--kv-sink", "4", "--kv-window", "8", "--needles", "passkey",
            "--lengths", "256", "--depths", "50", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cache"]["full_heads"] == []


@pytest.mark.parametrize("args,message", [
    (("niah", "--kv-choose", "none", "--bases", "10000,20000"), "Attention Buckets"),
    (("niah", "--kv-choose", "none", "--kv-window", "0"), "window"),
    (("niah", "--kv-choose", "random"), "score file"),
    (("kv", "plan", "--full", "2"), r"\[0, 1\]"),
    (("kv", "compare", "--scores", "missing.json"), "not found"),
    (("niah", "--kv-choose", "none", "--kv-prefill", "window", "--kv-head-tokens", "8"), "full prefill"),
    (("niah", "--kv-choose", "none", "--kv-head-tokens", "8"), "score file"),
    (("niah", "--kv-choose", "none", "--kv-head-tokens", "-1"), ">= 0"),
])
def test_kv_user_errors(args, message):
    r = cli(*args)
    assert isinstance(r.exception, AttnkitError), r.output
    assert __import__("re").search(message, str(r.exception)), str(r.exception)


def test_several_score_files_combine_by_their_scaled_max():
    config = tiny_config("llama", kv_heads=2)  # 3 layers x 4 query heads, 2 KV heads
    copy = _scores(3, 4, {(2, 3): 0.9, (0, 0): 0.3})
    echo = _scores(3, 4, {(1, 0): 0.02, (0, 2): 0.01})  # small on its own scale, top on its own
    got = P.combine([copy, echo], 3, 4, 2)
    assert got[(2, 1)] == pytest.approx(1.0) and got[(1, 0)] == pytest.approx(1.0)
    assert got[(0, 0)] == pytest.approx(1 / 3) and got[(0, 1)] == pytest.approx(0.5)
    assert P.choose_full_heads([copy, echo], config, count=2) == {(2, 1), (1, 0)}
    assert P.choose_full_heads(copy, config, count=2) == {(2, 1), (0, 0)}  # one file: its own order
    # random heads avoid a retrieval head of any file
    assert not P.choose_full_heads([copy, _scores(3, 4, {(1, 1): 0.5})], config, "random", count=3) & {(2, 1), (1, 0)}


def test_spread_layer_gives_every_layer_its_best_heads():
    config = tiny_config("llama", kv_heads=2)
    scores = _scores(3, 4, {(2, 3): 0.9, (2, 0): 0.8, (0, 0): 0.3, (1, 2): 0.1})
    assert P.choose_full_heads(scores, config, count=3) == {(2, 1), (2, 0), (0, 0)}
    assert P.choose_full_heads(scores, config, count=3, spread="layer") == {(2, 1), (0, 0), (1, 1)}
    with pytest.raises(AttnkitError, match="spread"):
        P.choose_full_heads(scores, config, count=3, spread="pyramid")


def test_kv_compare_names_rows_by_importance_and_combination(tmp_path):
    from attnkit.kvcache.cli import named_score_files

    a, b = tmp_path / "copy.json", tmp_path / "echo.json"
    S.save_scores(_scores(3, 4, {(0, 0): 0.5}), a)
    S.save_scores(_scores(3, 4, {(1, 0): 0.5}), b)
    sources = named_score_files([str(a), f"mine={b}"], ["copy+mine"])
    assert list(sources) == ["copy", "mine", "copy+mine"] and len(sources["copy+mine"]) == 2
    with pytest.raises(AttnkitError, match="two or more"):
        named_score_files([str(a)], ["copy+echo"])
    with pytest.raises(AttnkitError, match="named 'copy'"):
        named_score_files([str(a), str(a)], [])


def test_kv_compare_rows_per_importance_with_the_cache_options(tmp_path):
    S.save_scores(_scores(8, 8, {(5, 0): 0.9, (6, 3): 0.7}), tmp_path / "copy.json")
    S.save_scores(_scores(8, 8, {(1, 2): 0.5, (2, 5): 0.4, (5, 1): 0.3}), tmp_path / "echo.json")
    r = cli("kv", "compare", "--scores", str(tmp_path / "copy.json"), "--scores", f"echo={tmp_path / 'echo.json'}",
            "--combine", "copy+echo", "--budgets", "0.25", "--needles", "passkey", "--lengths", "256", "--depths", "50",
            "--sink", "4", "--window", "32", "--chunk", "256", "--prefill", "full", "--compensate", "--no-recipe",
            "--out", str(tmp_path / "kv.jsonl"), "--json")
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["results"]
    assert [(x["system"], x["importance"]) for x in results] == [
        ("all", None), ("none", None), ("retrieval", "copy"), ("retrieval", "echo"), ("retrieval", "copy+echo"),
        ("random", None), ("random", None), ("random", None)]
    assert [x["full_heads"] for x in results[2:5]] == [2, 3, 5]  # copy+echo: every head either file scored
    assert [x["full_heads"] for x in results[5:]] == [2, 3, 5]  # random heads drawn at each chosen count
    names = {json.loads(line).get("cache") for line in result_lines(tmp_path / "kv.jsonl")}
    assert "copy+echo 0.25 sink 4 window 32 compensated full prefill" in names


@pytest.mark.slow
def test_the_recipe_is_the_default_choice_of_full_heads(tmp_path, embedded):
    """`--kv-scores copy.json` alone: the heads are chosen by copy + echo + induction (echo and
    induction measured on the model), as a reference plan over the same three score sets chooses
    them; `--no-kv-recipe` chooses by the file alone. The prefill is full unless asked otherwise."""
    from attnkit.heads.patterns import pattern_scores

    model, tok = embedded
    copy = _scores(8, 8, {(5, 0): 0.9, (6, 3): 0.7, (2, 1): 0.2})
    S.save_scores(copy, tmp_path / "copy.json")
    common = ("niah", "--kv-scores", str(tmp_path / "copy.json"), "--kv-full", "0.5", "--needles", "passkey",
              "--lengths", "128", "--depths", "50", "--json")
    with_recipe, alone = cli(*common), cli(*common, "--no-kv-recipe")
    assert with_recipe.exit_code == 0 and alone.exit_code == 0, with_recipe.output + alone.output
    got, plain = json.loads(with_recipe.stdout)["cache"], json.loads(alone.stdout)["cache"]
    reference = P.plan([copy, *pattern_scores(model, tok)], model.config, "retrieval", 0.5)
    assert got["full_heads"] == sorted(map(list, reference.full))
    assert plain["full_heads"] == sorted(map(list, P.plan(copy, model.config, "retrieval", 0.5).full))
    assert got["full_heads"] != plain["full_heads"]  # the recipe changes the choice here
    assert got["chosen_by"] == ["copy", "echo", "induction"] and plain["chosen_by"] == ["copy"]
    assert got["prefill"] == "full"


def test_token_budgets_share_the_pool_by_importance_exactly():
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    importance = {(0, 0): 0.6, (0, 1): 0.3, (1, 0): 0.1, (1, 1): -0.2, (2, 0): 5.0}  # (2, 0) is not in the pool
    got = P.token_budgets(importance, heads, 10)
    assert sum(got.values()) == 40 and got == {(0, 0): 24, (0, 1): 12, (1, 0): 4}  # negative counts as 0
    assert P.token_budgets(importance, heads, 10, "uniform") == dict.fromkeys(heads, 10)
    assert P.token_budgets({h: 0.0 for h in heads}, heads, 3) == dict.fromkeys(heads, 3)  # nothing scored: even
    odd = P.token_budgets({(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0}, heads[:3], 1)  # 3 tokens, remainders
    assert sum(odd.values()) == 3
    with pytest.raises(AttnkitError, match="split"):
        P.token_budgets(importance, heads, 10, "by-layer")


def test_plan_with_token_budgets_reaches_the_memory_asked():
    config = tiny_config("llama", kv_heads=2)  # 3 layers x 4 heads, 2 KV heads: 6 KV heads
    arch = architecture(config)
    scores = _scores(3, 4, {(0, 1): 0.9, (1, 2): 0.5, (2, 0): 0.2})
    for ratio, full in ((0.4, 1), (0.25, 0)):
        per_head = P.budget_for_ratio(ratio, full, config, 512, sink=4, window=16)
        cfg = P.plan(scores, config, "retrieval" if full else "none", None, count=full, sink=4, window=16,
                     prefill_mode="full", head_tokens=per_head)
        assert len(cfg.full) == full and not set(dict(cfg.budgets)) & cfg.full
        got = cfg.kv_bytes(arch, 512) / native_kv_bytes(arch, 512)
        assert ratio - 0.01 < got <= ratio  # rounded down to whole tokens per head
        assert max(n for _, n in cfg.budgets) > min(n for _, n in cfg.budgets)  # shared by importance
    with pytest.raises(AttnkitError, match="full prefill"):
        P.plan(scores, config, "none", 0.0, head_tokens=8)
    with pytest.raises(AttnkitError, match="full cache and a token budget"):
        HeadKVConfig(full={(0, 0)}, budgets={(0, 0): 4}, prefill="full")
    with pytest.raises(AttnkitError, match="odd"):
        HeadKVConfig(select_kernel=4)
    with pytest.raises(AttnkitError, match="compensation"):
        HeadKVConfig(budgets={(0, 0): 4}, prefill="full", compensate=True)


def test_niah_with_token_budgets_records_them(tmp_path, embedded):
    S.save_scores(_scores(8, 8, {(5, 0): 0.9, (6, 3): 0.7, (2, 1): 0.2}), tmp_path / "copy.json")
    r = cli("niah", "--kv-scores", str(tmp_path / "copy.json"), "--kv-full", "0.1", "--kv-head-tokens", "16",
            "--no-kv-recipe", "--kv-sink", "4", "--kv-window", "16", "--needles", "passkey", "--lengths", "256",
            "--depths", "50", "--json", "--out", str(tmp_path / "n.jsonl"))
    assert r.exit_code == 0, r.output
    cache = json.loads(r.stdout)["cache"]
    assert cache["head_tokens"] == 16 and cache["prefill"] == "full"
    row = json.loads(result_lines(tmp_path / "n.jsonl")[0])
    assert row["cache"].endswith(" middle tokens")  # the row names what was kept, so reruns never mix


def test_a_cache_with_a_wider_selection_kernel_is_named_apart():
    import dataclasses

    from attnkit.kvcache.compare import label

    cfg = HeadKVConfig(frozenset(), prefill="full", budgets=(((0, 0), 40),))
    wide = dataclasses.replace(cfg, select_kernel=15)
    assert "kernel" not in label("none", 0.0, cfg, split="importance")  # SnapKV's default keeps old names
    assert label("none", 0.0, wide, split="importance") == label("none", 0.0, cfg, split="importance") + " kernel 15"
