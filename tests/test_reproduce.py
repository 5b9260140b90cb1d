"""`attnkit reproduce`: the report from result files (verdicts follow the numbers), resuming and
refusing other settings, a small study on the embedded model that reruns to identical numbers, and
(opt-in, about 10 minutes) the quick study on SmolLM2."""

import json
import os
from dataclasses import asdict, replace

import pytest

from attnkit.errors import AttnkitError
from attnkit.reproduce import study as ST
from attnkit.reproduce.report import build_report

MICRO = ST.StudySettings(lengths=(256, 512), depths=(50.0,), needles=2, ablate_length=512, ablate_ks=(2,), seeds=2,
                         single_heads=1, kv_length=512, kv_budgets=(0.25,), buckets_length=512, buckets_depths=(0.0,),
                         buckets_n=3, kvr_examples=2, kvr_pairs=4, s2a_examples=2, s2a_max_tokens=16)
IDENT = {"name": "test", "model": "m", "model_hash": "0" * 16, "dtype": "torch.float32"}


def _write(out, step, result, settings=MICRO):
    record = {"step": step, "model": IDENT, "settings": asdict(settings), "data": None, "seconds": 1.0,
              "result": result}
    (out / f"{step}.json").write_text(json.dumps(record))


def _heads(above, heads=100, spearman=0.9, overlap=4):
    consistency = {"top": 4, "overlap": overlap, "overlap_fraction": overlap / 4, "spearman": spearman}
    return {"summary": {"heads": heads, "above_threshold": above, "threshold": 0.1,
                        "fraction_above": above / heads, "top": [[1, 2, 0.9]]},
            "trials": {"A256": {"counted": 2, "run": 2}, "A512": {"counted": 2, "run": 2}, "B512": {"counted": 1, "run": 2}},
            "lengths": {"short": "A256", "long": "A512"}, "consistency_length": consistency,
            "consistency_data": None, "by_layer_type": {"full": {"heads": 20, "above_threshold": 3},
                                                        "sliding": {"heads": 80, "above_threshold": 0}},
            "hybrid": True, "heads": heads}


def _ablate(top, random):
    return {"results": [{"k": 4, "none": 100.0, "top": top, "random": random, "random_std": 1.0}],
            "single": [{"head": [1, 2], "recall": 50.0}], "scoring_heads": 3}


def _report(tmp_path, heads, ablate):
    _write(tmp_path, "heads", heads)
    _write(tmp_path, "ablate", ablate)
    return build_report(tmp_path).read_text()


def test_verdicts_follow_the_numbers(tmp_path):
    text = _report(tmp_path, _heads(3), _ablate(top=0.0, random=95.0))
    sparsity = next(line for line in text.splitlines() if line.startswith("| sparsity"))
    causal = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert "3 of 100 heads (3.0%)" in sparsity and sparsity.endswith("| holds |")
    assert causal.endswith("| holds |") and "95.0 ± 1.0" in causal
    assert "full: 3 of 20, sliding: 0 of 80" in text  # the hybrid row
    assert "another needle set" in text and "a run counted no trial" in text
    assert (tmp_path / "report.html").read_text().count("<table>") == 2

    text = _report(tmp_path, _heads(12, spearman=0.1, overlap=1), _ablate(top=80.0, random=90.0))
    sparsity = next(line for line in text.splitlines() if line.startswith("| sparsity"))
    causal = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert "12.0%" in sparsity and "does not hold" in sparsity and "does not hold" in causal
    assert "Spearman 0.1" in text and text.count("does not hold") == 3


def test_buckets_gain_holds_only_when_its_interval_is_above_zero(tmp_path):
    def buckets(single, ours, ci):
        niah = {"one base": {"mean": single, "ci95": [single - 5, single + 5]},
                "buckets": {"mean": ours, "ci95": [ours - 5, ours + 5]}}
        kvr = {"accuracy": {"single": {"0": 0.0}, "buckets": {"0": 0.0}}, "mean": {"single": 0.0, "buckets": 0.0},
               "positions": [0], "examples": 2}
        return {"bases": [1e4, 2e4], "own_base": 1e4, "grid": [1e4, 3e4, 500], "distances": [500, 2000],
                "message": "", "niah": niah, "niah_names": ["one base", "buckets"],
                "niah_gain": {"mean": ours - single, "ci95": ci}, "kv_retrieval": kvr,
                "kv_retrieval_ci": {"single": None, "buckets": None}, "kv_retrieval_gain": {"mean": 0.0, "ci95": [0.0, 0.0]}}

    for ci, verdict in (([2.0, 30.0], "| holds |"), ([-4.0, 30.0], "does not hold")):
        _write(tmp_path, "buckets", buckets(40.0, 55.0, ci))
        text = build_report(tmp_path).read_text()
        row = next(line for line in text.splitlines() if line.startswith("| buckets raise NIAH"))
        assert verdict in row
        kv_row = next(line for line in text.splitlines() if line.startswith("| buckets raise key-value"))
        assert "not measurable" in kv_row  # both at 0: nothing to compare


