"""Key-value retrieval (Lost in the Middle, Liu et al. 2023): find one UUID's value among K pairs.

The gold pair is moved to a chosen index so that accuracy can be read as a function of position.
Examples come from the Lost-in-the-Middle JSONL(.gz) (`ordered_kv_records`, `key`, `value`) or from
a seeded generator of fresh UUID pairs, so the task runs without any file.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..core.family import architecture
from ..errors import AttnkitError
from .systems import System

PROMPT = ('Extract the value corresponding to the specified key in the JSON object below.\n\n'
          'JSON data:\n{records}\n\nKey: "{key}"\nCorresponding value:')


@dataclass
class KVExample:
    records: list[tuple[str, str]]  # all pairs, the gold one among them
    key: str
    value: str


def load_examples(path: str | Path) -> list[KVExample]:
    """Examples from a Lost-in-the-Middle kv-retrieval file; a malformed line is an error naming it."""
    from .files import open_text

    path = Path(path)
    out = []
    with open_text(path, "KV data file") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records = [(str(k), str(v)) for k, v in row["ordered_kv_records"]]
                out.append(KVExample(records, str(row["key"]), str(row["value"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise AttnkitError(f"{path}:{n}: not a kv-retrieval record ({e.__class__.__name__}: {e})") from None
            if (out[-1].key, out[-1].value) not in out[-1].records:
                raise AttnkitError(f"{path}:{n}: the gold key/value pair is not among the records")
    if not out:
        raise AttnkitError(f"{path}: no examples")
    return out


def generate_examples(n: int, num_pairs: int, seed: int = 0) -> list[KVExample]:
    """Fresh examples of random UUID pairs (deterministic for a seed)."""
    rng = random.Random(seed)
    uid = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))
    out = []
    for _ in range(n):
        records = [(uid(), uid()) for _ in range(num_pairs)]
        key, value = records[rng.randrange(num_pairs)]
        out.append(KVExample(records, key, value))
    return out


def place_gold(ex: KVExample, num_pairs: int, position: int) -> list[tuple[str, str]]:
    """`num_pairs` records: the gold pair at `position`, the others in their original order."""
    if not 0 <= position < num_pairs:
        raise AttnkitError(f"gold position {position} is outside 0..{num_pairs - 1}")
    others = [r for r in ex.records if r[0] != ex.key]
    if len(others) < num_pairs - 1:
        raise AttnkitError(f"an example has {len(others) + 1} pairs, fewer than --num-pairs {num_pairs}")
    others = others[:num_pairs - 1]
    return others[:position] + [(ex.key, ex.value)] + others[position:]


def format_prompt(records: list[tuple[str, str]], key: str, template: str = PROMPT) -> str:
    """The JSON object written one pair per line, as in the paper's prompt."""
    body = ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in records)
    return template.replace("{records}", "{" + body + "}").replace("{key}", key)


def is_correct(answer: str, value: str) -> bool:
    return value in answer


def answer(model, tokenizer, prompt: str, max_new_tokens: int, technique=None, chat_template: bool = False,
           shared=None, prefill_chunk: int | None = None, question_from: int | None = None,
           reply_prefix: str = "") -> str:
    """Greedy answer to one prompt. A raw prompt's answer is cut at the first newline once it has
    begun; with `chat_template` the prompt is one user turn and the answer runs to the end of the turn.
    `shared`: this prompt already prefilled once for several caches (a record's `prefill_once` of
    `encode_prompts(tokenizer, [prompt], chat_template)`). `prefill_chunk`: prompt tokens per prefill
    forward (None: the technique's own, else the whole prompt). `question_from`: the prompt's tokens
    from this index on (its question) reach the cache only after the tokens before it were prefilled
    and compressed (query-agnostic; `shared` then holds the tokens before it only). `reply_prefix`: the
    start of the reply, written for the model after the chat template's assistant turn begins."""
    from ..core.generate import answer_text, continue_prompt, encode_prompts, generate, prefill_prompt

    stop = () if chat_template else ("\n",)
    ids, mask = encode_prompts(tokenizer, [prompt], chat_template, reply_prefix)
    start = shared.start(model, technique) if shared is not None else None
    if question_from:
        if start is None:
            start = prefill_prompt(model, technique, ids[:, :question_from], prefill_chunk)
        start = continue_prompt(model, technique, start, ids[:, question_from:], prefill_chunk)
    out = generate(model, tokenizer, ids, mask, technique, max_new_tokens, stop_rule="eos", stop_strings=stop,
                   prefilled=start, prefill_chunk=prefill_chunk)
    return answer_text(tokenizer, out.ids[0], stop)


def evaluate_kv_retrieval(model, tokenizer, examples: list[KVExample], num_pairs: int, positions: list[int],
             systems: list[System], out: Path | None = None, quiet: bool = False, template: str = PROMPT,
             chat_template: bool | None = None) -> dict:
    """Accuracy per gold position for each system (its `fields` are its settings in the results file);
    rows go to `out` as they finish. `chat_template` None: the tokenizer's chat template when it has one."""
    from ..core.decode import use_chat_template
    from .runner import run_grid

    by_name = {s.name: s for s in systems}

    chat = use_chat_template(tokenizer, chat_template)
    limit = architecture(model.config).max_positions
    first = format_prompt(place_gold(examples[0], num_pairs, 0), examples[0].key, template)
    need = len(tokenizer(first)["input_ids"]) + 2 * len(tokenizer(examples[0].value)["input_ids"])
    if limit and need > limit:
        raise AttnkitError(f"{num_pairs} pairs need about {need} tokens, more than the model's {limit}; "
                           "lower --num-pairs")
    cells = [{"example": i, "position": p, "system": s, "num_pairs": num_pairs}
             for i in range(len(examples)) for p in positions for s in by_name]

    def work(cell):
        ex = examples[cell["example"]]
        prompt = format_prompt(place_gold(ex, num_pairs, cell["position"]), ex.key, template)
        # a chat model often introduces the value on a line of its own: more room, and it ends its turn
        room = len(tokenizer(ex.value, add_special_tokens=False)["input_ids"]) + (32 if chat else 8)
        text = answer(model, tokenizer, prompt, room, by_name[cell["system"]].technique, chat)
        return {"answer": text, "correct": is_correct(text, ex.value)}

    from ..core.loading import model_identity
    from .runner import digest
    settings = {"kind": "kv-retrieval", **model_identity(model), "template": digest(template),
                "examples": digest([[ex.records, ex.key, ex.value] for ex in examples]),
                "systems": {s.name: s.fields for s in systems},
                "positions": list(positions), "num_pairs": num_pairs, "chat_template": chat} if out is not None else None
    rows = run_grid(cells, ("example", "position", "system", "num_pairs"), work, out,
                    "kv-retrieval", quiet, settings=settings)
    return summarize_kv_retrieval(rows, list(by_name), positions)


def summarize_kv_retrieval(rows: list[dict], systems: list[str], positions: list[int]) -> dict:
    acc = {}
    for s in systems:
        acc[s] = {}
        for p in positions:
            hits = [r["correct"] for r in rows if r["system"] == s and r["position"] == p]
            acc[s][p] = round(100.0 * sum(hits) / len(hits), 1) if hits else None
    means = {s: round(sum(v for v in acc[s].values() if v is not None) / max(1, len(positions)), 1)
             for s in systems}
    return {"accuracy": {s: {str(p): v for p, v in acc[s].items()} for s in systems}, "mean": means,
            "positions": positions, "examples": len({r["example"] for r in rows})}
