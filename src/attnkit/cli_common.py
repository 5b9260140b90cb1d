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


# the older spellings of two techniques' settings: `--kv-<setting>` and `--<setting>` (Buckets' --bases ...).
# Each is generated from the technique's registry entry (type, default, help): a setting is written once.
SPELLINGS = {"kv-cache": "kv-", "buckets": ""}
TITLES = {"kv-cache": "the retrieval-head KV cache", "buckets": "Attention Buckets"}


def technique_options(*names: str):
    """Decorate a command so that it also takes each named technique's settings as options, spelled
    `--<prefix><setting>` (prefixes in `SPELLINGS`), generated from the technique's registry entry. The
    command receives `spelled`: {technique: {setting: value}} for the options given on the command line
    (an option not given is absent: the registry's default applies). Pass it to `technique_choice`."""
    import functools
    import inspect
    from typing import List, Optional

    from attnkit.core import registry

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "spelled"]
        added: dict[str, tuple[str, object]] = {}
        for name in names:
            for o in registry.entry(name).options:
                flag = f"--{SPELLINGS[name]}{o.name}"
                pname = flag[2:].replace("-", "_")
                shown = ",".join(o.default) if o.type is list else o.default
                text = f"{o.help} [{name}; default: {shown if shown not in ('', []) else 'none'}]"
                if o.type is bool:
                    kind, option = Optional[bool], typer.Option(None, f"{flag}/--no-{flag[2:]}", help=text)
                elif o.type is list:
                    kind, option = Optional[List[str]], typer.Option(None, flag, help=text + " (repeat or comma-separate)")
                else:
                    kind, option = Optional[o.type], typer.Option(None, flag, help=text)
                params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
                added[pname] = (name, o)

        @functools.wraps(fn)
        def command(**kwargs):
            spelled: dict[str, dict] = {}
            for pname, (name, o) in added.items():
                value = kwargs.pop(pname, None)
                if value is None or value == []:
                    continue
                if o.type is list:
                    value = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
                spelled.setdefault(name, {})[o.name] = value
            return fn(**kwargs, spelled=spelled)

        ordered = sorted(params, key=lambda p: p.kind)  # keyword-only after the others
        command.__signature__ = sig.replace(parameters=ordered)
        command.__annotations__ = {p.name: p.annotation for p in ordered}
        del command.__wrapped__  # typer reads the signature above, not the function's own
        return command

    return decorate


def technique_choice(technique: str | None, settings: list[str] | None, spelled: dict | None = None):
    """The technique a command runs, through the registry: `--technique NAME --set K=V`, or the options
    that spell one technique's settings (`--kv-*`: the KV cache's, `--bases/--search/--combine`: Buckets')."""
    from attnkit.core import registry

    spelled = {name: given for name, given in (spelled or {}).items() if given}
    if technique and spelled:
        raise AttnkitError(f"give --technique with --set, or the options of {', '.join(spelled)}, not both")
    if len(spelled) > 1:
        (a, given_a), (b, given_b) = list(spelled.items())[:2]
        flags = lambda name, given: ", ".join("--" + SPELLINGS[name] + k for k in given)  # noqa: E731
        raise AttnkitError(f"{TITLES[a]} ({flags(a, given_a)}) cannot be combined with {TITLES[b]} "
                           f"({flags(b, given_b)}): one technique at a time")
    if spelled:
        name, given = next(iter(spelled.items()))
        return registry.choice(name, given=given)
    return registry.choice(technique, settings)


def registry_default(technique: str, setting: str):
    """A technique setting's one default (its registry entry's), for commands that spell it their own way."""
    from attnkit.core import registry

    return next(o.default for o in registry.entry(technique).options if o.name == setting)


def span(text: str, what: str, parts: int) -> list[float]:
    """'a:b' or 'a:b:c' as numbers."""
    try:
        values = [float(x) for x in text.split(":")]
    except ValueError:
        values = []
    if len(values) != parts:
        raise AttnkitError(f"{what}: expected {':'.join('abc'[:parts])} numbers, got {text!r}")
    return values
