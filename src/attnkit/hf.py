"""attnkit inside transformers' own API: `model.generate(...)` and pipelines run a technique unchanged.

    with attnkit.use(model, technique):                 # a KV cache, a memory target, head masks ...
        out = model.generate(**inputs, max_new_tokens=40)
        text = pipeline("text-generation", model=model, tokenizer=tok)("...", max_new_tokens=40)

Inside the block the technique is prepared (its attention function in place, as `attnkit.generate`
prepares it) and the model's `generate` gives every call a fresh cache of the technique, unless the
call brings its own `past_key_values`. A retrieval-head cache with a full prefill waits for the prompt's
end, which transformers never announces: the cache is told the prompt's length (its `input_ids`
width, padding included), so it trims, and token budgets choose, exactly where attnkit's own loop
would (greedy tokens equal, tested alone and in padded batches). Outside the block the model is its own
again. Attention Buckets need several model rows per prompt, which `generate` does not have: use
`attnkit.generate` for them.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

from attnkit.core.decode import cache_kwarg
from attnkit.errors import AttnkitError


@contextmanager
def use(model, technique):
    """Run `technique` (a record with `prepare`, or a registry `Choice`'s record) through the model's own
    `generate` (and so through transformers' pipelines) inside the block; yields the prepared session."""
    if technique is None:
        from attnkit.core.generate import PLAIN
        technique = PLAIN
    with technique.prepare(model) as session:
        if getattr(session, "rows", 1) != 1:
            raise AttnkitError(f"{type(technique).__name__} runs {session.rows} model rows per prompt, which "
                               "transformers' generate cannot: use attnkit.generate")
        takes_length = "ends_prompt" in inspect.signature(session.new_cache).parameters
        own = type(model).generate
        chunk = getattr(session, "prefill_chunk", None)

        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is None and takes_length:
                kwargs.update(cache_kwarg(model, session.new_cache(ends_prompt=ids.shape[1] if ids is not None else True)))
                if chunk:
                    kwargs.setdefault("prefill_chunk_size", chunk)
            return own(model, *args, **kwargs)

        model.generate = generate
        try:
            yield session
        finally:
            model.__dict__.pop("generate", None)
