"""`attnkit reproduce`: the report from result files (verdicts follow the numbers), resuming and
refusing other settings, a small study on the embedded model that reruns to identical numbers, and
(opt-in, about 10 minutes) the quick study on SmolLM2."""

import importlib.util
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from attnkit.errors import AttnkitError
from attnkit.reproduce import study as ST
from attnkit.reproduce import verdicts as V
from attnkit.reproduce.report import build_report

MICRO = ST.StudySettings(lengths=(256, 512), depths=(50.0,), needles=2, ablate_length=512, ablate_ks=(2,), seeds=2,
                         single_heads=1, kv_length=512, kv_budgets=(0.25,), buckets_length=512, buckets_depths=(0.0,),
                         buckets_n=3, kvr_examples=2, kvr_pairs=4, s2a_examples=2, s2a_max_tokens=16)
IDENT = {"name": "test", "model": "m", "model_hash": "0" * 16, "dtype": "torch.float32"}

ROOT = Path(__file__).resolve().parents[1]


def _write(out, step, result, settings=MICRO):
    record = {"step": step, "model": IDENT, "settings": asdict(settings), "data": None, "seconds": 1.0,
              "result": result}
    (out / f"{step}.json").write_text(json.dumps(record))


def _heads(above, heads=100, spearman=0.9, overlap=4, counted=(24, 24)):
    consistency = {"top": 4, "overlap": overlap, "overlap_fraction": overlap / 4, "spearman": spearman}
    return {"summary": {"heads": heads, "above_threshold": above, "threshold": 0.1,
                        "fraction_above": above / heads, "top": [[1, 2, 0.9]]},
            "trials": {"A256": {"counted": counted[0], "run": 24}, "A512": {"counted": counted[1], "run": 24},
                       "B512": {"counted": 1, "run": 24}},
            "lengths": {"short": "A256", "long": "A512"}, "consistency_length": consistency,
            "consistency_data": None, "by_layer_type": {"full": {"heads": 20, "above_threshold": 3},
                                                        "sliding": {"heads": 80, "above_threshold": 0}},
            "hybrid": True, "heads": heads}


def _spread(mean, n):
    """n per-prompt recalls averaging `mean`, not all equal (so intervals have width)."""
    return [max(0.0, min(100.0, mean + (10.0 if i % 2 else -10.0) * (0 < mean < 100))) for i in range(n)]


def _ablate(top, random, n=24):
    recalls = {"none": [100.0] * n, "top": _spread(top, n), "random_seed0": _spread(random, n),
               "random_seed1": _spread(random, n)}
    return {"results": [{"k": 4, "none": 100.0, "top": top, "random": random, "random_sd": 1.0, "recalls": recalls}],
            "single": [{"head": [1, 2], "recall": 50.0, "recalls": _spread(50.0, n)}], "scoring_heads": 3}


def _report(tmp_path, heads, ablate):
    _write(tmp_path, "heads", heads)
    _write(tmp_path, "ablate", ablate)
    return build_report(tmp_path).read_text()


