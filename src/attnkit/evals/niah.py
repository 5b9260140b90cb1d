"""Needle-in-a-haystack: attnkit's clean prompt builder (the authors' one is `authors_prompt`), trials,
and grids.

Prompt: the haystack cut to fit the context length (room is left for needle, question and answer),
the needle inserted at the depth on a sentence boundary, then the question template, in the chat
template when the tokenizer has one. Greedy decoding up to 50 tokens, stopping at EOS, end of turn or
a newline once the answer has begun. Score: ROUGE-1 recall (stemmed) against the needle's answer,
0-100.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from attnkit.core.family import architecture
from attnkit.core.decode import require_chat_template, use_chat_template  # noqa: F401 (part of this module's API)
from attnkit.errors import AttnkitError
from attnkit.evals.authors_prompt import AuthorsPromptBuilder
from attnkit.evals.needles import Needle, NiahPrompt, find_span, locate_answer  # noqa: F401 (likewise)
from attnkit.evals.systems import System

QUESTION_TEMPLATE = "\nBased on the content of the book, Question: {question}\nAnswer:"
ANSWER_ROOM = 50


PromptKind = Literal["clean", "authors"]


@dataclass(frozen=True)
class Grid:
    """What a NIAH run varies: every needle at every length and depth, in one haystack."""
    needles: list[Needle]
    haystack: str
    lengths: list[int]
    depths: list[float]


PASSKEY = "passkey"


def passkey_needles(n: int = 6, seed: int = 0) -> list[Needle]:
    """Passkey-style needles: "The password of Dunmore is recipe useful Bruno cabin." The answer is
    random, so it can only come from copying, and the question repeats the needle's words, so finding
    the needle needs no paraphrase matching (the idea of the passkey retrieval task)."""
    from attnkit.evals import prose

    rng = random.Random(seed)
    words = prose.NOUNS + prose.ADJECTIVES + prose.NAMES
    places = rng.sample(prose.PLACES, n)
    needles = []
    for place in places:
        thing = rng.choice(["secret word", "password", "code name", "magic number", "lucky number"])
        if thing.endswith("number"):
            answer = str(rng.randint(1000, 999_999))
        else:
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(3, 7)))
        needles.append(Needle(f"The {thing} of {place} is {answer}.", f"What is the {thing} of {place}?", answer))
    return needles


def load_needles(path: str | Path | None = None) -> list[Needle]:
    """Needles from a JSONL file (needle, question, real_needle); None gives the built-in ones and
    the name "passkey" (when no such file exists) the generated passkey-style ones."""
    if path is not None and str(path) == PASSKEY and not Path(path).exists():
        return passkey_needles()
    if path is None:
        text = resources.files("attnkit.evals").joinpath("data/needles.jsonl").read_text()
        name = "built-in needles"
    else:
        p = Path(path)
        if not p.is_file():
            raise AttnkitError(f"needles file not found: {p}")
        text, name = p.read_text(), str(p)
    needles = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            needles.append(Needle(row["needle"], row["question"], row["real_needle"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AttnkitError(f"{name}, line {n}: not a needle record ({type(e).__name__}: {e})") from None
    if not needles:
        raise AttnkitError(f"{name}: no needles")
    return needles


def load_haystack(path: str | Path | None = None, min_chars: int = 0) -> str:
    """A .txt file, or every .txt file of a folder in name order; None gives the built-in filler prose."""
    if path is None:
        from attnkit.evals.prose import filler_text
        return filler_text(max(min_chars, 200_000))
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        text = "".join(f.read_text(errors="replace") for f in files)
    elif p.is_file():
        text = p.read_text(errors="replace")
    else:
        raise AttnkitError(f"haystack not found: {p}")
    if not text.strip():
        raise AttnkitError(f"haystack {p} is empty")
    return text


class PromptBuilder:
    """Builds NIAH prompts for one tokenizer and haystack, tokenising the haystack once."""

    def __init__(self, tokenizer, haystack: str, chat_template: bool = False, answer_room: int = ANSWER_ROOM):
        require_chat_template(tokenizer, chat_template)
        self.tok = tokenizer
        self.chat = chat_template
        self.answer_room = answer_room
        self.hay_ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
        if not self.hay_ids:
            raise AttnkitError("haystack is empty after tokenisation")

    def _text(self, context: str, needle: Needle) -> list[int]:
        if self.chat:
            msg = [{"role": "user", "content": context + QUESTION_TEMPLATE.format(question=needle.question)}]
            return self.tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False)
        return self.tok(context + QUESTION_TEMPLATE.format(question=needle.question))["input_ids"]

    def build(self, needle: Needle, length: int, depth: float) -> NiahPrompt:
        tok = self.tok
        needle_ids = tok(" " + needle.needle.strip(), add_special_tokens=False)["input_ids"]
        overhead = len(self._text("", needle))
        budget = length - overhead - len(needle_ids) - self.answer_room
        if budget <= 0:
            raise AttnkitError(f"context length {length} leaves no room for a haystack")
        hay = self.hay_ids
        while len(hay) < budget:  # repeat a short haystack as needed
            hay = hay + self.hay_ids
        context = hay[:budget]
        at = len(context) if depth >= 100 else int(len(context) * depth / 100)
        if depth < 100:
            while at > 0 and not tok.decode(context[at - 1:at]).rstrip().endswith("."):
                at -= 1
        before, rest = tok.decode(context[:at]), tok.decode(context[at:])
        needle_text = tok.decode(needle_ids)
        if not before:  # depth 0: the needle opens the context
            needle_text = needle_text.lstrip()
        if rest and not rest[0].isspace():  # keep "...Felix. At first", never "...Felix.At first"
            rest = " " + rest
        text = before + needle_text + rest
        ids = self._text(text, needle)
        return NiahPrompt(torch.tensor([ids]), locate_answer(tok, ids, needle), length, depth)


def recall(answer: str, reference: str) -> float:
    return 100.0 * _scorer().score(reference, answer)["rouge1"].recall


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return _SCORER


def check_depths(depths: list[float]) -> None:
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad or not depths:
        raise AttnkitError(f"needle depths are percentages in [0, 100], got {bad[0] if bad else 'none'}")


def check_lengths(model, lengths: list[int]) -> None:
    limit = architecture(model.config).max_positions
    too_long = [L for L in lengths if limit and L > limit]
    if too_long:
        raise AttnkitError(f"context length {too_long[0]} is above the model's max positions ({limit})")
    if any(L <= 0 for L in lengths):
        raise AttnkitError("context lengths must be positive")


PROMPTS = ("clean", "authors")


@functools.lru_cache(maxsize=4)
def prompt_builder(kind: str, tokenizer, haystack: str, chat_template: bool = False, min_words: int = 0):
    """`clean` (attnkit's builder) or `authors` (the retrieval-head authors' construction, artefacts
    included; see `attnkit.evals.authors_prompt`). Cached: an ablation or a comparison evaluates the
    same haystack once per condition, and a builder tokenises it once."""
    if kind == "clean":
        return PromptBuilder(tokenizer, haystack, chat_template)
    if kind == "authors":
        return AuthorsPromptBuilder(tokenizer, haystack, chat_template, min_words)
    raise AttnkitError(f"unknown prompt {kind!r}: use {' or '.join(PROMPTS)}")


def run_trial(model, tokenizer, prompt: NiahPrompt, needle: Needle, max_new_tokens: int = ANSWER_ROOM,
              technique=None, stop_rule: PromptKind = "clean", shared=None) -> dict:
    """Answer one prompt greedily with `technique` (None: the model as it is; see `core.generate`);
    `shared`: the prompt already prefilled once for several caches (`HeadKVConfig.prefill_once`)."""
    from attnkit.core.generate import generate

    start = shared.start(model, technique) if shared is not None else None
    ids = generate(model, tokenizer, prompt.input_ids, None, technique, max_new_tokens, stop_rule,
                   prefilled=start).ids[0]
    answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return {"answer": answer, "recall": recall(answer, needle.real_needle)}


def summarize_niah(rows: list[dict]) -> dict:
    """Mean recall overall and per (length, depth) cell over needles; skipped trials are counted."""
    scored = [r for r in rows if r.get("recall") is not None]
    grid: dict[tuple, list[float]] = {}
    for r in scored:
        grid.setdefault((r["length"], r["depth"]), []).append(r["recall"])
    cells = {k: sum(v) / len(v) for k, v in grid.items()}
    return {
        "mean_recall": round(sum(r["recall"] for r in scored) / len(scored), 2) if scored else None,
        "trials": len(scored),
        "skipped": len(rows) - len(scored),
        "skip_reason": next((r.get("skipped") for r in rows if r.get("recall") is None), None),
        "grid": [{"length": L, "depth": d, "recall": round(v, 2)} for (L, d), v in sorted(cells.items())],
        # one value per trial in (length, depth, needle) order, None where skipped: systems run on the
        # same grid pair up trial by trial
        "recalls": [None if r.get("recall") is None else round(r["recall"], 2)
                    for r in sorted(rows, key=lambda r: (r["length"], r["depth"], r.get("needle", 0)))],
    }


def grid_map(grid: list[dict]) -> dict[tuple, float]:
    """A summary's grid as {(length, depth): recall}."""
    return {(c["length"], c["depth"]): c["recall"] for c in grid}


