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
"""

from __future__ import annotations

import sys

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


def main() -> None:
    """lm-eval's command line, with `attnkit` registered as a model (`--model attnkit`)."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except AttnkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
