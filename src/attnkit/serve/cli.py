"""The `attnkit serve` command."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional, List

import typer

from attnkit.cli_common import (DEVICE, DEVICE_MAP, DTYPE, MODEL_HELP, SETTINGS, TECHNIQUE, console, quiet_transformers,
                                technique_choice, technique_options)
from attnkit.core.family import architecture
from attnkit.errors import AttnkitError


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: Optional[str], insecure: bool) -> None:
    """Refuse to serve a non-loopback address without a key, unless told --insecure."""
    if api_key or _loopback(host):
        return
    if not insecure:
        raise AttnkitError(f"--host {host} is reachable from other machines: give --api-key-env NAME so that "
                           "clients need a key, or --insecure to serve without one")
    console.print(f"[yellow]warning: serving {host} without an API key (--insecure): anyone who reaches it can use it[/yellow]")


def _key(env: Optional[str], what: str) -> Optional[str]:
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise AttnkitError(f"{what}: environment variable {env} is not set or empty")
    return value


@technique_options("kv-cache", "buckets")
def serve(model: Optional[str] = typer.Option(None, help="serve this model: " + MODEL_HELP),
          upstream: Optional[str] = typer.Option(None, help="S2A proxy: the OpenAI-compatible URL to forward to"),
          s2a: str = typer.Option("s2a", help="proxy: the S2A variant applied to each request"),
          host: str = typer.Option("127.0.0.1", help="interface to bind (loopback by default)"),
          port: int = typer.Option(8000),
          api_key_env: Optional[str] = typer.Option(None, help="clients must send Bearer <the value of this variable>"),
          insecure: bool = typer.Option(False, help="allow a non-loopback --host without --api-key-env"),
          upstream_key_env: Optional[str] = typer.Option(None, help="proxy: env variable with the upstream's key "
                                                                    "(default: each client's own bearer key)"),
          upstream_timeout: float = typer.Option(120.0, help="proxy: seconds to wait for the upstream"),
          max_queue: int = typer.Option(256, help="requests that may wait to join the batch; more get 429 with Retry-After"),
          max_batch: int = typer.Option(32, help="requests decoded together in one batch (1: one at a time)"),
          max_kv_bytes: Optional[int] = typer.Option(None, help="KV-cache budget for the running batch in bytes; "
                                                                "default: half the free memory at start"),
          max_body: int = typer.Option(4 << 20, help="largest request body in bytes; larger get 413"),
          max_tokens: int = typer.Option(512, help="new tokens when a request names none"),
          technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS,
          engine: str = typer.Option("attnkit", help="attnkit (this process) or vllm (vLLM's server in its own venv; "
                                                     "plain or --technique kv-cache)"),
          vllm_python: Optional[str] = typer.Option(None, help="--engine vllm: the Python of vLLM's venv (default: "
                                                               "$ATTNKIT_VLLM_PYTHON; bash scripts/vllm_venv.sh builds one)"),
          vllm_arg: Optional[List[str]] = typer.Option(None, help="--engine vllm: one more argument for vLLM's "
                                                                  "server, as it is (repeat)"),
          device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP, spelled: dict = None):
    """An OpenAI-compatible server over a local model (plain, Attention Buckets or the retrieval-head KV
    cache), or an S2A proxy in front of another server."""
    import uvicorn

    if (model is None) == (upstream is None):
        raise AttnkitError("give exactly one of --model (serve a local model) or --upstream (S2A proxy)")
    if min(max_queue, max_batch, max_body, max_tokens) < 1 or upstream_timeout <= 0 or (max_kv_bytes or 1) < 1:
        raise AttnkitError("--max-queue, --max-batch, --max-kv-bytes, --max-body, --max-tokens and "
                           "--upstream-timeout must be positive")
    if engine not in ("attnkit", "vllm"):
        raise AttnkitError(f"--engine must be attnkit or vllm, got {engine!r}")
    if engine == "vllm" and upstream:
        raise AttnkitError("--engine vllm serves a --model; the S2A proxy (--upstream) runs in front of any server, "
                           "a vLLM one included")
    api_key = _key(api_key_env, "--api-key-env")
    check_exposure(host, api_key, insecure)
    choice = None if upstream else technique_choice(technique, settings, spelled)
    if engine == "vllm":
        return serve_vllm(model, choice, vllm_python, host, port, dtype, api_key, tuple(vllm_arg or ()))
    if upstream:
        from attnkit.s2a.prompts import VARIANTS
        from attnkit.serve.proxy import proxy_app
        if s2a not in VARIANTS or VARIANTS[s2a].rewrite is None:
            raise AttnkitError(f"--s2a must be a rewriting variant: {', '.join(k for k, v in VARIANTS.items() if v.rewrite)}")
        app = proxy_app(upstream, s2a, _key(upstream_key_env, "--upstream-key-env"), api_key, upstream_timeout, max_body)
        what = f"S2A proxy ({s2a}) for {upstream}"
    else:
        runner = build_engine(model, choice, device, dtype, max_queue, device_map, max_batch, max_kv_bytes)
        from attnkit.serve.app import local_app
        app = local_app(runner, Path(model).name or model, api_key, max_body, max_tokens)
        what = f"{model} ({runner.describe()['technique']})"
    console.print(f"attnkit serve: {what} at http://{host}:{port}/v1 "
                  f"({'API key required' if api_key else 'no API key'}); Ctrl-C stops", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def serve_vllm(model: str, choice, python: str | None, host: str, port: int, dtype: str, api_key: str | None,
               extra: tuple[str, ...]) -> None:
    """Hand over to vLLM's OpenAI server in its own venv (this process becomes it)."""
    from attnkit.core.loading import resolve_spec
    from attnkit.serve import vllm

    import torch

    python = vllm.find_python(python)
    path = resolve_spec(model)
    quiet_transformers()
    argv = vllm.command(python, path, Path(model).name or model, host, port,
                        vllm.engine_dtype(dtype, torch.cuda.is_available()), vllm.overrides(choice, model), extra=extra)
    console.print(f"attnkit serve --engine vllm: {' '.join(argv[1:])}", highlight=False, soft_wrap=True)
    os.execve(python, argv, vllm.environment(api_key))


def build_engine(model: str, choice=None, device: str = "cpu", dtype: str = "auto", max_queue: int = 256,
                 device_map=None, max_batch: int = 32, max_kv_bytes: int | None = None):
    """The engine `attnkit serve` runs: the model with the technique `choice` (a `core.registry.Choice`;
    None: the plain model), its settings checked before the weights load."""
    from attnkit.core import registry
    from attnkit.serve.engine import Engine

    choice = choice or registry.choice(None)
    quiet_transformers()
    mdl, tok, record = choice.load(model, device=device, dtype=dtype, device_map=device_map)
    return Engine(mdl, tok, record, architecture(mdl.config).max_positions, max_queue, max_batch, max_kv_bytes)
