"""vLLM as attnkit's second engine: `serve --engine vllm`, the retrieval-head KV cache as a vLLM plugin,
and the S2A proxy and `s2a eval --backend openai` against a real vLLM server.

The checks of what attnkit decides (the plan's vLLM form, the refusals, the command line) run
everywhere. The ones against vLLM need its venv (`bash scripts/vllm_venv.sh`, or $ATTNKIT_VLLM_PYTHON)
and skip with that reason without it; they start vLLM on SmolLM2 through `attnkit serve --engine vllm`.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from attnkit.cli import app
from attnkit.kvcache.config import HeadKVConfig
from attnkit.core.registry import choice
from attnkit.errors import AttnkitError
from attnkit.kvcache.technique import vllm_overrides
from attnkit.kvcache.vllm_form import ARCHITECTURE, ARCHITECTURES, PLAN_KEY, head_letters, read_plan
from attnkit.s2a import tasks as T
from attnkit.serve import vllm
from conftest import result_lines, tiny_config

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get(vllm.PYTHON_ENV) or str(ROOT / "benchmarks" / ".vllm-venv" / "bin" / "python")
needs_vllm = pytest.mark.skipif(not Path(VLLM_PYTHON).is_file(),
                                reason="no vLLM venv (bash scripts/vllm_venv.sh, or set ATTNKIT_VLLM_PYTHON)")


def test_the_plan_in_vllm_form_and_what_it_refuses():
    config = tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    kv = HeadKVConfig(frozenset({(2, 1), (0, 0)}), sink=16, window=32, prefill="window")
    found = vllm_overrides(kv, config)
    assert found == {"architectures": [ARCHITECTURE],
                     PLAN_KEY: {"full": [[0, 0], [2, 1]], "window": 32, "sink": 16, "prefill": "window"}}
    json.dumps(found)  # travels as --hf-overrides
    full_prefill = vllm_overrides(HeadKVConfig(kv.full, sink=16, window=32, prefill="full"), config)
    assert full_prefill[PLAN_KEY]["prefill"] == "full"
    assert read_plan(full_prefill[PLAN_KEY])["prefill"] == "full" and read_plan({"full": [], "window": 8})["prefill"] == "window"
    with pytest.raises(ValueError, match="'full' or 'window'"):
        read_plan({"full": [], "window": 8, "prefill": "chunked"})
    refused = {"compensation": HeadKVConfig(kv.full, sink=16, window=32, prefill="window", compensate=True),
               "token budgets": HeadKVConfig(kv.full, sink=16, window=32, prefill="full", budgets={(1, 0): 8})}
    for why, cfg in refused.items():
        with pytest.raises(AttnkitError, match="vLLM"):
            vllm_overrides(cfg, config)
    for family, arch in (("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"), ("mistral", "MistralForCausalLM")):
        other = tiny_config(family)
        other.architectures = [arch]
        assert vllm_overrides(kv, other)["architectures"] == [ARCHITECTURES[arch]]
    gemma = tiny_config("gemma3")
    gemma.architectures = ["Gemma3ForCausalLM"]
    with pytest.raises(AttnkitError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*this one is Gemma3ForCausalLM"):
        vllm_overrides(kv, gemma)
    argv = vllm.command("/py", Path("m"), "m", "h", 1, overrides=found)
    assert "--no-enable-prefix-caching" in argv  # the sink blocks cannot come from another request's cache


def test_vllm_reads_one_integer_from_every_split_layer_name():
    names = [head_letters(h) for h in range(800)]  # vLLM takes a layer's index from the one integer in its name
    assert len(set(names)) == 800
    assert all(re.findall(r"\d+", f"model.layers.17.self_attn.attn_{n}") == ["17"] for n in names)


def test_buckets_and_the_proxy_do_not_start_vllm(tmp_path):
    with pytest.raises(AttnkitError, match="buckets does not run inside vLLM: a request needs one model row per RoPE"):
        vllm.overrides(choice("buckets", given={"bases": ["10000", "20000"], "search": False}), "embedded")
    assert vllm.overrides(choice(None), "embedded") is None
    def refused(*args, env=None) -> str:  # the command's one-line error (cli.main prints it)
        r = CliRunner().invoke(app, ["serve", "--engine", "vllm", *args], env=env)
        assert isinstance(r.exception, AttnkitError), r.output
        return str(r.exception)

    assert "the S2A proxy (--upstream) runs in front of any server" in refused("--upstream", "http://127.0.0.1:9/v1")
    assert "no such file" in refused("--model", "embedded", "--vllm-python", str(tmp_path / "py"))
    assert "vLLM is not installed there" in refused("--model", "embedded", "--vllm-python", sys.executable)
    assert "scripts/vllm_venv.sh" in refused("--model", "embedded", env={vllm.PYTHON_ENV: ""})
    assert "--engine must be attnkit or vllm" in CliRunner().invoke(
        app, ["serve", "--engine", "tgi", "--model", "embedded"]).exception.args[0]


def test_auto_means_float32_without_a_gpu_as_in_attnkits_own_engine(tmp_path):
    assert vllm.engine_dtype("auto", gpu=False) == "float32" and vllm.engine_dtype("auto", gpu=True) == "auto"
    assert vllm.engine_dtype("bf16", gpu=False) == "bf16"  # asked for by name: given as asked
    argv = vllm.command("/py", tmp_path, "m", "h", 1, vllm.engine_dtype("auto", gpu=False))
    assert argv[argv.index("--dtype") + 1] == "float32"


def test_the_command_keeps_the_key_out_of_the_arguments(tmp_path):
    argv = vllm.command("/py", tmp_path, "m", "127.0.0.1", 8011, "fp32", {"a": [1]}, 4096, ("--enforce-eager",))
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[argv.index("--max-model-len") + 1] == "4096"
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == {"a": [1]} and argv[-1] == "--enforce-eager"
    env = vllm.environment("sk-1")
    assert env["VLLM_API_KEY"] == "sk-1" and "sk-1" not in " ".join(argv)
    with pytest.raises(AttnkitError, match="unknown --dtype"):
        vllm.command("/py", tmp_path, "m", "h", 1, "int8")



def test_waiting_for_a_server_that_died_ends_at_once():
    import time

    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    t = time.time()
    assert not vllm.wait_until_healthy(dead, f"http://127.0.0.1:{_port()}", timeout=120)
    assert time.time() - t < 30


# ----------------------------------------------------------------------------- against a real vLLM

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`attnkit serve --engine vllm ...` in a process of its own, until /health answers."""

    def __init__(self, tmp: Path, *flags: str, model: str = "smollm2-135m-instruct"):
        self.port, self.log = _port(), tmp / f"vllm_{len(flags)}.log"
        cmd = [sys.executable, "-m", "attnkit.cli", "serve", "--engine", "vllm", "--vllm-python", VLLM_PYTHON,
               "--model", model, "--port", str(self.port), "--dtype", "float32",
               "--vllm-arg=--enforce-eager", "--vllm-arg=--max-model-len=2048", *flags]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.process = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        if not vllm.wait_until_healthy(self.process, f"http://127.0.0.1:{self.port}", 600):
            self.stop()
            text = self.log.read_text()
            causes = list(dict.fromkeys(re.findall(r"\b\w+Error: .*", text)))  # vLLM's own reason first
            pytest.fail(f"vLLM did not start: {' | '.join(causes[:3]) or text[-3000:]}")

    def served(self) -> int:
        """Requests vLLM has finished, from its own metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        return int(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([\d.e+]+)$", text, re.M)))

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# SmolLM2's plan in the plugin tests: every other layer's first KV head and two more full, 16 sink
# tokens and a window of 64 for the rest (30 layers, 3 KV heads of 3 query heads each)
PLUGIN_FULL = sorted({(layer, 0) for layer in range(0, 30, 2)} | {(5, 2), (23, 1)})


def plugin_server(tmp: Path, prefill: str) -> VLLMServer:
    """`attnkit serve --engine vllm` on SmolLM2 with the plugin and exactly PLUGIN_FULL full (a score
    file naming them), prompts prefilled 256 tokens a step."""
    scores = tmp / "scores.json"
    scores.write_text(json.dumps({f"{layer}-{q}": [1.0 if (layer, q // 3) in PLUGIN_FULL else 0.0]
                                  for layer in range(30) for q in range(9)}))
    return VLLMServer(tmp, "--kv-scores", str(scores), "--kv-full", str(len(PLUGIN_FULL) / 90), "--no-kv-recipe",
                      "--kv-sink", "16", "--kv-window", "64", "--kv-prefill", prefill,
                      "--vllm-arg=--max-num-batched-tokens=256")


@pytest.fixture(scope="module")
def plugin_vllm(tmp_path_factory, smollm2):
    """One vLLM server with the plugin (full prefill) for the module: the plugin's test of that prefill
    and the S2A proxy's test (any vLLM endpoint serves the proxy) share its start-up."""
    server = plugin_server(tmp_path_factory.mktemp("vllm"), "full")
    yield server
    server.stop()


