"""Multi-document QA (Lost in the Middle): the gold passage where asked, distractors without an answer,
the paper's prompt and its best-subspan exact match, against hand-made examples."""

import gzip
import json

import pytest
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.errors import AttnkitError
from attnkit.evals import mdqa as Q


def _questions():
    return [Q.Question("who wrote hamlet", ["William Shakespeare", "Shakespeare"], "Hamlet",
                       "Hamlet is a tragedy written by William Shakespeare."),
            Q.Question("capital of france", ["Paris"], "France", "The capital of France is Paris."),
            Q.Question("largest planet", ["Jupiter"], "Jupiter", "Jupiter is the largest planet."),
            Q.Question("who painted the mona lisa", ["Leonardo da Vinci"], "Mona Lisa",
                       "The Mona Lisa was painted by Leonardo da Vinci."),
            Q.Question("tallest mountain", ["Mount Everest", "Everest"], "Everest",
                       "Mount Everest is the tallest mountain; Shakespeare never climbed it."),
            Q.Question("boiling point of water", ["100 degrees Celsius"], "Water", "Water boils at 100 degrees Celsius.")]


def test_the_scoring_rule_is_normalised_subspan_match():
    assert Q.normalize("The  Eiffel-Tower!") == "eiffeltower"  # punctuation goes without a space, as in SQuAD
    assert Q.correct("It was written by William Shakespeare, in 1600.", ["William Shakespeare"])
    assert Q.correct("shakespeare", ["William Shakespeare", "Shakespeare"])
    assert not Q.correct("Marlowe", ["William Shakespeare", "Shakespeare"])
    assert Q.correct("the answer is an apple", ["Apple"]) and not Q.correct("", ["a"])  # an article alone never matches
    assert not Q.correct("Neil MacGregor\n\nDocument [1](Title: Cyrus Cylinder)", ["Cyrus"])  # the first line only
    assert Q.correct("\n Cyrus the Great", ["Cyrus"])


def test_the_gold_passage_sits_where_asked_among_answer_free_distractors():
    qs = _questions()
    for gold_at in (0, 2, 4):
        ex = Q.build(qs, 0, n_docs=5, gold_at=gold_at)
        assert ex.documents[gold_at] == ("Hamlet", qs[0].text) and len(ex.documents) == 5
        others = [d for i, d in enumerate(ex.documents) if i != gold_at]
        assert all("shakespeare" not in Q.normalize(t + " " + x) for t, x in others)  # the Everest text is left out
        lines = ex.prompt().split("\n")
        assert lines[0] == Q.INSTRUCTION and lines[2 + gold_at] == f"Document [{gold_at + 1}](Title: Hamlet) {qs[0].text}"
        assert ex.prompt().endswith("Question: who wrote hamlet\nAnswer:")
    a, b = Q.build(qs, 0, 5, 0), Q.build(qs, 0, 5, 4)
    assert a.documents[1:] == b.documents[:4]  # the same distractors, in the same order, at every position
    with pytest.raises(AttnkitError, match="passages without an answer"):
        Q.build(qs, 0, n_docs=6, gold_at=0)  # only 4 answer-free passages exist for question 0
    with pytest.raises(AttnkitError, match="gold position"):
        Q.build(qs, 1, n_docs=3, gold_at=3)
    assert Q.positions_for(20) == [0, 5, 10, 14, 19] and Q.positions_for(10, 3) == [0, 4, 9]


def test_curve_counts_positions_and_the_middle_dip():
    rows = [{"system": "s", "n_docs": 5, "index": i, "position": p, "correct": p != 2}
            for i in range(10) for p in (0, 2, 4)]
    c = Q.curve(rows)["s"]["5"]
    assert c["accuracy"]["2"]["mean"] == 0.0 and c["accuracy"]["0"]["n"] == 10
    assert c["ends_minus_middle"]["mean"] == 100.0 and c["ends_minus_middle"]["n"] == 10


def test_eval_mdqa_runs_and_resumes(tmp_path):
    data = tmp_path / "nq.jsonl.gz"
    with gzip.open(data, "wt") as fh:
        for q in _questions():
            fh.write(json.dumps({"question": q.question, "answers": q.answers,
                                 "ctxs": [{"title": q.title, "text": q.text, "isgold": True, "hasanswer": True}]}) + "\n")
    out = tmp_path / "m.jsonl"
    args = ["eval", "mdqa", "--data", str(data), "--docs", "3", "--positions", "0,1,2", "--questions", "2",
            "--out", str(out), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    curve = json.loads(r.stdout)["curve"]["model as it is"]["3"]
    assert set(curve["accuracy"]) == {"0", "1", "2"} and curve["accuracy"]["0"]["n"] == 2
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 2 * 3
    assert CliRunner().invoke(app, args).exit_code == 0 and len(out.read_text().splitlines()) == 7  # resumed
    r = CliRunner().invoke(app, [*args[:8], "--questions", "9"])
    assert isinstance(r.exception, AttnkitError) and "passes the end" in str(r.exception)


def test_the_shared_nq_file_loads_with_one_gold_passage_each(shared_data):
    qs = Q.load_nq(shared_data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz")
    assert len(qs) == 2655 and all(q.answers and q.text for q in qs[:50])
    ex = Q.build(qs, 0, n_docs=20, gold_at=10)
    assert ex.documents[10][1] == qs[0].text
    assert not any(Q.correct(t + " " + x, qs[0].answers) for i, (t, x) in enumerate(ex.documents) if i != 10)
