"""RULER's synthetic long-context tasks (Hsieh et al. 2024, arXiv 2404.06654), generated offline.

Each task draws its keys, values and haystack the way the RULER paper defines them, seeded per
(task, length, index), and fills the prompt up to a token budget with the model's own tokenizer:

* NIAH single 1-3: one needle "key -> value". 1: a number in repeated noise sentences; 2: a number in
  essays; 3: a UUID in essays.
* NIAH multi-key 1-3: the needle among distractor needles of other keys. 1: 3 distractors in essays;
  2: the haystack is made of distractor needles (word keys, number values); 3: the same with UUID keys
  and values.
* NIAH multi-value: one key with 4 values, all to be returned. Multi-query: 4 keys asked at once.
* Variable tracking: a chain of 4 hops ("VAR QPXZB = 52840", "VAR KDMTR = VAR QPXZB", ...) in noise;
  every variable holding the value is the answer.
* Common-words extraction: a numbered list where 10 words occur often and many others rarely; the 10
  common ones are the answer. Frequent-words extraction: coded words drawn from a Zipf distribution;
  the 3 most frequent are the answer.

Scoring is RULER's: the share of the reference strings found in the output (case-insensitive),
0-100. Keys are adjective-noun pairs of attnkit's own word lists, values 7-digit numbers or UUIDs as
in the paper; the noise sentences and the prompt wording are attnkit's. With an essay haystack from a
folder (`--haystack`, e.g. the Paul Graham essays) the essays are RULER's; without one, attnkit's
filler prose stands in for them.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

from ..errors import AttnkitError

NOISE = "The river runs to the sea. The hills are green. The road goes on and on. Here we are. Back again."

NIAH_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
              "niah_multikey_3", "niah_multivalue", "niah_multiquery")
TASKS = NIAH_TASKS + ("vt", "cwe", "fwe")
ANSWER_TOKENS = {"vt": 30, "cwe": 120, "fwe": 50}  # RULER's generation budgets; NIAH tasks: 128


@dataclass
class RulerExample:
    task: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str = ""  # how the answer starts: a raw prompt ends with it, a chat reply begins with it
    meta: dict = field(default_factory=dict)

    def prompt(self, chat: bool) -> str:
        text = f"{self.context}\n\n{self.question}"
        return text if chat else f"{text} {self.answer_prefix}".rstrip()

    def reply_prefix(self, chat: bool, answer_prefix: bool = True) -> str:
        """What the assistant's reply starts with under the chat template: RULER's answer prefix (as
        RULER and kvpress's pipeline give it), or nothing (`answer_prefix=False`: the question alone)."""
        return self.answer_prefix if chat and answer_prefix else ""

    def encode(self, tokenizer, chat: bool, answer_prefix: bool = True):
        """(input_ids, attention_mask) of the prompt as every system of a run receives it."""
        from ..core.generate import encode_prompts
        return encode_prompts(tokenizer, [self.prompt(chat)], chat, self.reply_prefix(chat, answer_prefix))


def score(output: str, answers: list[str]) -> float:
    """RULER's string match: the share of reference strings present in the output, 0-100."""
    text = output.lower()
    return 100.0 * sum(a.lower() in text for a in answers) / len(answers)


# ---------------------------------------------------------------- drawing keys, values, words

def _word_key(rng: random.Random, taken: set) -> str:
    from .prose import ADJECTIVES, NOUNS
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str, kind: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


# ---------------------------------------------------------------- fitting a prompt into a length

def _fit(tokenizer, length: int, build, most: int) -> tuple[object, int]:
    """The largest size in 1..most whose `build(size)` prompt fits `length` tokens (binary search);
    `build` returns (example, prompt text)."""
    count = lambda n: len(tokenizer(build(n)[1], add_special_tokens=False)["input_ids"])  # noqa: E731
    if count(1) > length:
        raise AttnkitError(f"a RULER prompt needs more than {length} tokens even at its smallest; raise --lengths")
    hi = 2
    while hi < most and count(hi) <= length:  # double until it overflows, then halve the gap
        hi *= 2
    lo, hi = max(1, hi // 2), min(hi, most)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= length else (lo, mid - 1)
    return build(lo)[0], lo


def _insert(units: list[str], needles: list[str], rng: random.Random) -> list[str]:
    """Needles at seeded places between haystack units (sentences, essay pieces, distractors)."""
    out = list(units)
    for needle in needles:
        out.insert(rng.randint(0, len(out)), needle)
    return out


def _essay_units(essays: str) -> list[str]:
    return [s.strip() + "." for s in essays.replace("\n", " ").split(".") if s.strip()]


# ---------------------------------------------------------------- the tasks

def make_example(task: str, tokenizer, length: int, index: int, essays: str | None = None,
                 seed: int = 0) -> RulerExample:
    """One seeded example of `task` filling about `length` tokens (prompt only; the answer is extra)."""
    if task not in TASKS:
        raise AttnkitError(f"unknown RULER task {task!r}: choose among {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    if task in NIAH_TASKS:
        return _niah(task, tokenizer, length, rng, essays)
    return {"vt": _variable_tracking, "cwe": _common_words, "fwe": _frequent_words}[task](tokenizer, length, rng)


def _niah(task: str, tokenizer, length: int, rng: random.Random, essays: str | None) -> RulerExample:
    from .prose import filler_text
    taken: set = set()
    uuid_keys = task == "niah_multikey_3"
    kind = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
    value = _uuid if kind == "uuids" else _number
    key = lambda: _uuid(rng) if uuid_keys else _word_key(rng, taken)  # noqa: E731
    queries = [key() for _ in range(4 if task == "niah_multiquery" else 1)]
    per_key = 4 if task == "niah_multivalue" else 1
    gold = {q: [value(rng) for _ in range(per_key)] for q in queries}
    needles = [_needle(q, v, kind) for q, vs in gold.items() for v in vs]
    distractors = [_needle(key(), value(rng), kind) for _ in range(3)] if task == "niah_multikey_1" else []
    if task in ("niah_multikey_2", "niah_multikey_3"):
        pool = [_needle(key(), value(rng), kind) for _ in range(4000)]  # the haystack is other needles
        units_for = lambda n: pool[:n]  # noqa: E731
        most = len(pool)
    elif task == "niah_single_1":
        units_for = lambda n: [NOISE] * n  # noqa: E731
        most = 20_000
    else:
        units = _essay_units(essays or filler_text(600_000, seed=rng.randrange(1 << 30)))
        units_for = lambda n: units[:n]  # noqa: E731
        most = len(units)
    spots = rng.random()  # where the needles go: the same for every size tried
    ask = " and ".join(queries)
    what = "uuids" if kind == "uuids" else "numbers"
    question = (f"What are all the special magic {what} for {ask} mentioned in the provided text?"
                if len(queries) > 1 or per_key > 1 else
                f"What is the special magic {what[:-1]} for {ask} mentioned in the provided text?")
    intro = (f"Some special magic {what} are hidden within the following text. Make sure to memorize them. "
             f"I will quiz you about the {what} afterwards.\n")

    def build(n):
        body = _insert(units_for(n), needles + distractors, random.Random(spots))
        ex = RulerExample(task, intro + " ".join(body), question, [v for vs in gold.values() for v in vs],
                          f"The special magic {what} for {ask} mentioned in the provided text are"
                          if len(queries) > 1 or per_key > 1 else
                          f"The special magic {what[:-1]} for {ask} mentioned in the provided text is",
                          {"keys": queries, "haystack_units": n})
        return ex, ex.prompt(False)

    return _fit(tokenizer, length, build, most)[0]


def _variable_tracking(tokenizer, length: int, rng: random.Random) -> RulerExample:
    names = set()
    while len(names) < 5:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    names = sorted(names, key=lambda _: rng.random())
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    question = f"Find all variables that are assigned the value {value} in the text above."
    seed = rng.random()

    def build(n):
        body = [NOISE] * n
        r = random.Random(seed)
        spots = sorted(r.randint(0, n) for _ in chain)  # the chain keeps its order
        for shift, (spot, line) in enumerate(zip(spots, chain)):
            body.insert(spot + shift, line)
        ex = RulerExample("vt", "Memorize and track the chain(s) of variable assignment hidden in the following "
                          "text.\n\n" + " ".join(body), question, list(names),
                          f"Answer: According to the chain(s) of variable assignment in the text above, "
                          f"{len(names)} variables are assigned the value {value}, they are:", {"hops": 4})
        return ex, ex.prompt(False)

    return _fit(tokenizer, length, build, 20_000)[0]


def _common_words(tokenizer, length: int, rng: random.Random) -> RulerExample:
    from .prose import ADJECTIVES, NOUNS
    vocab = sorted(set(NOUNS) | set(ADJECTIVES))
    rng.shuffle(vocab)
    common = vocab[:10]
    coded = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(12_000)})
    rare = vocab[10:] + [w for w in coded if w not in vocab]  # long prompts need more rare words than prose has
    seed = rng.random()
    for often in (30, 10, 5):  # RULER's 30 repeats of each common word; fewer where 30 cannot fit
        try:
            return _fit(tokenizer, length, lambda n: _cwe_build(common, rare, n, often, seed), len(rare))[0]
        except AttnkitError:
            continue
    raise AttnkitError(f"common-words extraction does not fit in {length} tokens; raise --lengths")


def _cwe_build(common: list[str], rare: list[str], n: int, often: int, seed: float):
    """The numbered list: each common word `often` times, `n` rare words 3 times each, shuffled."""
    r = random.Random(seed)
    words = common * often + [w for w in rare[:n] for _ in range(3)]
    r.shuffle(words)
    listing = " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))
    ex = RulerExample("cwe", f"Below is a numbered list of words. In these words, some appear more often than "
                      f"others. Memorize the ones that appear most often.\n{listing}",
                      "Question: What are the 10 most common words in the above list?", common,
                      "Answer: The top 10 words that appear most often in the list are:",
                      {"rare": n, "common_repeats": often})
    return ex, ex.prompt(False)


def _frequent_words(tokenizer, length: int, rng: random.Random) -> RulerExample:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choice(letters) for _ in range(6)) for _ in range(2000)})
    rng.shuffle(vocab)
    seed = rng.random()

    def draw(n):
        r = random.Random(seed)
        weights = [1 / (k + 1) ** 2.0 for k in range(len(vocab))]  # Zipf, alpha 2
        return r.choices(vocab, weights, k=n)

    def build(n):
        from collections import Counter
        words = draw(n)
        counts = Counter(words)
        top = sorted(counts, key=lambda w: (-counts[w], vocab.index(w)))[:3]  # the drawn top 3, not the expected
        ex = RulerExample("fwe", "Read the following coded text and track the frequency of each coded word. Find "
                          "the three most frequently appeared coded words.\n" + " ".join(words),
                          "Question: Do not provide any explanation. What are the three most frequently appeared "
                          "words in the above coded text?", top,
                          "Answer: According to the coded text above, the three most frequently appeared words "
                          "are:", {"words": n})
        return ex, ex.prompt(False)

    return _fit(tokenizer, length, build, 200_000)[0]