@needs_vllm
@pytest.mark.slow
def test_s2a_proxy_and_s2a_eval_over_real_vllm(plugin_vllm, tmp_path):
    from test_s2a_pipeline import write_sycophancy
    from test_serve import LOUVRE, Running, client

    from attnkit.serve.proxy import proxy_app

    before = plugin_vllm.served()
    proxy = Running(proxy_app(plugin_vllm.url, "s2a"))
    try:
        r = client(proxy.url).chat.completions.create(model="smollm2-135m-instruct", messages=LOUVRE, max_tokens=48,
                                                      temperature=0)
    finally:
        proxy.stop()
    info = r.model_extra["s2a"]
    assert info["variant"] == "s2a" and r.choices[0].message.content.strip()
    assert r.system_fingerprint and r.system_fingerprint.startswith("vllm")  # vLLM answered, through the proxy
    assert plugin_vllm.served() - before == 2  # the rewrite, then the answer from the rewrite alone
    write_sycophancy(tmp_path / "answer.jsonl", n=2)
    out = tmp_path / "rows.jsonl"
    r = CliRunner().invoke(app, ["s2a", "eval", "sycophancy", "--data", str(tmp_path / "answer.jsonl"),
                                 "--backend", "openai", "--base-url", plugin_vllm.url, "--model", "smollm2-135m-instruct",
                                 "--templates", "suggest-incorrect", "--variants", "baseline,s2a",
                                 "--max-tokens", "24", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in result_lines(out) if "variant" in x]
    assert len(rows) == 4 and all(row["tokens"]["completion"] > 0 for row in rows)
    for row in rows:  # scored from vLLM's answers by the task's rule (the alias named, not negated)
        assert row["mentioned"] == float("paris" in re.findall(r"[a-z]+", row["answer"].lower()))
        assert row["score"] == float(T.asserted_match(row["answer"], ["Paris"]))


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("prefill", ["full", "window"])
def test_the_plugin_decodes_what_attnkits_cache_decodes(smollm2, tmp_path, prefill, request):
    """vLLM with the per-head split against attnkit's HF cache with the same plan (16 sink tokens, a
    window of 64) and prefill, greedy in float32, on three prompts of 500-900 tokens sent at once
    (decoded together by vLLM, the prompts prefilled in chunks of 256 tokens): the window heads' middle
    blocks freed (with the full prefill: only once the prompt has run), their sink blocks kept and read.
    The prefill modes decode differently here, so each is told apart from the other."""
    from concurrent.futures import ThreadPoolExecutor

    from attnkit.core.generate import generate
    from attnkit.evals import niah as N

    model, tok = smollm2
    kv = HeadKVConfig(frozenset(PLUGIN_FULL), sink=16, window=64, prefill=prefill)
    other = HeadKVConfig(frozenset(PLUGIN_FULL), sink=16, window=64,
                         prefill={"full": "window", "window": "full"}[prefill])
    no_sink = HeadKVConfig(frozenset(PLUGIN_FULL), sink=0, window=64, prefill=prefill)
    haystack = N.load_haystack(None)
    prompts = [N.prompt_builder("clean", tok, haystack, True, n).build(needle, n, 50).input_ids
               for n, needle in zip((900, 700, 500), N.passkey_needles())]
    want = [generate(model, tok, ids, None, kv, 24, stop_rule="eos").ids[0] for ids in prompts]
    ids = prompts[0]
    plain = generate(model, tok, ids, None, None, 24, stop_rule="eos").ids[0]
    without = generate(model, tok, ids, None, no_sink, 24, stop_rule="eos").ids[0]
    assert want[0] != plain and want[0] != without, "the sinks or the window change nothing here: the test could not fail"
    assert want[0] != generate(model, tok, ids, None, other, 24, stop_rule="eos").ids[0], "the prefill changes nothing"
    shared = prefill == "full"  # the module's server; the window prefill gets a server of its own
    server = request.getfixturevalue("plugin_vllm") if shared else plugin_server(tmp_path, prefill)

    def ask(ids):
        r = httpx.post(server.url + "/completions", json={"model": "smollm2-135m-instruct", "prompt": ids[0].tolist(),
                                                           "max_tokens": 24, "temperature": 0, "return_token_ids": True},
                       timeout=300)
        return r.json()["choices"][0]["token_ids"]

    try:
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, prompts))
        log = server.log.read_text()
    finally:
        if not shared:
            server.stop()
    assert "AttnkitHeadSplitLlama" in log and f'"prefill": "{prefill}"' in log
    for g, w in zip(got, want):
        assert g == w, (tok.decode(g), tok.decode(w))