def _row(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_verdicts_follow_the_numbers(tmp_path):
    text = _report(tmp_path, _heads(3), _ablate(top=0.0, random=95.0))
    sparsity, causal = _row(text, "| sparsity"), _row(text, "| 4 |")
    assert "3 of 100 heads (3.0%), 48 counted trials" in sparsity and "| holds (" in sparsity
    assert "| holds (" in causal and "n=24" in causal and "(excludes 0)" in causal and "sample SD 1.0" in causal
    assert "full: 3 of 20, sliding: 0 of 80" in text  # the hybrid row
    assert "another needle set" in text and "a run counted no trial" in text
    assert "3-6%" in text  # the paper's figure as its own distribution shows it
    assert (tmp_path / "report.html").read_text().count("<table>") == 2

    text = _report(tmp_path, _heads(12, spearman=0.1, overlap=1), _ablate(top=80.0, random=90.0))
    sparsity, causal = _row(text, "| sparsity"), _row(text, "| 4 |")
    assert "12.0%" in sparsity and "does not hold" in sparsity and "does not hold" in causal
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "Spearman 0.1" in text and sum("does not hold" in row for row in rows) == 3


def test_no_claim_holds_from_fewer_than_24_prompts(tmp_path):
    text = _report(tmp_path, _heads(3, counted=(5, 5)), _ablate(top=0.0, random=100.0, n=6))
    assert "too few to say" in _row(text, "| sparsity") and "too few to say" in _row(text, "| 4 |")
    assert "n=6" in _row(text, "| 4 |") and "| holds" not in text


def test_buckets_gain_holds_only_when_its_interval_is_above_zero(tmp_path):
    def buckets(single, ours, kv_single, kv_buckets):
        kvr = {"accuracy": {"single": {"0": 0.0}, "buckets": {"0": 0.0}}, "mean": {"single": 0.0, "buckets": 0.0},
               "positions": [0], "examples": 24}
        return {"bases": [1e4, 2e4], "own_base": 1e4, "grid": [1e4, 3e4, 500], "distances": [500, 2000],
                "message": "", "niah_names": ["one base", "buckets"], "kv_retrieval": kvr,
                "niah_trials": {"one base": single, "buckets": ours},
                "kv_retrieval_trials": {"single": kv_single, "buckets": kv_buckets}}

    zeros = [0.0] * 24
    mixed = [100.0 if i % 2 else 0.0 for i in range(24)]  # 12 of 24 right
    lifted = [100.0 if i % 2 or i % 4 == 0 else 0.0 for i in range(24)]  # those 12 and 6 more
    for ours, verdict in ((lifted, "| holds ("), (mixed[1:] + mixed[:1], "does not hold")):
        _write(tmp_path, "buckets", buckets(mixed, ours, zeros, zeros))
        text = build_report(tmp_path).read_text()
        assert verdict in _row(text, "| buckets raise NIAH")
        kv_row = _row(text, "| buckets raise key-value")
        assert "not measurable" in kv_row and "McNemar p=1.0" in kv_row  # both at 0: nothing to compare


def test_finished_steps_are_kept_and_other_settings_refused(tmp_path):
    _write(tmp_path, "heads", _heads(3))
    study = ST.Study("test", None, None, tmp_path, MICRO, identity=IDENT, quiet=True)
    assert ST.run_study(study, ("heads",))["heads"]["result"]["summary"]["above_threshold"] == 3  # no model needed
    other = ST.Study("test", None, None, tmp_path, replace(MICRO, seeds=5), identity=IDENT, quiet=True)
    with pytest.raises(AttnkitError, match="other settings"):
        ST.run_study(other, ("heads",))
    # a file written before a setting existed resumes while that setting keeps its default, and only then
    older = json.loads((tmp_path / "heads.json").read_text())
    del older["settings"]["kv_head_tokens"]
    (tmp_path / "heads.json").write_text(json.dumps(older))
    assert ST.run_study(study, ("heads",))["heads"]["result"]["summary"]["above_threshold"] == 3
    with pytest.raises(AttnkitError, match="other settings"):
        ST.run_study(ST.Study("test", None, None, tmp_path, replace(MICRO, kv_head_tokens=64), identity=IDENT,
                              quiet=True), ("heads",))
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
    written = (tmp_path / "a" / "report.md").read_text()  # run_study rewrites the report after every step
    text = build_report(tmp_path / "a").read_text()
    assert written == text and "## Retrieval heads" in text and "## Retrieval-head KV cache" in text
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
               {"system": "retrieval", "importance": "copy", "full": 0.5, "kv_ratio": 0.9, "recall": 75.0,
                "recalls": [75.0] * 24},
               {"system": "random", "full": 0.5, "kv_ratio": 0.9, "recall": None, "grid": [],
                "skipped": "cannot draw 2 random KV heads: only 1 of 3 are not retrieval heads"}]
    _write(tmp_path, "kv", {"results": results, "tokens": 1024})
    text = build_report(tmp_path).read_text()
    assert "skipped: cannot draw 2 random KV heads" in text
    assert "not measurable (random heads cannot be drawn at this budget)" in text
    from attnkit.evals.plots import kv_tradeoff
    kv_tradeoff(results, tmp_path / "kv.png")  # the plot leaves the skipped row out
    assert (tmp_path / "kv.png").stat().st_size > 0


