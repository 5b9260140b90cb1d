"""The kvpress worker's shared prefill (benchmarks/kvpress_worker.py) decodes what one prefill per press
decodes. It runs in kvpress's own venv (kvpress pins an older transformers): skipped without it."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_PYTHON = os.environ.get("ATTNKIT_KVPRESS_PYTHON") or str(ROOT / "benchmarks" / ".kvpress-venv" / "bin" / "python")
needs_kvpress = pytest.mark.skipif(not Path(KVPRESS_PYTHON).is_file(), reason="no kvpress venv (python "
                                   "benchmarks/kv_vs_kvpress.py builds benchmarks/.kvpress-venv, or set ATTNKIT_KVPRESS_PYTHON)")


def run_worker(tmp_path: Path, job: dict, shared: bool) -> list[dict]:
    """The worker's rows for `job`, with one prefill per prompt (`shared`) or one per press."""
    path = tmp_path / f"job_{shared}.json"
    path.write_text(json.dumps({**job, "shared_prefill": shared}))
    out = tmp_path / f"rows_{shared}.jsonl"
    r = subprocess.run([KVPRESS_PYTHON, ROOT / "benchmarks" / "kvpress_worker.py", path, out],
                       capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@needs_kvpress
def test_one_prefill_for_every_press_decodes_what_one_prefill_per_press_decodes(tmp_path):
    model = tiny_model("llama", 2)
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(1)
    prompts = [{"id": f"p{i}", "input_ids": torch.randint(3, 97, (100,), generator=g).tolist()} for i in range(2)]
    presses = [{"name": n, "ratio": r} for n in ("SnapKVPress", "StreamingLLMPress", "KnormPress",
                                                 "AdaKVPress(SnapKVPress)", "DuoAttentionPress") for r in (0.5, 0.75)]
    presses.insert(0, {"name": "none", "ratio": 0.0})
    duo = torch.rand(3, 2, generator=g).tolist()
    job = {"model": str(tmp_path / "model"), "eos": [], "sink": 2, "window": 8, "max_new_tokens": 10,
           "duo_scores": duo, "presses": presses, "threads": 2, "stop": "eos", "prompts": prompts}
    outs = {shared: {(x["press"], x["ratio"], x["prompt"]): x for x in run_worker(tmp_path, job, shared)}
            for shared in (False, True)}
    assert outs[True].keys() == outs[False].keys() and len(outs[True]) == len(presses) * len(prompts)
    for k, alone in outs[False].items():
        assert outs[True][k]["ids"] == alone["ids"], k
    # the presses decode differently, so the equality above is no accident of one answer
    assert len({str(x["ids"]) for x in outs[True].values()}) > 2
    # dropped keys are freed: a stronger press holds less
    held = {k[:2]: v["kv_bytes"] for k, v in outs[True].items() if k[2] == "p0"}
    assert held[("SnapKVPress", 0.75)] < held[("SnapKVPress", 0.5)] < held[("none", 0.0)]
    assert held[("AdaKVPress(SnapKVPress)", 0.75)] < held[("AdaKVPress(SnapKVPress)", 0.5)] < held[("none", 0.0)]


@needs_kvpress
def test_the_question_after_compression_reaches_the_cache_after_the_press(tmp_path):
    """With "question_from" the press compresses the context alone; the question then reads what was
    kept. No press: the same tokens as the whole prompt at once. Shared and per-press prefills agree."""
    model = tiny_model("llama", 2)
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, 97, (100,), generator=g).tolist() for _ in range(3)]
    prompts = [{"id": f"p{i}", "input_ids": x} for i, x in enumerate(ids)]
    prompts += [{"id": f"q{i}", "input_ids": x, "question_from": 97} for i, x in enumerate(ids)]
    presses = [{"name": "none", "ratio": 0.0}] + [{"name": n, "ratio": 0.75} for n in
                                                   ("SnapKVPress", "AdaKVPress(SnapKVPress)", "DuoAttentionPress")]
    job = {"model": str(tmp_path / "model"), "eos": [], "sink": 2, "window": 8, "max_new_tokens": 10,
           "duo_scores": torch.rand(3, 2, generator=g).tolist(), "presses": presses, "threads": 2, "stop": "eos",
           "prompts": prompts}
    outs = {shared: {(x["press"], x["prompt"]): x["ids"] for x in run_worker(tmp_path, job, shared)}
            for shared in (False, True)}
    assert outs[True] == outs[False]
    rows = outs[True]
    assert all(rows[("none", f"q{i}")] == rows[("none", f"p{i}")] for i in range(3))  # the split alone changes nothing
    assert any(rows[("SnapKVPress", f"q{i}")] != rows[("SnapKVPress", f"p{i}")] for i in range(3))  # the choice moved


@needs_kvpress
def test_the_memory_probe_shows_what_kvpress_frees_and_what_it_only_masks(tmp_path):
    """A press that drops keys holds less after the prompt, and at its peak, than no press; AdaKV masks the
    keys it drops, so its process still holds all of them."""
    model = tiny_model("llama", 2)
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(2)
    prompts = [{"id": "p0", "input_ids": torch.randint(3, 97, (200,), generator=g).tolist()}]
    presses = [{"name": "none", "ratio": 0.0}, {"name": "SnapKVPress", "ratio": 0.75},
               {"name": "AdaKVPress(SnapKVPress)", "ratio": 0.75}]
    job = {"model": str(tmp_path / "model"), "eos": [], "sink": 2, "window": 8, "max_new_tokens": 4,
           "duo_scores": [], "presses": presses, "threads": 2, "stop": "eos", "prompts": prompts,
           "probe": {"prompt": "p0", "max_new_tokens": 4}}
    rows = run_worker(tmp_path, job, True)
    probe = {r["press"]: r for r in rows if r.get("probe")}
    assert probe.keys() == {"none", "SnapKVPress", "AdaKVPress(SnapKVPress)"}
    full = probe["none"]["held_kv_bytes"]
    assert probe["none"]["peak_kv_bytes"] == full > 0
    snap = probe["SnapKVPress"]
    assert snap["held_kv_bytes"] < 0.3 * full and snap["held_kv_bytes"] <= snap["peak_kv_bytes"] < full
    assert probe["AdaKVPress(SnapKVPress)"]["held_kv_bytes"] == full
    assert all(r["peak_rss_gib"] and r["peak_rss_gib"] > 0 for r in probe.values())
    assert len([r for r in rows if not r.get("probe")]) == len(presses)  # the answers as before
