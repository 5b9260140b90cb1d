"""attnkit as an lm-evaluation-harness model: any attnkit model with any registered technique.

    attnkit-lm-eval --model attnkit --model_args model=smollm2-135m-instruct,technique=kv-cache,memory=0.25 \\
        --tasks niah_single_1 --batch_size 1 --device cpu
    python -c "import attnkit.lmeval, lm_eval; lm_eval.simple_evaluate(model='attnkit', model_args=...)"

`--model_args`: `model` (what `attnkit.load_model` takes: a pulled name, a .gguf, a folder, a Hub id in
the local cache), `technique` (a registry name; default the model as it is) and that technique's
settings by their registry names (`full`, `memory`, `head-tokens` ...; `_` may stand for `-`), plus
`device` and `dtype`. The model is lm-eval's own `HFLM` over the loaded transformers model; every
generation and forward it runs happens inside `attnkit.use(model, technique)`, so `generate_until`
decodes with the technique's cache and loglikelihood forwards run under its attention function.

Registration: lm-eval finds models in its own registry and does not scan installed packages for them.
Importing this module registers `attnkit` there; `attnkit-lm-eval` (this module's `main`) is lm-eval's
own command line with that import done first, taking exactly lm-eval's arguments.

lm-eval's RULER tasks build their prompts with the model's tokenizer, fetch Paul Graham's essays from
the Hugging Face Hub and nltk's `punkt_tab` from the network. `offline_ruler(essays=DIR)` lets them
build with neither (`ATTNKIT_RULER_ESSAYS=DIR` does it for `attnkit-lm-eval`); see its docstring for
what differs from a networked run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from attnkit.errors import AttnkitError
from attnkit.hf import use

LOADING = ("model", "technique", "device", "dtype")


@register_model("attnkit")
class AttnkitLM(HFLM):
    """lm-eval's HFLM over an attnkit model, every call inside `attnkit.use(model, technique)`."""

    def __init__(self, model: str = "embedded", technique: str | None = None, device: str = "cpu",
                 dtype: str = "auto", batch_size: int | str = 1, max_length: int | None = None, **settings):
        from attnkit.core import registry

        hf_args = {k: settings.pop(k) for k in list(settings) if k in ("max_batch_size", "add_bos_token",
                                                                      "truncation", "logits_cache")}
        pairs = [f"{k.replace('_', '-')}={_text(v)}" for k, v in settings.items()]
        choice = registry.choice(technique, pairs)
        mdl, tok, self.technique = choice.load(model, device=device, dtype=dtype)
        self.technique_name = choice.label(self.technique) if choice.name != "plain" else "plain"
        super().__init__(pretrained=mdl, tokenizer=tok, batch_size=batch_size, max_length=max_length,
                         device=str(next(mdl.parameters()).device), **hf_args)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with use(self.model, self.technique):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with use(self.model, self.technique):
            return super()._model_call(inps, attn_mask, labels)


def _text(value) -> str:
    """A model_args value as `--set` spells it (lm-eval has already turned `none`, `true`, `1` into Python)."""
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


PUNKT_WORDS = 50_000  # essay words a stand-in Punkt model is trained on when nltk's punkt_tab is absent


def essay_words(folder: str | Path) -> list[str]:
    """The words of every `.txt` file in `folder` (name order), split as lm-eval's RULER splits its essays."""
    import re

    files = sorted(Path(folder).expanduser().glob("*.txt"))
    if not files:
        raise AttnkitError(f"no .txt essays in {folder}")
    return re.sub(r"\s+", " ", " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files)).split(" ")


def offline_ruler(essays: str | Path | None = None, samples: int | None = None) -> None:
    """Let lm-eval's RULER tasks (`niah_*`) build with no network, for attnkit's models. Call it before the
    tasks load (before `simple_evaluate`). What it changes in lm-eval's `tasks.ruler` modules:

    - the tokenizer: a model name attnkit knows (a pulled name, `embedded`, a .gguf) is taken to its
      local folder, since RULER loads the tokenizer named in the model args with `AutoTokenizer`;
    - the essay haystack (`niah_single_2/3`, `niah_multikey_1`, `niah_multivalue`, `niah_multiquery`): the
      `.txt` files of `essays` instead of the Hub dataset `baber/paul_graham_essays` (the same essays if
      the folder holds them, in file-name order, which may not be the dataset's); without `essays` those
      tasks stop with a one-line error;
    - sentence splitting: nltk's `punkt_tab` when installed, else a Punkt model trained on the essays'
      first `PUNKT_WORDS` words (where needles may be inserted moves a little);
    - `samples`: prompts per length (lm-eval builds 500 and `--limit` only cuts them afterwards; the first
      `samples` are the same either way, as they are drawn one after another).
    """
    import functools

    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        has_punkt = True
    except LookupError:
        has_punkt = False
    download, nltk.download = nltk.download, lambda *a, **k: False  # the module asks for punkt_tab on import
    try:
        import lm_eval.tasks.ruler.common_utils as common
        import lm_eval.tasks.ruler.prepare_niah as prepare
    finally:
        nltk.download = download
    words = essay_words(essays) if essays is not None else None
    state = getattr(prepare, "_attnkit_offline", None)
    if state is None:  # first call: wrappers that read the current state (task modules may hold them)
        state = prepare._attnkit_offline = {}
        get_haystack, generate_samples, resolve_name = (prepare.get_haystack, prepare.generate_samples,
                                                        common.resolve_tokenizer_name)
        sent_tokenize = prepare.cached_sent_tokenize

        def haystack(type_haystack: str):
            if type_haystack != "essay":
                return get_haystack(type_haystack)
            if state["words"] is None:
                raise AttnkitError("lm-eval's RULER essay haystack comes from the Hugging Face Hub: give "
                                   "offline_ruler(essays=FOLDER) (or ATTNKIT_RULER_ESSAYS) a folder of .txt essays")
            return state["words"]

        @functools.wraps(generate_samples)
        def samples_of(*args, **kwargs):
            if state["samples"] is not None:
                kwargs["num_samples"] = state["samples"]
            return generate_samples(*args, **kwargs)

        def tokenizer_name(kwargs: dict):
            from attnkit.core.loading import resolve_spec

            name = resolve_name(kwargs)
            try:
                return str(resolve_spec(name)) if name else name
            except AttnkitError:
                return name

        def sentences(text: str) -> list[str]:
            if state["has_punkt"]:
                return sent_tokenize(text)
            if state.get("split") is None:  # trained once, when an essay task first splits sentences
                from nltk.tokenize.punkt import PunktSentenceTokenizer

                sample = " ".join((state["words"] or [])[:PUNKT_WORDS])
                state["split"] = functools.lru_cache(maxsize=1024)(PunktSentenceTokenizer(sample or None).tokenize)
            return state["split"](text)

        prepare.get_haystack, prepare.generate_samples = haystack, samples_of
        prepare.cached_sent_tokenize, common.resolve_tokenizer_name = sentences, tokenizer_name
    state.update(words=words, samples=samples, has_punkt=has_punkt, split=None)


def main() -> None:
    """lm-eval's command line, with `attnkit` registered as a model (`--model attnkit`); with
    `ATTNKIT_RULER_ESSAYS=DIR`, lm-eval's RULER tasks build offline from that folder's essays."""
    from lm_eval.__main__ import cli_evaluate

    try:
        if os.environ.get("ATTNKIT_RULER_ESSAYS"):
            offline_ruler(os.environ["ATTNKIT_RULER_ESSAYS"])
        cli_evaluate()
    except AttnkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