KILL_SETTINGS = {"lengths": [128, 256], "depths": [50.0], "needles": 2, "eval_needles": 2, "ablate_length": 256,
                 "ablate_ks": [2], "seeds": 2, "single_heads": 1, "kv_length": 256, "kv_budgets": [0.25]}


def _kill_resume():
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "scripts" / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_study_killed_at_three_random_points_ends_with_the_same_report(tmp_path):
    """`attnkit reproduce` on the embedded model, SIGKILLed at 3 random moments and rerun each time,
    writes the same figures as one uninterrupted run (scripts/kill_resume.py, which also records the
    same test on a real model). Every kill must land mid-run and leave the study unfinished."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(KILL_SETTINGS))
    outcome = _kill_resume().kill_and_resume("embedded", tmp_path, settings, "heads,ablate,kv", kills=3, seed=7)
    assert all(a["killed"] for a in outcome["attempts"]), outcome["attempts"]
    assert outcome["unfinished_after_kills"] and outcome["final_exit"] == 0
    assert outcome["figures_equal"]


def test_random_heads_are_compared_only_with_a_choice_of_the_same_count(tmp_path):
    """Two importances can fill a budget with different head counts (only heads scoring above 0 are
    chosen): each is compared with random heads of its own count, never with a smaller draw."""
    base = {"grid": [], "recalls": [100.0] * 24}
    results = [{"system": "all", "full": 1.0, "kv_ratio": 1.0, "full_heads": 90, "recall": 100.0, **base},
               {"system": "retrieval", "importance": "copy", "full": 0.5, "kv_ratio": 0.35, "full_heads": 22,
                "recall": 100.0, **base},
               {"system": "retrieval", "importance": "copy+echo", "full": 0.5, "kv_ratio": 0.57, "full_heads": 45,
                "recall": 100.0, **base},
               {"system": "random", "full": 0.5, "kv_ratio": 0.35, "full_heads": 22, "recall": 0.0, "seeds": 2,
                "recalls_by_seed": [[0.0] * 24, [0.0] * 24]}]
    from attnkit.reproduce.report import kv_claims
    claims = {c["importance"]: c for c in kv_claims({"result": {"results": results, "tokens": 1024}})}
    assert claims["copy"]["verdict"].word == V.HOLDS and claims["copy"]["ours"].startswith("22 of 90 KV heads full")
    assert claims["copy+echo"]["verdict"].word == V.NOT_MEASURABLE
    assert "no random draw of 45 heads" in claims["copy+echo"]["verdict"].why


def test_s2a_is_not_measurable_where_the_model_does_not_rewrite():
    """A gain or a loss means nothing when the model ignores the rewrite instruction (an unparsed rewrite
    falls back to the original prompt): below half parsed the verdict is "not measurable"."""
    from attnkit.reproduce.report import s2a_claims

    def task(parsed, s2a):
        return {"parse_rate": parsed, "scores": {"baseline": [0.0] * 12 + [1.0] * 12, "s2a": s2a,
                                                 "oracle": [1.0] * 24}}

    better = [1.0] * 24
    res = {"sycophancy": task(16.7, better), "gsm-ic": task(90.0, better)}
    claims = {c["claim"]: c["verdict"] for c in s2a_claims({"result": res})}
    assert claims["S2A beats the baseline (sycophancy)"].word == V.NOT_MEASURABLE
    assert "16.7%" in claims["S2A beats the baseline (sycophancy)"].why
    assert claims["S2A beats the baseline (gsm-ic)"].word == V.HOLDS


def _mdqa_result(single: list, ours: list, docs: int = 10) -> dict:
    """The buckets step's multi-document QA part, computed from per-(question, position) outcomes."""
    from attnkit.evals import mdqa as Q

    positions = [0, 4, 9]
    rows = [{"index": i, "n_docs": docs, "position": p, "system": name, "correct": bool(v[i * 3 + k]), "tokens": 1500}
            for name, v in (("one base", single), ("buckets", ours)) if v for i in range(len(single) // 3)
            for k, p in enumerate(positions)]
    return {"docs": docs, "positions": positions, "questions": len(single) // 3, "tokens": 1500, "curve": Q.curve(rows),
            "correct": {"one base": single, "buckets": ours}}


def test_buckets_are_judged_on_multi_document_qa_only_where_the_middle_dips(tmp_path):
    def step(single, ours):
        kvr = {"accuracy": {"single": {"0": 0.0}, "buckets": {"0": 0.0}}, "mean": {}, "positions": [0], "examples": 2}
        return {"bases": [1e4, 2e4], "own_base": 1e4, "grid": [1e4, 3e4, 500], "distances": [500, 2000], "message": "",
                "niah_names": ["one base", "buckets"], "kv_retrieval": kvr, "niah_trials": {}, "kv_retrieval_trials": {},
                "mdqa": _mdqa_result(single, ours)}

    n = 30  # questions; outcomes in (question, position) order, positions first / middle / last
    dipped = [100.0, 0.0, 100.0] * n  # right at both ends, wrong in the middle
    flat = [100.0 if (i // 3) % 2 else 0.0 for i in range(3 * n)]  # the same at every position
    fixed = [100.0] * (3 * n)
    _write(tmp_path, "buckets", step(dipped, fixed))
    text = build_report(tmp_path).read_text()
    assert "| holds (" in _row(text, "| the model loses the middle")
    assert "| holds (" in _row(text, "| buckets raise multi-document QA")
    _write(tmp_path, "buckets", step(flat, fixed))
    text = build_report(tmp_path).read_text()
    assert "does not hold" in _row(text, "| the model loses the middle")
    assert "not measurable (no middle dip shown" in _row(text, "| buckets raise multi-document QA")
    skipped = step(flat, [])  # the study ran no buckets: the one base showed no dip
    skipped["mdqa"]["correct"]["buckets"] = []
    skipped["mdqa"]["buckets_skipped"] = "one base shows no middle dip (paired 95% interval includes 0)"
    _write(tmp_path, "buckets", skipped)
    row = _row(build_report(tmp_path).read_text(), "| buckets raise multi-document QA")
    assert "buckets not run: one base shows no middle dip" in row and "not measurable (no middle dip shown" in row
    few = step(dipped[:30], fixed[:30])  # 10 questions
    _write(tmp_path, "buckets", few)
    assert "too few to say" in _row(build_report(tmp_path).read_text(), "| the model loses the middle")


def test_the_buckets_step_runs_multi_document_qa_with_data(tmp_path, embedded, monkeypatch):
    """The one base answers first; the buckets follow only where it shows a middle dip (forced here:
    two questions cannot show one), resuming the same file."""
    import gzip

    from attnkit.reproduce import verdicts as V

    from attnkit.buckets import BucketsConfig, single_vs_buckets
    from conftest import result_lines
    from test_mdqa import _questions

    model, tok = embedded
    data = tmp_path / "data"
    (data / "lost_in_the_middle").mkdir(parents=True)
    with gzip.open(data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz", "wt") as fh:
        for q in _questions():
            fh.write(json.dumps({"question": q.question, "answers": q.answers,
                                 "ctxs": [{"title": q.title, "text": q.text, "isgold": True}]}) + "\n")
    settings = replace(MICRO, mdqa_docs=4, mdqa_questions=2, mdqa_positions=3)
    study = ST.Study("embedded", model, tok, tmp_path / "out", settings, data=data, quiet=True)
    study.out.mkdir()
    systems = single_vs_buckets(model, BucketsConfig([10000.0, 20000.0]))
    alone = ST.buckets_mdqa(study, systems)  # 2 questions: no dip shown, so no buckets
    assert "no middle dip" in alone["buckets_skipped"] and "fewer than" in alone["buckets_skipped"]
    assert [len(alone["correct"][s.name]) for s in systems] == [2 * 3, 0] and list(alone["curve"]) == [systems[0].name]
    first = result_lines(study.out / "buckets_mdqa.jsonl")
    monkeypatch.setattr(V, "middle_dip", lambda est: V.Verdict(V.HOLDS, "forced"))
    m = ST.buckets_mdqa(study, systems)
    assert m["positions"] == [0, 2, 3] and m["docs"] == 4 and "buckets_skipped" not in m
    assert {len(v) for v in m["correct"].values()} == {2 * 3}  # every question at every position, per system
    assert result_lines(study.out / "buckets_mdqa.jsonl")[:len(first)] == first  # the one base's rows kept
    trials = [json.loads(x) for x in result_lines(study.out / "buckets_mdqa.jsonl") if '"position"' in x]
    assert len(trials) == 2 * 3 * 2 and (study.out / "mdqa.png").is_file()
    for system in systems:  # the rows the curve and the pairs come from
        mine = sorted((r for r in trials if r["system"] == system.name), key=lambda r: (r["index"], r["position"]))
        assert m["correct"][system.name] == [100.0 * r["correct"] for r in mine]
    assert "skipped" in ST.buckets_mdqa(replace(study, data=None), systems)


def test_the_open_book_s2a_step_pairs_the_opinion_laden_prompts_and_reports_adoption(tmp_path, embedded):
    """The S2A step in its open-book form: every question under three templates, the compared cells the
    two opinion-laden ones (paired by example across variants), per-template adoption and truncations
    in the summary and the report, greedy decoding named."""
    import gzip

    from attnkit.reproduce.report import s2a_section
    from test_mdqa import _questions

    model, tok = embedded
    data = tmp_path / "data"
    (data / "lost_in_the_middle").mkdir(parents=True)
    (data / "gsm8k").mkdir()
    with gzip.open(data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz", "wt") as fh:
        for q in _questions():
            fh.write(json.dumps({"question": q.question, "answers": q.answers,
                                 "ctxs": [{"title": q.title, "text": q.text, "isgold": True}]}) + "\n")
    (data / "gsm8k" / "gsm8k_validation.jsonl").write_text("".join(json.dumps(
        {"question": f"Tom has {n} apples. He buys {n} more. How many apples does he have?",
         "answer": f"He has {2 * n}. #### {2 * n}"}) + "\n" for n in (3, 4)))
    settings = replace(MICRO, s2a_form="open-book", s2a_temperature=0.0, s2a_examples=2, s2a_max_tokens=8)
    study = ST.Study("embedded", model, tok, tmp_path / "out", settings, data=data, quiet=True)
    study.out.mkdir()
    res = ST.step_s2a(study)
    syc = res["sycophancy"]
    assert res["form"] == "open-book" and res["temperature"] == 0.0 and syc["examples_run"] == 2 * 3
    assert {len(v) for v in syc["scores"].values()} == {2 * 2}  # two questions x two opinion-laden templates
    assert set(syc["summary"]["adoption"]["baseline"]) == {"none", "suggest-incorrect", "discourage-correct"}
    assert syc["summary"]["variants"]["baseline"]["truncated"] >= 1  # 8 tokens cut the embedded model's answers
    text = "\n".join(s2a_section({"result": res}))
    assert "Greedy decoding" in text and "Open-book" in text and "suggested incorrect answer, per template" in text
    assert "Answers cut by the token budget" in text