@needs_vllm
@pytest.mark.slow
def test_the_plugin_splits_a_qwen2_model_and_decodes_what_attnkits_cache_decodes(smollm2, tmp_path):
    """A small random Qwen2 (biased q/k/v projections, 2 query heads per KV head) saved as a model folder:
    vLLM with the plugin (8 sink tokens, a window of 32) against attnkit's HF cache, greedy in float32."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from attnkit.core.generate import generate
    from attnkit.core.loading import load_model

    _, tok = smollm2
    config = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # decisive next tokens: a float32 difference in the last digits cannot flip them
        model.lm_head.weight.mul_(50)
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tok = load_model(str(folder), dtype="float32")
    full = [(0, 1), (1, 0)]
    kv = HeadKVConfig(frozenset(full), sink=8, window=32, prefill="window")
    ids = torch.randint(100, len(tok) - 100, (1, 300), generator=torch.Generator().manual_seed(1))
    want = generate(model, tok, ids, None, kv, 16, stop_rule="eos").ids[0]
    plain = generate(model, tok, ids, None, None, 16, stop_rule="eos").ids[0]
    without = generate(model, tok, ids, None, HeadKVConfig(frozenset(full), sink=0, window=32, prefill="window"),
                       16, stop_rule="eos").ids[0]
    assert want != plain and want != without, "the sinks or the window change nothing here: the test could not fail"
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({f"{layer}-{q}": [1.0 if (layer, q // 2) in full else 0.0]
                                  for layer in range(2) for q in range(4)}))
    server = VLLMServer(tmp_path, "--kv-scores", str(scores), "--kv-full", "0.5", "--no-kv-recipe", "--kv-sink", "8",
                        "--kv-window", "32", "--kv-prefill", "window", model=str(folder))
    try:
        r = httpx.post(server.url + "/completions", json={"model": "tiny-qwen2", "prompt": ids[0].tolist(),
                                                           "max_tokens": 16, "temperature": 0,
                                                           "return_token_ids": True}, timeout=300)
        got = r.json()["choices"][0]["token_ids"]
        log = server.log.read_text()
    finally:
        server.stop()
    assert "AttnkitHeadSplitQwen2" in log
    assert got == want, (got, want)
