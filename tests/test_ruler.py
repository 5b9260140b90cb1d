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
    after = run_cli("eval", "ruler", "--model", "embedded", "--tasks", "niah_single_1,vt", "--lengths", "512",
                    "--samples", "1", "--question-after", "--prefill-chunk", "128", "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["full cache"] == summary["full cache"]  # the full cache reads the question alike
    bad = run_cli("eval", "ruler", "--model", "embedded", "--tasks", "niah_single_9")
    assert bad.returncode == 2 and "unknown task niah_single_9" in bad.stderr


def test_one_prefill_per_prompt_gives_the_answers_of_one_prefill_per_system(embedded):
    from attnkit.core.family import architecture
    from attnkit.kvcache.config import HeadKVConfig
    from attnkit.evals.systems import System

    model, tok = embedded
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    budgets = tuple((k, 40) for k in heads[2:])
    systems = [System("full cache", {}),
               System("two heads full", {}, HeadKVConfig(frozenset(heads[:2]), sink=4, window=16, prefill="full")),
               System("budgets", {}, HeadKVConfig(frozenset(heads[:1]), sink=4, window=16, prefill="full",
                                                  budgets=budgets))]
    args = (model, tok, ["niah_multikey_1"], [512], 2, systems)
    shared = R.evaluate_ruler(*args, quiet=True, max_new_tokens=24)  # several shareable systems: shared by default
    alone = R.evaluate_ruler(*args, quiet=True, share_prefill=False, max_new_tokens=24)
    assert [r["answer"] for r in shared] == [r["answer"] for r in alone]
    by_system = {}
    for r in alone:
        by_system.setdefault(r["system"], []).append(r["answer"])
    assert len({str(v) for v in by_system.values()}) > 1  # the caches answer differently: equality means something
    with pytest.raises(AttnkitError, match="shared prefill"):
        R.evaluate_ruler(model, tok, ["niah_single_1"], [512], 1,
                         [System("window prefill", {}, HeadKVConfig(frozenset(heads[:1])))], quiet=True,
                         share_prefill=True)


def test_a_chat_reply_starts_with_rulers_answer_prefix(smollm2, tmp_path):
    """Under the chat template the answer prefix ("... they are:") opens the assistant's turn, as RULER
    and kvpress ask chat models; without it the question alone; a raw prompt ends with it either way."""
    from attnkit.evals.systems import System

    model, tok = smollm2
    ex = R.make_example("vt", tok, 512, 0)
    with_prefix = tok.decode(ex.encode(tok, True)[0][0])
    alone = tok.decode(ex.encode(tok, True, answer_prefix=False)[0][0])
    assert with_prefix.endswith("assistant\n" + ex.answer_prefix) and alone.endswith("assistant\n")
    assert with_prefix.startswith(alone) and ex.question in alone
    assert tok.decode(ex.encode(tok, False)[0][0]).endswith(ex.answer_prefix)
    assert ex.encode(tok, False)[0].tolist() == ex.encode(tok, False, answer_prefix=False)[0].tolist()
    out, systems = tmp_path / "r.jsonl", [System("full cache", {})]
    R.evaluate_ruler(model, tok, ["vt"], [512], 1, systems, out, quiet=True, max_new_tokens=4)
    with pytest.raises(AttnkitError, match="other settings"):  # never resumed by a run that asks otherwise
        R.evaluate_ruler(model, tok, ["vt"], [512], 1, systems, out, quiet=True, max_new_tokens=4,
                         answer_prefix=False)


@pytest.mark.parametrize("answer_prefix", [True, False])
def test_the_question_starts_where_the_context_ends(embedded, smollm2, answer_prefix):
    for tok in (embedded[1], smollm2[1]):
        for chat in (False, True) if getattr(tok, "chat_template", None) else (False,):
            _question_split_is_right(tok, chat, answer_prefix)


def _question_split_is_right(tok, chat, answer_prefix):
    ex = R.make_example("niah_multikey_1", tok, 1024, 0)
    ids = ex.encode(tok, chat, answer_prefix)[0][0].tolist()
    split = R.question_start(tok, ex, chat, answer_prefix)
    before, after = tok.decode(ids[:split]), tok.decode(ids[split:])
    key = ex.meta["keys"][0]
    assert ex.question[:20] not in before and before.count(key) == 1  # the needle only, not the question
    assert ex.question.strip()[-20:] in after and split > 0.9 * len(ids)
    assert ex.question.split()[0] in tok.decode(ids[split:split + 3])  # nothing of the context after it


def test_a_question_after_compression_reads_only_what_the_context_kept(embedded):
    """Query-agnostic: the token budgets are chosen by the context's last queries before the question
    comes; the full cache is unchanged by the split (one pass = context, then question)."""
    import torch

    from attnkit.core.family import architecture
    from attnkit.core.generate import continue_prompt, encode_prompts, prefill_prompt
    from attnkit.kvcache.config import HeadKVConfig

    model, tok = embedded
    ex = R.make_example("niah_single_1", tok, 512, 0)
    ids = encode_prompts(tok, [ex.prompt(False)], False)[0]
    split = R.question_start(tok, ex, False)
    whole = prefill_prompt(model, None, ids)
    later = continue_prompt(model, None, prefill_prompt(model, None, ids[:, :split]), ids[:, split:])
    torch.testing.assert_close(later.logits, whole.logits, atol=1e-4, rtol=1e-4)
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    cfg = HeadKVConfig(frozenset(heads[:1]), sink=4, window=16, prefill="full", budgets=tuple((k, 24) for k in heads[1:]))

    def kept(cache):
        return {(l.layer_idx, h): rows for l in cache.layers if hasattr(l, "kept_middle")
                for h, rows in l.kept_middle().items()}

    context_only = kept(prefill_prompt(model, cfg, ids[:, :split]).cache)
    after = continue_prompt(model, cfg, prefill_prompt(model, cfg, ids[:, :split]), ids[:, split:])
    aware = prefill_prompt(model, cfg, ids)
    assert kept(after.cache) == context_only != kept(aware.cache)  # chosen before the question, not by it
    assert after.cache.get_seq_length() == aware.cache.get_seq_length() == ids.shape[1]
    assert not torch.allclose(after.logits, aware.logits)


def test_the_run_with_the_question_after_compression(embedded, tmp_path, monkeypatch):
    import attnkit.kvcache.fork as kvfork
    from attnkit.core.family import architecture
    from attnkit.kvcache.config import HeadKVConfig
    from attnkit.evals.systems import System

    model, tok = embedded
    arch = architecture(model.config)
    heads = [(l, h) for l in arch.full_layers for h in range(arch.kv_heads)]
    systems = [System("full cache", {}),
               System("budgets", {}, HeadKVConfig(frozenset(heads[:1]), sink=4, window=16, prefill="full",
                                                  budgets=tuple((k, 24) for k in heads[1:])))]
    args = (model, tok, ["niah_single_1"], [512], 3, systems)
    aware = R.evaluate_ruler(*args, quiet=True, max_new_tokens=24)
    seen, once = [], kvfork.record_prefill
    monkeypatch.setattr(kvfork, "record_prefill",
                        lambda m, ids, mask, cfg, chunk: seen.append((ids.shape[1], chunk)) or once(m, ids, mask, cfg, chunk))
    shared = R.evaluate_ruler(*args, quiet=True, question_after=True, out=tmp_path / "after.jsonl", prefill_chunk=128,
                              max_new_tokens=24)
    assert len(seen) == 3 and all(c == 128 and n < 512 for n, c in seen)  # one context prefill per prompt
    alone = R.evaluate_ruler(*args, quiet=True, question_after=True, share_prefill=False, max_new_tokens=24)
    assert [r["answer"] for r in shared] == [r["answer"] for r in alone]  # one context prefill serves every cache
    full = [r["answer"] for r in shared if r["system"] == "full cache"]
    assert full == [r["answer"] for r in aware if r["system"] == "full cache"]
    assert [r["answer"] for r in shared] != [r["answer"] for r in aware]  # the budgets' choice moved
    with pytest.raises(AttnkitError, match="other settings"):  # never mixed with query-aware rows
        R.evaluate_ruler(*args, quiet=True, out=tmp_path / "after.jsonl", prefill_chunk=128, max_new_tokens=24)
