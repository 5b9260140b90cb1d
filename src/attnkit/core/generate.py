"""One generation loop for every technique.

A *technique* is a small config record with `prepare(model)`, a context manager that makes the model
behave the technique's way inside the block and yields a `Session`: what cache a generation needs,
how many model rows one prompt takes, and how the next-token scores come out of those rows.

    technique record                     what prepare() does
    PLAIN (this module)                  nothing: the model as it is
    core.hook.Intervention(mask, probe)  head masks and decode probes (the attention hook)
    kvcache.config.HeadKVConfig           the retrieval-head KV cache (kvcache.cache)
    buckets.BucketsConfig                several RoPE bases, one row each, combined by confidence

`decode_steps` is the loop (chunked prefill over left-padded prompts, then one token per prompt per
step, greedy or sampled, without end); `generate` runs it with the stop rules and a token budget
per prompt and a cancel check before every step. NIAH, key-value retrieval, head detection and
ablation, the server, the S2A backend and the demo all generate through these two functions.

    with BucketsConfig([10_000, 20_000]).prepare(model) as session:   # or generate(..., technique=cfg)
        out = generate(model, tok, ids, technique=session, max_new_tokens=20)
    out.ids[0]        # new token ids of prompt 0
    out.info[0][-1]   # what the technique reported at its last step (buckets: the base weights)

A new technique is one record with `prepare` (and `describe`, which the server shows) whose Session
overrides what differs; see docs/concepts/adding-a-technique.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Protocol

import torch

from attnkit.core.decode import cache_kwarg, eos_ids, is_newline, last_logits_only, sample_token
from attnkit.errors import AttnkitError

StopRule = Literal["clean", "authors", "eos"]
STOP_RULES = ("clean", "authors", "eos")


class Session:
    """What a prepared technique contributes to one generation. This base class is the plain model:
    one row per prompt, a `DynamicCache`, the last position's logits as next-token scores."""

    rows = 1  # model batch rows per prompt
    prefill_chunk: int | None = None  # prompt tokens per prefill forward (None: the whole prompt at once)

    def __init__(self, model):
        self.model = model

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Per-prompt rows [prompts, ...] -> model rows [prompts * rows, ...]."""
        return x if self.rows == 1 else x.repeat_interleave(self.rows, dim=0)

    def scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Last-position logits of the model rows [prompts * rows, vocab] -> (next-token scores
        [prompts, vocab], per-prompt info or None)."""
        return logits, None


class Technique(Protocol):
    def prepare(self, model): ...  # a context manager yielding a Session

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class Plain:
    """The model as it is."""

    shares_prefill = True  # its prefill is the model's own forward pass (see `kvcache.fork`)

    @contextmanager
    def prepare(self, model):
        yield Session(model)

    def describe(self) -> dict:
        return {"technique": "plain"}


PLAIN = Plain()


@dataclass(frozen=True)
class Sampling:
    """Greedy at temperature 0, else nucleus sampling; `seed` makes a sampled run repeatable."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


GREEDY = Sampling()


@dataclass
class Prefilled:
    """A prompt already run into a cache (see `core.kvfork`): `decode_steps` starts from it instead of
    prefilling. `logits` [rows, vocab] are the prompt's last-position logits."""
    cache: object
    logits: torch.Tensor


@dataclass
class Step:
    tokens: torch.Tensor  # [prompts] the token chosen for each prompt
    info: object = None  # what the technique reports (buckets: base weights [prompts, bases])


@torch.no_grad()
def decode_steps(model, session: Session, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 sampling: Sampling = GREEDY, prefill_chunk: int | None = None,
                 prefilled: Prefilled | None = None) -> Iterator[Step]:
    """Yield one `Step` per generated position, without end; the chosen tokens are fed back.

    input_ids [prompts, n], left-padded when `attention_mask` [prompts, n] marks padding. Without a
    mask the model builds its own positions and causal mask (exactly what it does without attnkit);
    with one, positions count real tokens only, so each row sees what it would see alone. With
    `prefilled` (the same prompts already in a cache) the prefill is skipped."""
    device = next(model.parameters()).device
    ids = session.expand(input_ids.to(device))
    mask = session.expand(attention_mask.to(device)) if attention_mask is not None else None
    positions = (mask.cumsum(-1) - 1).clamp_min(0) if mask is not None else None
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    if prefilled is not None:
        if prefilled.logits.shape[0] != ids.shape[0]:
            raise AttnkitError(f"the prefilled cache holds {prefilled.logits.shape[0]} rows, this technique "
                               f"runs {ids.shape[0]}: a shared prefill serves one row per prompt")
        cache, logits = prefilled.cache, prefilled.logits
    else:
        cache = session.new_cache()
        logits = prefill(model, ids, mask, cache, prefill_chunk or session.prefill_chunk).logits[:, -1]
    while True:
        scores, info = session.scores(logits)
        chosen = sample_token(scores, sampling.temperature, sampling.top_p, gen)  # [prompts]
        yield Step(chosen, info)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
        logits = step_logits(model, session, cache, chosen.to(device), mask,
                             None if positions is None else positions[:, 0])