def grid_cells(needles: list[Needle], lengths: list[int], depths: list[float], **extra) -> list[dict]:
    return [{**extra, "needle": i, "length": L, "depth": d}
            for L in lengths for d in depths for i in range(len(needles))]


def evaluate_niah(model, tokenizer, needles: list[Needle], haystack: str, lengths: list[int], depths: list[float],
             out: Path | None = None, chat_template: bool | None = None, quiet: bool = False, label: str = "niah",
             extra: dict | None = None, technique=None, prompt: PromptKind = "clean",
             systems: list[System] | None = None) -> list[dict]:
    """Run the NIAH grid; rows carry length, depth, needle, answer, recall (None with `skipped`).
    Trials generate with `technique` (None: the model as it is); `extra` must name it when rows of
    several share a file, since rows are resumed by their extra fields, needle, length and depth.

    `systems` instead of `technique` and `extra`: every system on each prompt in turn, the prompt
    prefilled once for all of them (each system's `fields` name it in the rows, and each must
    `shares_prefill`: the model as it is, or a retrieval-head cache with the full prefill); the answers
    equal one prefill per system (`kvcache.fork`)."""
    from attnkit.evals.runner import run_grid

    check_lengths(model, lengths)
    check_depths(depths)
    chat_template = use_chat_template(tokenizer, chat_template)
    builder = prompt_builder(prompt, tokenizer, haystack, chat_template, max(lengths))
    by_fields, share = {}, None
    if systems is not None:
        share = shared_prefill_of(systems)
        by_fields = {tuple(sorted(s.fields.items())): s.technique for s in systems}
    prefilled: dict = {}  # the current prompt's shared prefill (one at a time)

    def work(cell):
        needle = needles[cell["needle"]]
        try:
            built = builder.build(needle, cell["length"], cell["depth"])
        except AttnkitError as e:
            return {"answer": None, "recall": None, "skipped": str(e)}
        if systems is None:
            return run_trial(model, tokenizer, built, needle, technique=technique, stop_rule=prompt)
        key = (cell["needle"], cell["length"], cell["depth"])
        if key not in prefilled:
            prefilled.clear()
            prefilled[key] = share.prefill_once(model, built.input_ids, None, chunk=share.prefill_chunk,
                                                select_window=share.select)
        mine = by_fields[tuple(sorted((k, cell[k]) for k in systems[0].fields))]
        return run_trial(model, tokenizer, built, needle, technique=mine, stop_rule=prompt, shared=prefilled[key])

    if systems is None:
        cells = grid_cells(needles, lengths, depths, **(extra or {}))
        fields = tuple((extra or {}).keys()) + ("needle", "length", "depth")
    else:  # a prompt's systems one after another
        cells = [{**s.fields, **c} for c in grid_cells(needles, lengths, depths) for s in systems]
        fields = tuple(systems[0].fields) + ("needle", "length", "depth")
    settings = run_settings("niah", model, needles, [haystack], lengths, depths, chat_template=chat_template,
                            max_new_tokens=ANSWER_ROOM, prompt=prompt) if out is not None else None
    return run_grid(cells, fields, work, out, description=label, quiet=quiet, settings=settings)


