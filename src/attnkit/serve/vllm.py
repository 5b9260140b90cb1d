"""`attnkit serve --engine vllm`: vLLM serves the model, in vLLM's own environment.

vLLM pins its own torch and transformers, so it lives in a venv beside attnkit's
(`bash scripts/vllm_venv.sh` builds it and installs attnkit's vLLM plugin there). attnkit resolves the
model (a pulled name, a folder, a .gguf), checks the technique before anything starts, and hands over
to `python -m vllm.entrypoints.openai.api_server` in that venv. Techniques through vLLM:

* plain: vLLM's own full cache (and, on Gemma 3, its own sliding-window layers);
* `kv-cache`: the retrieval-head KV cache by `kvcache/vllm_plugin.py`: full heads keep vLLM's full cache,
  the others sink + window (attnkit's cache spec and block manager: sink blocks and window blocks held,
  the blocks between them freed): with `--kv-prefill full` (the default) once the prompt has run, so
  window heads read the whole prompt; with `--kv-prefill window` as the prefill moves on, window heads
  then attending within sink + window during prefill too. attnkit's own cache with the same settings
  decodes the same tokens. Prefix caching is turned off for it;
* Attention Buckets: not through vLLM. A request needs one model row per RoPE base, every row its own
  rotary base, and their next-token logits combined before sampling; vLLM applies one rotary embedding
  per layer to every sequence and samples each sequence on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from attnkit.errors import AttnkitError
from attnkit.kvcache.vllm_form import PLAN_KEY

PYTHON_ENV = "ATTNKIT_VLLM_PYTHON"
BUILD_HINT = "bash scripts/vllm_venv.sh (in attnkit's source tree) builds one"


def find_python(given: str | None) -> str:
    """The Python of vLLM's venv: --vllm-python, else $ATTNKIT_VLLM_PYTHON; checked to hold vLLM."""
    python = given or os.environ.get(PYTHON_ENV)
    if not python:
        raise AttnkitError(f"--engine vllm needs the Python of a venv with vLLM: give --vllm-python PATH or set "
                           f"{PYTHON_ENV} ({BUILD_HINT})")
    if not Path(python).is_file():
        raise AttnkitError(f"--vllm-python {python}: no such file ({BUILD_HINT})")
    probe = subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
                           capture_output=True)
    if probe.returncode != 0:
        raise AttnkitError(f"--vllm-python {python}: vLLM is not installed there ({BUILD_HINT})")
    return python


def overrides(choice, model: str) -> dict | None:
    """The `--hf-overrides` that run the technique `choice` (a `core.registry.Choice`) inside vLLM: None
    for the plain model, the entry's `vllm` form otherwise, checked on the record before any weights
    load (and computed again after `finish`, which may load them: the KV cache's recipe), or a clear
    error for a technique without one."""
    from attnkit.core import registry
    from attnkit.core.loading import load_config, load_model

    if choice.name == "plain":
        return None
    entry = registry.entry(choice.name)
    if not callable(entry.vllm):
        raise AttnkitError(f"{choice.name} does not run inside vLLM: {entry.vllm or 'it has no vLLM form'}")
    config = load_config(model)
    record = choice.build(config)
    found = entry.vllm(record, config)
    if entry.finish is None:
        return found
    mdl, tok = load_model(model)
    return entry.vllm(choice.finish(record, mdl, tok), config)


def engine_dtype(dtype: str, gpu: bool) -> str:
    """The --dtype vLLM is given: attnkit's `auto` means float32 without a GPU, as it does for attnkit's
    own engine (vLLM's `auto` takes the checkpoint's bfloat16, which a CPU without native bfloat16
    emulates: a 1.5B model's start-up warm-up alone ran past 10 minutes that way on 2 cores, against
    under 4 in float32). On a GPU, or for any other name, vLLM gets what was asked."""
    return "float32" if dtype.lower() == "auto" and not gpu else dtype


def command(python: str, model_path: Path, name: str, host: str, port: int, dtype: str = "auto",
            overrides: dict | None = None, max_model_len: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The vLLM server's command line. An API key travels in the environment (VLLM_API_KEY), not here."""
    from attnkit.core.loading import DTYPES  # the names --dtype takes everywhere

    name_of = {"auto": "auto", **DTYPES}
    if dtype.lower() not in name_of:
        raise AttnkitError(f"unknown --dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
            "--served-model-name", name, "--host", host, "--port", str(port), "--dtype", name_of[dtype.lower()]]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if overrides:
        argv += ["--hf-overrides", json.dumps(overrides)]
        given = {"--enable-prefix-caching", "--no-enable-prefix-caching"} & set(extra)
        if (overrides.get(PLAN_KEY) or {}).get("sink") and not given:
            argv += ["--no-enable-prefix-caching"]  # a sink + window head's cache hits would need its sink blocks
    return argv + list(extra)


def environment(api_key: str | None) -> dict:
    env = dict(os.environ)
    env.pop(PYTHON_ENV, None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env



def wait_until_healthy(process, base: str, timeout: float) -> bool:
    """Poll `base`/health until it answers 200 (True), or the server process exits or `timeout`
    seconds pass (False). vLLM on CPU compiles its graphs at start-up, which takes minutes."""
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False