@torch.no_grad()
def step_logits(model, session: Session, cache, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding forward: each prompt's token [prompts] in, the model rows' next-token logits
    [prompts * rows, vocab] out. With padded rows, `mask` [model rows, positions] is the batch's 2D
    mask (this step's column included) and `positions` [model rows] each row's position; without,
    the model counts positions from the cache. `decode_steps` and the server's continuously
    batched engine both step through here."""
    extra = {}
    if mask is not None:
        extra["attention_mask"] = mask
    if positions is not None:
        extra["position_ids"] = positions.view(-1, 1)
    out = model(input_ids=session.expand(tokens).view(-1, 1), use_cache=True, **cache_kwarg(model, cache), **extra)
    return out.logits[:, -1]


@torch.no_grad()
def prefill(model, ids: torch.Tensor, mask: torch.Tensor | None, cache, chunk: int | None = None, **forward):
    """Run the prompt rows [rows, n] into `cache`, `chunk` tokens per forward (None: all at once);
    returns the last forward's output (its logits: the last position only where the model allows)."""
    chunk = chunk or ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp_min(0) if mask is not None else None
    expect = getattr(cache, "expect_prompt", None)  # a cache that compresses each layer as the prompt's end reaches it
    if expect is not None:
        expect(ids.shape[1])
    out = None
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        extra = {} if mask is None else {"attention_mask": mask[:, :end], "position_ids": positions[:, start:end]}
        out = model(input_ids=ids[:, start:end], use_cache=True, **cache_kwarg(model, cache), **extra,
                    **{**last_logits_only(model), **forward})
    end_prefill = getattr(cache, "end_prefill", None)  # a cache that compresses once the prompt is in
    if end_prefill is not None:
        end_prefill()
    return out


def prefill_prompt(model, technique, ids: torch.Tensor, chunk: int | None = None) -> Prefilled:
    """One prompt's rows [prompts, n] (no padding) run into a fresh cache of `technique` (a record,
    a prepared `Session` or None), the cache's end of prompt included (a compressing cache compresses
    here); `generate(..., prefilled=)` or `continue_prompt` takes it from there."""
    return continue_prompt(model, technique, None, ids, chunk)


@torch.no_grad()
def continue_prompt(model, technique, prefilled: Prefilled | None, ids: torch.Tensor, chunk: int | None = None
                    ) -> Prefilled:
    """More prompt [prompts, m] after a cache has ended its prompt: the question of a context the
    cache already compressed (query-agnostic compression, kvpress's setting). The new tokens read
    whatever the cache kept and join it as its own prompt tokens would; returns the cache with the
    new last logits (`prefilled` None: a fresh cache of `technique`). Unpadded prompts only
    (positions continue from the cache's length)."""
    with _session(model, technique) as session:
        cache = session.new_cache() if prefilled is None else prefilled.cache
        out = prefill(model, session.expand(ids.to(next(model.parameters()).device)), None, cache,
                      chunk or session.prefill_chunk)
    return Prefilled(cache, out.logits[:, -1])


@dataclass
class Generated:
    ids: list[list[int]]  # new token ids per prompt, the stopping token included
    info: list[list] = field(default_factory=list)  # per prompt, the technique's info at each of its steps
    finish: list[str] = field(default_factory=list)  # per prompt: "stop", "length" or "cancelled"


class Stopper:
    """Decides, token by token, when one prompt's answer ends.

    * "clean": at EOS or an end-of-turn token, or at a token holding a newline once the answer has
      begun (leading whitespace and newlines, which instruct models often emit first, never end it);
    * "authors" (the retrieval-head authors' loop): only at a token made of newlines alone, never at EOS;
    * "eos": at EOS or an end-of-turn token only.
    With `stop_strings`, also once the answer (leading whitespace left out) holds one of them."""

    def __init__(self, tokenizer, eos: set[int], rule: StopRule = "clean", stop_strings: tuple[str, ...] = ()):
        if rule not in STOP_RULES:
            raise ValueError(f"unknown stop rule {rule!r}: use one of {', '.join(STOP_RULES)}")
        self.tok, self.eos, self.rule, self.strings = tokenizer, eos, rule, tuple(stop_strings)

    def new_row(self) -> dict:
        return {"begun": False}

    def stops(self, row: dict, ids: list[int]) -> bool:
        """Whether the answer `ids` (its last token just generated) ends here."""
        token = ids[-1]
        if self.rule == "authors":
            hit = is_newline(self.tok.decode([token]))
        elif self.rule == "clean":
            text = self.tok.decode([token])
            hit = token in self.eos or (row["begun"] and "\n" in text)
            row["begun"] = row["begun"] or bool(text.strip())
        else:
            hit = token in self.eos
        return hit or bool(self.strings and holds_stop_string(self.tok, ids, self.strings))


def first_stop(text: str, stops, start: int = 0) -> int:
    """Where the first of the stop strings begins in an answer's `text`, searching from `start` (a
    stream searches only what may hold a new one) and never inside the whitespace the answer starts
    with (instruct models often open with a newline, which must not end a "\n"-stopped answer);
    -1 when none does. The one stop-string rule of the loop, `answer_text` and the server."""
    start = max(start, len(text) - len(text.lstrip()))
    return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)


def holds_stop_string(tokenizer, ids: list[int], stops: tuple[str, ...]) -> bool:
    """A stop string in the answer so far (`first_stop`). The last tokens are checked first; the
    whole answer is decoded only when they hold a stop string."""
    if not any(s in tokenizer.decode(ids[-8:], skip_special_tokens=True) for s in stops):
        return False
    return first_stop(tokenizer.decode(ids, skip_special_tokens=True), stops) >= 0


@contextmanager
def _session(model, technique):
    if isinstance(technique, Session):  # already prepared by the caller (who reads its results after)
        yield technique
    else:
        with (technique or PLAIN).prepare(model) as session:
            yield session


def generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             technique=None, max_new_tokens: int | list[int] = 50, stop_rule: StopRule = "clean",
             stop_strings: tuple[str, ...] = (), sampling: Sampling = GREEDY, prefill_chunk: int | None = None,
             cancel: Callable[[], bool] | None = None, prefilled: Prefilled | None = None) -> Generated:
    """Generate for every prompt of a (left-padded) batch until each stops or spends its budget.

    `technique`: a technique record (prepared for this call), a `Session` the caller prepared, or
    None for the plain model. `max_new_tokens` is one budget or one per prompt. `cancel()` is asked
    before every step; True ends the prompts still running with finish "cancelled". Prompts that
    finish early keep feeding their last token until the batch is done (their output is ignored).
    `prefilled`: the prompts already in a cache of this technique (`kvcache.fork.SharedPrefill.start`)."""
    prompts = input_ids.shape[0]
    budgets = [max_new_tokens] * prompts if isinstance(max_new_tokens, int) else list(max_new_tokens)
    stopper = Stopper(tokenizer, eos_ids(model, tokenizer), stop_rule, stop_strings)
    result = Generated([[] for _ in range(prompts)], [[] for _ in range(prompts)], ["length"] * prompts)
    rows = [stopper.new_row() for _ in range(prompts)]
    running = [i for i in range(prompts) if budgets[i] > 0]
    if not running:
        return result
    with _session(model, technique) as session:
        steps = decode_steps(model, session, input_ids, attention_mask, sampling, prefill_chunk, prefilled)
        try:
            while running:
                if cancel is not None and cancel():
                    for i in running:
                        result.finish[i] = "cancelled"
                    break
                step = next(steps)
                for i in list(running):
                    ids = result.ids[i]
                    ids.append(int(step.tokens[i]))
                    result.info[i].append(None if step.info is None else step.info[i])
                    if stopper.stops(rows[i], ids):
                        result.finish[i] = "stop"
                        running.remove(i)
                    elif len(ids) >= budgets[i]:
                        running.remove(i)
        finally:
            steps.close()
    return result


def greedy_decode(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 50, technique=None,
                  stop_rule: StopRule = "clean", stop_strings: tuple[str, ...] = ()) -> list[int]:
    """New token ids for one prompt [1, n]: `generate` greedy, for the common single-prompt case."""
    return generate(model, tokenizer, input_ids, None, technique, max_new_tokens, stop_rule, stop_strings).ids[0]


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool = False,
                   reply_prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of text prompts, each one user turn of the chat
    template if asked; `reply_prefix` (chat only): the start of the assistant's reply, written for it
    (RULER's answer prefix), so the model continues it."""
    from attnkit.core.decode import left_padded, render_chat

    add_special = True
    if chat_template:
        rendered = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        prompts, add_special = [text + reply_prefix for text, _ in rendered], rendered[0][1]
    batch = left_padded(tokenizer, prompts, add_special_tokens=add_special)
    return batch["input_ids"], batch["attention_mask"]


def answer_text(tokenizer, ids: list[int], stop_strings: tuple[str, ...] = ()) -> str:
    """The answer as text: special tokens dropped, cut at the first stop string (leading whitespace is
    not searched), whitespace stripped at both ends."""
    text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
    cut = first_stop(text, stop_strings)
    return (text if cut < 0 else text[:cut]).strip()
