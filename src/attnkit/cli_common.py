"""Pieces shared by the command-line modules."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from attnkit.errors import AttnkitError

console = Console(stderr=True, soft_wrap=True)

# shared by every command that loads a model
MODEL_HELP = ("'embedded', a real model by name (`attnkit models list`), a .gguf file, a local model directory, "
              "or a Hugging Face Hub id (from the local cache)")
DEVICE = typer.Option("auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
DTYPE = typer.Option("auto", help="auto (the checkpoint's on a GPU, float32 on CPU), float32, bfloat16/bf16, float16/fp16")
DEVICE_MAP = typer.Option(None, "--device-map", help="'auto': spread the model over every visible GPU (accelerate)")
CHAT_TEMPLATE = typer.Option(None, "--chat-template/--no-chat-template",
                             help="wrap prompts in the tokenizer's chat template; default: when it has one")
# shared by the NIAH-style commands (niah, heads ablate, kv compare)
NEEDLES = typer.Option(None, help="needles JSONL (needle, question, real_needle), or \"passkey\"; default: built-in")
HAYSTACK = typer.Option(None, help=".txt file or folder of .txt files; default: built-in filler prose")
TRIALS_OUT = typer.Option(None, help="append results here as they finish; reruns resume")


def ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnkitError(f"{what}: expected comma-separated integers, got {text!r}") from None


def floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnkitError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def emit(result: dict, as_json: bool, render) -> None:
    """Print `result` as one JSON object, or call `render()` for the human-readable form."""
    if as_json:
        print(json.dumps(result))
    else:
        render()


def quiet_transformers() -> None:
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()




TECHNIQUE = typer.Option(None, "--technique", help="a registered technique (`attnkit techniques` lists them)")
SETTINGS = typer.Option(None, "--set", help="a setting of --technique as KEY=VALUE (repeat for more)")


def technique_choice(technique: str | None, settings: list[str] | None, kv: dict | None = None,
                     buckets: dict | None = None):
    """The technique a command runs, through the registry: `--technique NAME --set K=V`, or the older
    options that spell one (`--kv-*`: the KV cache's settings, `--bases/--search`: Buckets')."""
    from attnkit.core import registry

    if technique and (kv or buckets):
        raise AttnkitError("give --technique with --set, or the --kv-* / --bases / --search options, not both")
    if kv and buckets:
        raise AttnkitError("the retrieval-head KV cache cannot be combined with Attention Buckets (--bases/--search)")
    if kv:
        return registry.choice("kv-cache", given=kv)
    if buckets:
        return registry.choice("buckets", given=buckets)
    return registry.choice(technique, settings)


def kv_settings(scores, choose, full, sink, window, chunk, compensate, prefill, recipe, head_tokens) -> dict | None:
    """The `--kv-*` options as the KV cache entry's settings (None: no KV cache asked for)."""
    if not scores and choose is None:
        return None
    return {"scores": [str(p) for p in scores or []], "choose": choose or "retrieval", "full": full, "sink": sink,
            "window": window, "chunk": chunk, "compensate": compensate, "prefill": prefill, "recipe": recipe,
            "head-tokens": head_tokens}


def buckets_settings(bases: str | None, search: bool, combine: str) -> dict | None:
    """`--bases/--search/--combine` as the Buckets entry's settings (None: no buckets asked for)."""
    if not bases and not search:
        return None
    return {"bases": [b for b in bases.split(",") if b.strip()] if bases else [], "search": search, "combine": combine}


def span(text: str, what: str, parts: int) -> list[float]:
    """'a:b' or 'a:b:c' as numbers."""
    try:
        values = [float(x) for x in text.split(":")]
    except ValueError:
        values = []
    if len(values) != parts:
        raise AttnkitError(f"{what}: expected {':'.join('abc'[:parts])} numbers, got {text!r}")
    return values
