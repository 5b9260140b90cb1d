"""RULER's tasks: each example holds what its definition says at the length asked for, the scoring
rule on hand-made outputs, and the run through the one loop (resumed from its file)."""

import re
from collections import Counter

import pytest

from attnkit.errors import AttnkitError
from attnkit.evals import ruler as R


def _tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_string_match_scores_the_share_of_references_found():
    assert R.score("The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert R.score("only 123", ["123", "456", "789", "000"]) == 25.0
    assert R.score("ABCDE is one", ["abcde"]) == 100.0  # case-insensitive, as RULER's scorer
    assert R.score("", ["x"]) == 0.0


@pytest.mark.parametrize("task", R.TASKS)
def test_every_task_fits_its_length_and_is_seeded(embedded, task):
    _, tok = embedded
    ex = R.make_example(task, tok, 1024, 0)
    n = _tokens(tok, ex.prompt(False))
    assert 0.85 * 1024 < n <= 1024, n  # filled close to the budget, never past it
    assert ex.answers and ex.prompt(False) == R.make_example(task, tok, 1024, 0).prompt(False)
    assert ex.prompt(False) != R.make_example(task, tok, 1024, 1).prompt(False)


def test_niah_needles_distractors_and_values(embedded):
    _, tok = embedded
    single = R.make_example("niah_single_1", tok, 1024, 0)
    value = single.answers[0]
    assert re.fullmatch(r"\d{7}", value) and single.context.count(value) == 1 and R.NOISE in single.context
    key = single.meta["keys"][0]
    assert f"for {key} is: {value}." in single.context and key in single.question
    uuid = R.make_example("niah_single_3", tok, 1024, 0).answers[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", uuid)
    mk1 = R.make_example("niah_multikey_1", tok, 1024, 0)
    assert mk1.context.count("One of the special magic numbers for") == 4  # the needle and 3 distractors
    mk2 = R.make_example("niah_multikey_2", tok, 1024, 0)
    assert mk2.context.count("One of the special magic numbers for") > 20  # a haystack of needles
    assert mk2.context.count(f"for {mk2.meta['keys'][0]} is:") == 1
    mv = R.make_example("niah_multivalue", tok, 1024, 0)
    assert len(mv.answers) == 4 and all(mv.context.count(f"for {mv.meta['keys'][0]} is: {v}.") == 1
                                        for v in mv.answers)
    mq = R.make_example("niah_multiquery", tok, 1024, 0)
    assert len(mq.meta["keys"]) == 4 and all(k in mq.question for k in mq.meta["keys"])


def test_variable_tracking_chain_and_word_counts(embedded):
    _, tok = embedded
    vt = R.make_example("vt", tok, 1024, 0)
    assignments = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", vt.context)
    holds = {}
    for name, source in assignments:  # follow the chain in text order
        holds[name] = holds[source[4:]] if source.startswith("VAR") else source
    value = re.search(r"the value (\d+)", vt.question).group(1)
    assert sorted(n for n, v in holds.items() if v == value) == sorted(vt.answers) and len(vt.answers) == 5
    cwe = R.make_example("cwe", tok, 1024, 0)
    counts = Counter(re.findall(r"\d+\. (\S+)", cwe.context))
    assert {w for w, _ in counts.most_common(10)} == set(cwe.answers)
    fwe = R.make_example("fwe", tok, 1024, 0)
    counts = Counter(fwe.context.split("\n", 1)[1].split())
    assert [c for _, c in counts.most_common(3)] == [counts[w] for w in fwe.answers]


def test_errors_are_one_line():
    with pytest.raises(AttnkitError, match="unknown RULER task"):
        R.make_example("nope", None, 1024, 0)


def test_the_run_goes_through_the_one_loop_and_resumes(embedded, tmp_path):
    from attnkit.evals.systems import System

    model, tok = embedded
    out = tmp_path / "ruler.jsonl"
    systems = [System("full cache", {"cache": "full"})]
    rows = R.evaluate_ruler(model, tok, ["niah_single_1", "vt"], [512], 2, systems, out, quiet=True)
    assert len(rows) == 4 and all(0 <= r["score"] <= 100 for r in rows)
    again = R.evaluate_ruler(model, tok, ["niah_single_1", "vt"], [512], 2, systems, out, quiet=True)
    assert again == rows and len(out.read_text().splitlines()) == 5  # header + 4 rows, nothing rerun
    summary = R.summarize_ruler(rows)["full cache"]
    assert summary["tasks"]["vt"]["512"]["n"] == 2 and summary["niah_average"]["512"]["n"] == 2
    with pytest.raises(AttnkitError, match="positions"):
        R.evaluate_ruler(model, tok, ["vt"], [4096], 1, systems, quiet=True)


def test_the_command(embedded, tmp_path):
    import json

    from conftest import run_cli

    r = run_cli("eval", "ruler", "--model", "embedded", "--tasks", "niah_single_1,vt", "--lengths", "512",
                "--samples", "1", "--out", str(tmp_path / "r.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert set(summary["full cache"]["tasks"]) == {"niah_single_1", "vt"}
    bad = run_cli("eval", "ruler", "--model", "embedded", "--tasks", "niah_single_9")
    assert bad.returncode == 2 and "unknown task niah_single_9" in bad.stderr


def test_one_prefill_per_prompt_gives_the_answers_of_one_prefill_per_system(embedded):
    from attnkit.core.family import architecture
    from attnkit.core.kvconfig import HeadKVConfig
    from attnkit.evals.systems import System

    model, tok = embedded
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    budgets = tuple((k, 40) for k in heads[2:])
    systems = [System("full cache", {}),
               System("two heads full", {}, HeadKVConfig(frozenset(heads[:2]), sink=4, window=16, prefill="full")),
               System("budgets", {}, HeadKVConfig(frozenset(heads[:1]), sink=4, window=16, prefill="full",
                                                  budgets=budgets))]
    args = (model, tok, ["niah_single_1", "niah_multikey_1"], [512], 2, systems)
    shared = R.evaluate_ruler(*args, quiet=True)  # several shareable systems: shared by default
    alone = R.evaluate_ruler(*args, quiet=True, share_prefill=False)
    assert [r["answer"] for r in shared] == [r["answer"] for r in alone]
    by_system = {}
    for r in alone:
        by_system.setdefault(r["system"], []).append(r["answer"])
    assert len({str(v) for v in by_system.values()}) > 1  # the caches answer differently: equality means something
    with pytest.raises(AttnkitError, match="shared prefill"):
        R.evaluate_ruler(model, tok, ["niah_single_1"], [512], 1,
                         [System("window prefill", {}, HeadKVConfig(frozenset(heads[:1])))], quiet=True,
                         share_prefill=True)