def test_finished_steps_are_kept_and_other_settings_refused(tmp_path):
    _write(tmp_path, "heads", _heads(3))
    study = ST.Study("test", None, None, tmp_path, MICRO, identity=IDENT, quiet=True)
    assert ST.run_study(study, ("heads",))["heads"]["result"]["summary"]["above_threshold"] == 3  # no model needed
    other = ST.Study("test", None, None, tmp_path, replace(MICRO, seeds=5), identity=IDENT, quiet=True)
    with pytest.raises(AttnkitError, match="other settings"):
        ST.run_study(other, ("heads",))
    with pytest.raises(AttnkitError, match="unknown study step"):
        ST.run_study(study, ("nope",))
    with pytest.raises(AttnkitError, match="needs the retrieval scores"):
        ST.run_study(ST.Study("test", None, None, tmp_path / "empty", MICRO, identity=IDENT, quiet=True), ("kv",))


def test_the_gsm_distractor_counts_a_noun_not_a_pronoun():
    import random

    from attnkit.s2a.tasks import gsm_distractor

    for seed in range(20):
        s = gsm_distractor("Tom sold 98 his apples and 3 times as many pears. How many?", "in-topic",
                           random.Random(seed))
        assert " his." not in s and " times." not in s, s


def test_sycophancy_from_nq_uses_every_template_and_a_wrong_answer(tmp_path):
    from attnkit.s2a.tasks import sycophancy_from_nq

    path = tmp_path / "nq.jsonl"
    rows = [{"question": f"who wrote book {i}", "answers": [f"Author {i}"]} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    exs = sycophancy_from_nq(path, limit=8)
    assert {e.group for e in exs} == {"none", "suggest-incorrect", "discourage-correct", "suggest-correct"}
    wrong = next(e for e in exs if e.group == "suggest-incorrect")
    assert "I think the answer is Author" in wrong.text and wrong.meta["incorrect"] not in wrong.gold
    assert wrong.oracle.startswith("Who wrote book") and wrong.oracle.endswith("?")


@pytest.mark.slow
def test_a_small_study_on_the_embedded_model_reruns_to_the_same_numbers(tmp_path, embedded):
    model, tok = embedded
    from attnkit.core.loading import model_identity

    def run(out):
        study = ST.Study("embedded", model, tok, out, MICRO, identity={"name": "embedded", **model_identity(model)},
                         quiet=True)
        return ST.run_study(study, ("heads", "kv"))

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first["heads"]["result"] == second["heads"]["result"] and first["kv"]["result"] == second["kv"]["result"]
    kv = {(r["system"], r["full"]): r for r in first["kv"]["result"]["results"]}
    assert kv[("all", 1.0)]["kv_ratio"] == 1.0 and kv[("retrieval", 0.25)]["kv_ratio"] < 0.5
    text = build_report(tmp_path / "a").read_text()
    assert "## Retrieval heads" in text and "## Retrieval-head KV cache" in text
    assert (tmp_path / "a" / "head_scores.png").is_file() and (tmp_path / "a" / "kv_cache.png").is_file()


@pytest.mark.skipif(os.environ.get("ATTNKIT_RUN_STUDY") != "1", reason="the quick study takes about 10 minutes: "
                    "set ATTNKIT_RUN_STUDY=1 (needs `attnkit models pull smollm2-135m-instruct`)")
def test_the_quick_study_on_smollm2(tmp_path, smollm2, shared_data):
    from conftest import run_cli

    r = run_cli("reproduce", "--model", "smollm2-135m-instruct", "--quick", "--out", str(tmp_path),
                "--data", str(shared_data))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "report.md").read_text()
    for section in ("## Retrieval heads", "### Masking them", "## Retrieval-head KV cache", "## Attention Buckets",
                    "## System 2 Attention"):
        assert section in text


def test_a_random_draw_that_cannot_be_made_is_shown_as_skipped(tmp_path):
    """Gemma-3-270M has 3 full-attention KV heads: with 2 of them scoring, 2 random ones cannot be drawn."""
    results = [{"system": "all", "full": 1.0, "kv_ratio": 1.0, "recall": 100.0},
               {"system": "none", "full": 0.0, "kv_ratio": 0.8, "recall": 0.0},
               {"system": "retrieval", "full": 0.5, "kv_ratio": 0.9, "recall": 75.0},
               {"system": "random", "full": 0.5, "kv_ratio": 0.9, "recall": None, "grid": [],
                "skipped": "cannot draw 2 random KV heads: only 1 of 3 are not retrieval heads"}]
    _write(tmp_path, "kv", {"results": results, "tokens": 1024})
    text = build_report(tmp_path).read_text()
    assert "skipped: cannot draw 2 random KV heads" in text and "lose: not measurable" in text
    from attnkit.evals.plots import kv_tradeoff
    kv_tradeoff(results, tmp_path / "kv.png")  # the plot leaves the skipped row out
    assert (tmp_path / "kv.png").stat().st_size > 0