def run_settings(kind: str, model, needles: list[Needle], haystacks: list[str], lengths, depths, **options) -> dict:
    """What a NIAH-style results file records about the run that wrote it."""
    from dataclasses import asdict

    from attnkit.core.loading import model_identity
    from attnkit.evals.runner import digest

    return {"kind": kind, **model_identity(model), "needles": digest([asdict(n) for n in needles]),
            "haystack": digest("".join(digest(h) for h in haystacks)), "lengths": list(lengths),
            "depths": [float(d) for d in depths], **options}


@dataclass(frozen=True)
class _Shared:
    prefill_once: object  # HeadKVConfig.prefill_once
    prefill_chunk: int | None
    select: int  # the most of the prompt's last queries a system's token budgets are chosen by


def shared_prefill_of(systems: list[System]) -> _Shared:
    """How one prefill of a prompt serves every system of `systems`, or a clear error why it cannot."""
    cfgs = [s.technique for s in systems if s.technique is not None]
    if not cfgs or not all(hasattr(c, "prefill_once") and c.shares_prefill for c in cfgs):
        raise AttnkitError("one prefill serves the model as it is and retrieval-head caches with the full prefill only")
    chunks = {c.prefill_chunk for c in cfgs}
    if len(chunks) > 1:
        raise AttnkitError(f"one prefill serves caches of one prefill chunk, not {sorted(chunks)}")
    if len({tuple(sorted(s.fields)) for s in systems}) > 1 or len({tuple(sorted(s.fields.items())) for s in systems}) < len(systems):
        raise AttnkitError("systems sharing a prefill need fields of the same names and distinct values")
    return _Shared(cfgs[0].prefill_once, chunks.pop(), max([c.observed_queries for c in cfgs] + [1]))


def compare_systems(model, tokenizer, grid: Grid, systems: list[System], out: Path | None = None,
                    quiet: bool = False, share_prefill: bool | None = None, **options) -> dict[str, dict]:
    """The same grid under each system (rows of all of them may share `out`); summaries by name.
    `share_prefill` (None: where there are several systems and one prefill can serve them all, see
    `evaluate_niah`'s `systems`): each prompt prefilled once for every system, the same answers."""
    if share_prefill is None:
        try:
            share_prefill = len(systems) > 1 and shared_prefill_of(systems) is not None
        except AttnkitError:
            share_prefill = False
    if share_prefill:
        rows = evaluate_niah(model, tokenizer, grid.needles, grid.haystack, grid.lengths, grid.depths, out=out,
                             quiet=quiet, label="systems", systems=systems, **options)
        return {s.name: summarize_niah([r for r in rows if all(r.get(k) == v for k, v in s.fields.items())])
                for s in systems}
    summaries = {}
    for d in systems:
        rows = evaluate_niah(model, tokenizer, grid.needles, grid.haystack, grid.lengths, grid.depths, out=out, quiet=quiet,
                        label=d.name, extra=d.fields, technique=d.technique, **options)
        summaries[d.name] = summarize_niah(rows)
    return summaries