# ---------------------------------------------------------------- running and scoring

def question_start(tokenizer, example: RulerExample, chat: bool, answer_prefix: bool = True) -> int:
    """Index of the first token of `example`'s prompt (as `RulerExample.encode` gives it) that holds any
    of its question: the tokens before it are the context a query-agnostic cache compresses alone."""
    from ..core.decode import render_chat

    text, add_special = example.prompt(chat), True
    if chat:
        text, add_special = render_chat(tokenizer, [{"role": "user", "content": text}])
        text += example.reply_prefix(chat, answer_prefix)
    try:
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    except NotImplementedError:
        raise AttnkitError("the question after compression needs a fast tokenizer (character offsets)") from None
    if enc["input_ids"] != example.encode(tokenizer, chat, answer_prefix)[0][0].tolist():
        raise AttnkitError("this tokenizer encodes the prompt differently with offsets: cannot split its question")
    at = text.rfind(example.question)
    split = next((i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > at), None)
    if at < 0 or not split:
        raise AttnkitError(f"cannot find where the question of this {example.task} prompt starts")
    return split


def evaluate_ruler(model, tokenizer, tasks: list[str], lengths: list[int], samples: int | dict, systems: list,
                   out=None, quiet: bool = False, chat_template: bool | None = None, essays: str | None = None,
                   seed: int = 0, share_prefill: bool | None = None, prefill_chunk: int | None = None,
                   question_after: bool = False, max_new_tokens: int | None = None,
                   answer_prefix: bool = True) -> list[dict]:
    """Rows {task, length, index, system, answer, score} for every (task, length, sample, system),
    through the one generation loop; rows go to `out` as they finish and a rerun resumes. `samples`:
    prompts per task and length, or {task: prompts}.
    `share_prefill` (None: when there are several systems and each can): one prefill per prompt
    for every system whose record `shares_prefill` (the full cache and full-prefill KV caches), the same answers
    at a fraction of the time on long prompts. `prefill_chunk`: prompt tokens per prefill forward for
    every system (None: the whole prompt at once, or a KV cache's own chunk); on a hybrid model such
    as Gemma 3 chunks spare the sliding layers a prompt-by-prompt mask (several times faster at 16K).
    `question_after`: each prompt's context is prefilled and the cache compressed before its question
    arrives (query-agnostic, as kvpress measures by default); else the question is inside the
    compressed prompt (query-aware). `max_new_tokens`: at most this many answer tokens for every task
    (None: RULER's own length per task); a run with a cap never resumes one without. `answer_prefix`:
    under the chat template the reply starts with RULER's answer prefix ("... they are:"), as RULER
    and kvpress ask chat models; False asks the question alone (how the model answers unprompted)."""
    from ..core.decode import use_chat_template
    from ..core.family import architecture
    from ..core.loading import model_identity
    from .kv_retrieval import answer
    from .runner import digest, run_grid

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise AttnkitError(f"unknown RULER task {bad[0]!r}: choose among {', '.join(TASKS)}")
    limit = architecture(model.config).max_positions
    too_long = [L for L in lengths if limit and L + 128 > limit]
    if too_long:
        raise AttnkitError(f"length {too_long[0]} with its answer passes the model's {limit} positions")
    chat = use_chat_template(tokenizer, chat_template)
    by_name = {s.name: s for s in systems}
    per_task = samples if isinstance(samples, dict) else dict.fromkeys(tasks, samples)
    # sample-major: a run stopped early has about as many prompts of every task; a prompt's systems in a row
    cells = [{"task": t, "length": L, "index": i, "system": s} for i in range(max(per_task.values(), default=0))
             for t in tasks for L in lengths if i < per_task.get(t, 0) for s in by_name]
    shareable = all(s.technique is None or getattr(s.technique, "shares_prefill", False) for s in systems)
    runs_prefill = next((s.technique for s in systems if hasattr(s.technique, "prefill_once")), None)
    if share_prefill and not shareable:
        raise AttnkitError("a shared prefill serves the full cache and KV caches with prefill 'full' only")
    share = shareable and len(systems) > 1 if share_prefill is None else share_prefill
    if runs_prefill is None:  # only the model as it is: nothing to share
        share = False
    select = max([getattr(s.technique, "observed_queries", 0) for s in systems] + [1])
    examples: dict = {}
    prefilled: dict = {}  # the current prompt's shared prefill (one at a time)

    def work(cell):
        key = (cell["task"], cell["length"], cell["index"])
        if key not in examples:
            ex = make_example(key[0], tokenizer, key[1], key[2], essays, seed)
            examples[key] = ex, question_start(tokenizer, ex, chat, answer_prefix) if question_after else None
        ex, split = examples[key]
        shared = None
        if share:
            if key not in prefilled:
                prefilled.clear()
                ids, mask = ex.encode(tokenizer, chat, answer_prefix)
                if split:
                    ids, mask = ids[:, :split], mask[:, :split]
                prefilled[key] = runs_prefill.prefill_once(model, ids, mask, chunk=prefill_chunk, select_window=select)
            shared = prefilled[key]
        budget = ANSWER_TOKENS.get(ex.task, 128)
        text = answer(model, tokenizer, ex.prompt(chat), min(budget, max_new_tokens or budget),
                      by_name[cell["system"]].technique, chat, shared, prefill_chunk, split,
                      ex.reply_prefix(chat, answer_prefix))
        return {"answer": text, "answers": ex.answers, "score": score(text, ex.answers)}

    settings = None if out is None else {
        "kind": "ruler", **model_identity(model), "seed": seed, "chat_template": chat,
        "essays": digest(essays) if essays else "built-in prose", "systems": {s.name: s.fields for s in systems},
        **({"prefill_chunk": prefill_chunk} if prefill_chunk else {}),
        **({"question": "after compression"} if question_after else {}),
        **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}),
        **({"reply_prefix": "RULER's answer prefix"} if chat and answer_prefix else {})}
    return run_grid(cells, ("task", "length", "index", "system"), work, out, "ruler", quiet, settings=settings)


def summarize_ruler(rows: list[dict]) -> dict:
    """Per system: per task and length the mean score with its bootstrap 95% interval and n, and the
    NIAH average (RULER's headline for the retrieval tasks) per length."""
    from . import stats

    out: dict = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        cells = {}
        for task in dict.fromkeys(r["task"] for r in mine):
            for L in sorted({r["length"] for r in mine}):
                values = [r["score"] for r in mine if r["task"] == task and r["length"] == L]
                if values:
                    cells.setdefault(task, {})[str(L)] = stats.bootstrap_mean(values).as_dict()
        niah = {}
        for L in sorted({r["length"] for r in mine}):
            values = [r["score"] for r in mine if r["length"] == L and r["task"] in NIAH_TASKS]
            if values:
                niah[str(L)] = stats.bootstrap_mean(values).as_dict()
        out[system] = {"tasks": cells, "niah_average": niah}
    return out
