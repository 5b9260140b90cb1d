"""The technique registry: one way from a user's options to a technique record, for every front end.

An `Entry` says once what a technique needs from its user: its options (name, type, default, help),
`build(model_config, settings)`, which validates them and returns the technique record before any
weights load, and `finish(record, model, tokenizer, settings)` for what needs the loaded model (the
KV cache's recipe measures echo and induction scores there). `attnkit niah`, `attnkit eval ruler` and
`attnkit serve` take `--technique NAME --set KEY=VALUE ...` through it, and their older options
(`--kv-*`, `--bases`, `--search`) are spelled as entries' settings too; `attnkit techniques` lists
them all with their options.

    from attnkit.core import registry
    registry.register(registry.Entry("logit-bias", "add a bias to some tokens' logits",
                      (registry.Option("token", int, 0, "token id"), registry.Option("bias", float, -1e9, "added logit")),
                      build=lambda model_config, s: LogitBias({s["token"]: s["bias"]})))
    technique = registry.build("logit-bias", model_config, registry.parse("logit-bias", ["token=7"]))

The built-in techniques register from their own packages (`BUILTIN`, imported on first use, torch-free),
an installed plugin through the `attnkit.techniques` entry-point group (a function called with this
module), a test or a notebook with `register`. This module imports neither torch nor any technique.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from attnkit.errors import AttnkitError

BUILTIN = ("attnkit.heads.technique", "attnkit.kvcache.technique", "attnkit.buckets.technique")  # their import registers the built-ins
ENTRY_POINTS = "attnkit.techniques"


@dataclass(frozen=True)
class Option:
    """One setting of a technique: `--set name=value` (type: int, float, str, bool, or `list` for a
    comma-separated list of strings)."""

    name: str
    type: type
    default: Any
    help: str

    def parse(self, text: str, technique: str):
        try:
            if self.type is bool:
                low = text.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return low in ("1", "true", "yes", "on")
            if self.type is list:
                return [part.strip() for part in text.split(",") if part.strip()]
            return self.type(text)
        except ValueError:
            raise AttnkitError(f"technique {technique}: {self.name}={text!r} is not a {self.type.__name__}") from None


@dataclass(frozen=True)
class Entry:
    name: str
    summary: str
    options: tuple[Option, ...] = ()
    build: Callable[[Any, dict], Any] = None  # (model config, settings) -> technique record, validated
    finish: Callable[[Any, Any, Any, dict], Any] | None = None  # (record, model, tokenizer, settings) -> record
    label: Callable[[Any, dict], str] | None = None  # the name of its result rows (default: the entry's name)
    row_field: str = "technique"  # the result-row field that carries the label
    systems: Callable[[Any, Any, str], list] | None = None  # (record, model, label) -> the systems an
    # evaluation runs (default: one, named by the label); Buckets: the model's own base beside it
    report: Callable[[Any, dict, dict], dict] | None = None  # (record, settings, summaries by system) ->
    # what `niah --json` adds to its summary
    vllm: Callable[[Any, Any], dict] | str | None = None  # (record, model config) -> the `--hf-overrides` that
    # run it inside vLLM (`serve --engine vllm`); a string: why it cannot run there

    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}


_ENTRIES: dict[str, Entry] = {}
_loaded = False


def register(entry: Entry, replace: bool = False) -> Entry:
    """Add a technique; a second one of the same name is an error unless `replace`."""
    if not entry.name or " " in entry.name:
        raise AttnkitError(f"a technique name is one word, not {entry.name!r}")
    if entry.build is None:
        raise AttnkitError(f"technique {entry.name}: an entry needs build(model_config, settings)")
    if entry.name in _ENTRIES and not replace and _ENTRIES[entry.name] is not entry:
        raise AttnkitError(f"a technique named {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _ENTRIES.pop(name, None)


def _plain(model_config, settings):
    from attnkit.core.generate import PLAIN
    return PLAIN


register(Entry("plain", "the model as it is", build=_plain))


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINTS):
        point.load()(__import__(__name__, fromlist=["register"]))


def names() -> list[str]:
    _load()
    return sorted(_ENTRIES)


def entry(name: str) -> Entry:
    _load()
    if name not in _ENTRIES:
        raise AttnkitError(f"unknown technique {name!r}: choose among {', '.join(sorted(_ENTRIES))}")
    return _ENTRIES[name]


def parse(name: str, pairs: list[str] | None, given: dict | None = None) -> dict:
    """The settings of technique `name`: its defaults, then `given` (already typed), then the
    `KEY=VALUE` strings of `--set`; an unknown key or a value of the wrong type is a one-line error."""
    e = entry(name)
    settings = e.defaults()
    known = {o.name: o for o in e.options}
    for key, value in (given or {}).items():
        if key not in known:
            raise AttnkitError(f"technique {name} has no setting {key!r} (it has: {', '.join(known) or 'none'})")
        settings[key] = value
    for pair in pairs or []:
        key, eq, text = pair.partition("=")
        key = key.strip().replace("_", "-")
        if not eq or key not in known:
            raise AttnkitError(f"--set {pair!r}: technique {name} takes KEY=VALUE with KEY one of "
                               f"{', '.join(known) or '(no settings)'}")
        settings[key] = known[key].parse(text, name)
    return settings


def build(name: str, model_config, settings: dict):
    """The technique record from its settings, validated against the model's config (no weights)."""
    return entry(name).build(model_config, settings)


def finish(name: str, record, model, tokenizer, settings: dict):
    """The record completed with what needs the loaded model (most techniques: unchanged)."""
    e = entry(name)
    return record if e.finish is None else e.finish(record, model, tokenizer, settings)


def label(name: str, record, settings: dict) -> str:
    e = entry(name)
    return e.name if e.label is None else e.label(record, settings)


@dataclass(frozen=True)
class Choice:
    """A technique as a front end received it: its name and settings (typed, defaults filled in)."""

    name: str = "plain"
    settings: dict = field(default_factory=dict)

    def build(self, model_config):
        return build(self.name, model_config, self.settings)

    def finish(self, record, model, tokenizer):
        return finish(self.name, record, model, tokenizer, self.settings)

    def label(self, record) -> str:
        return label(self.name, record, self.settings)

    def report(self, record, summaries: dict) -> dict:
        e = entry(self.name)
        return {} if e.report is None else e.report(record, self.settings, summaries)

    def load(self, model: str, device: str = "auto", dtype: str = "auto", device_map=None, before_weights=None):
        """The one way a front end runs a technique: `build` the record from the model's config (every
        setting checked before any weights load), call `before_weights()` (the command's own inputs,
        read while a mistake is still cheap), load the model, `finish` the record. Returns (model,
        tokenizer, record)."""
        from attnkit.core.loading import load_config, load_model

        record = self.build(load_config(model))
        if before_weights is not None:
            before_weights()
        mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
        return mdl, tok, self.finish(record, mdl, tok)


def choice(name: str | None, pairs: list[str] | None = None, given: dict | None = None) -> Choice:
    """`--technique NAME --set K=V ...` (with settings the older options spell in `given`) as a Choice."""
    name = name or "plain"
    if pairs and name == "plain":
        raise AttnkitError("--set needs --technique NAME (the plain model has no settings)")
    return Choice(name, parse(name, pairs, given))
