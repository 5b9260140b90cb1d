"""attnkit as an lm-evaluation-harness model, offline: a long-context generation task read from local
files runs through `lm_eval.simple_evaluate(model="attnkit", ...)`; the technique is active inside
lm-eval's own generate (an all-window cache loses the needles the plain model finds), and the
`attnkit-lm-eval` command runs lm-eval's command line with attnkit registered."""

import json
import os
import re
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")


def _task(folder, rows):
    """A generate_until task over a local JSON-lines file (no hub): recall of a passkey in ~600 tokens."""
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "attnkit_passkey.yaml").write_text(f"""task: attnkit_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'data.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: !function metric.contains
    aggregation: mean
    higher_is_better: true
""")
    (folder / "metric.py").write_text("def contains(references, predictions):\n"
                                      "    return float(references[0] in predictions[0])\n")


def _rows(tok):
    """attnkit's own NIAH prompts at 512 tokens (the embedded model's format), as text."""
    from attnkit.evals import niah as N

    build = N.PromptBuilder(tok, N.load_haystack(None))
    rows = []
    for i, needle in enumerate(N.load_needles("passkey")[:4]):
        prompt = build.build(needle, 512, (25.0, 50.0, 75.0, 40.0)[i])
        rows.append({"prompt": tok.decode(prompt.input_ids[0], skip_special_tokens=True), "answer": needle.real_needle})
    return rows


def test_lm_eval_runs_an_attnkit_technique_offline_and_the_technique_moves_the_score(tmp_path, embedded,
                                                                                    monkeypatch):
    from lm_eval.tasks import TaskManager

    import attnkit.lmeval  # noqa: F401  (registers the model)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _task(tmp_path, _rows(embedded[1]))
    manager = TaskManager(include_path=str(tmp_path))

    def run(model_args):
        out = lm_eval.simple_evaluate(model="attnkit", model_args=model_args, tasks=["attnkit_passkey"],
                                      task_manager=manager, batch_size=2, device="cpu", log_samples=True)
        return out["results"]["attnkit_passkey"]["contains,none"], out["samples"]["attnkit_passkey"]

    plain, plain_samples = run("model=embedded")
    window, window_samples = run("model=embedded,technique=kv-cache,choose=none,sink=4,window=16,recipe=false")
    assert plain >= 0.75, [s["resps"] for s in plain_samples]
    assert window < plain, [s["resps"] for s in window_samples]  # the all-window cache is really in generate


def test_the_lm_eval_command_takes_attnkit_and_reports_a_bad_setting_in_one_line():
    r = subprocess.run([sys.executable, "-m", "attnkit.lmeval", "--model", "attnkit", "--model_args",
                        "model=embedded,technique=kv-cache,no_such_setting=1", "--tasks", "arc_easy", "--limit", "1"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2 and "no_such_setting" in r.stderr.replace("-", "_"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_lm_evals_own_ruler_runs_offline_on_a_pulled_model_and_equals_attnkits_loop(tmp_path, smollm2):
    """`offline_ruler(essays=DIR)`: lm-eval's RULER needle tasks build with no Hub and no nltk download,
    sized by the pulled model's own tokenizer, the haystack made of DIR's essays and nothing else; lm-eval
    then runs them with attnkit's KV cache at a memory target, and its answers equal attnkit's own loop
    on the same prompts with the same cache. An essay task without a folder stops with one line."""
    pytest.importorskip("wonderwords")
    import random

    from attnkit.core import registry
    from attnkit.core.generate import generate
    from attnkit.errors import AttnkitError
    from attnkit.lmeval import offline_ruler

    model, tok = smollm2
    essays = tmp_path / "essays"
    essays.mkdir()
    for i in range(3):
        (essays / f"{i}.txt").write_text(" ".join(f"Zebra number {i} grazes near river bend {j}." for j in range(900)))
    offline_ruler(essays, samples=1)
    from lm_eval.tasks import TaskManager

    random.seed(0)
    tasks = TaskManager(metadata={"model": "smollm2-135m-instruct", "max_seq_lengths": [2048]})
    docs = list(tasks.load(["niah_single_2"])["tasks"]["niah_single_2"].test_docs())
    assert len(docs) == 1
    ours = set(" ".join(f.read_text() for f in essays.glob("*.txt")).split())
    for doc in docs:
        haystack = doc["input"].split("\n")[1]
        assert f"is: {doc['outputs'][0]}." in haystack
        rest = re.sub(r"One of the special magic numbers for [\w-]+ is: \d+\.", " ", haystack)
        assert set(rest.split()) <= ours  # every other word is an essay's
        assert 1024 < len(tok(doc["input"])["input_ids"]) + 128 <= 2048  # sized by attnkit's tokenizer

    import attnkit.lmeval  # noqa: F401  (registers the model)

    out = lm_eval.simple_evaluate(model="attnkit", model_args="model=smollm2-135m-instruct,technique=kv-cache,memory=0.25",
                                  tasks=["niah_single_2"], task_manager=tasks, batch_size=1, device="cpu",
                                  log_samples=True, bootstrap_iters=0, gen_kwargs="max_gen_toks=24")
    choice = registry.choice("kv-cache", ["memory=0.25"])
    record = choice.finish(choice.build(model.config), model, tok)  # what lm-eval's backend holds
    for sample in out["samples"]["niah_single_2"]:
        ids = tok(sample["arguments"][0][0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        mine = tok.decode(generate(model, tok, ids, None, record, 24, stop_rule="eos").ids[0], skip_special_tokens=True)
        assert sample["resps"][0][0].strip() == mine.strip() and any(c.isdigit() for c in mine), mine
    offline_ruler(None)
    with pytest.raises(AttnkitError, match="essay haystack comes from the Hugging Face Hub"):
        tasks.load(["niah_single_2"])
