"""Multi-document question answering with the gold passage at a chosen position (Liu et al. 2023,
"Lost in the Middle", arXiv 2307.03172), built offline from NaturalQuestions-Open.

Each question comes with its gold passage. An example of N documents puts the gold passage at
position k (0-based) and fills the other N - 1 places with other questions' gold passages that
contain none of this question's answer aliases (normalised). The paper's distractors are the
retriever's (Contriever) top passages without the answer, which are on topic and harder; ours are
off topic, so absolute accuracy runs higher than the paper's and only the curve's shape compares.
Distractors are drawn once per question (seeded by its index) and kept in the same order for every
gold position, so the positions differ only by where the gold passage sits.

The prompt is the paper's (`qa.prompt`: instruction, "Document [i](Title: ...) text" lines, question,
"Answer:"), as one user turn of the chat template when the tokenizer has one. Scoring is the paper's
best-subspan exact match on the answer's first line (as the authors' evaluation does, so a model that
goes on to copy the documents is not credited by them): correct when a normalised answer alias (lower
case, no punctuation, no articles, single spaces) occurs in the normalised line. Generation stops at
that newline.

    examples = load_nq("../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz")
    prompt = build(examples, 0, n_docs=20, gold_at=9).prompt()
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from attnkit.errors import AttnkitError

INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
               "(some of which might be irrelevant).")
ANSWER_TOKENS = 48


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    title: str  # the gold passage
    text: str


@dataclass(frozen=True)
class Example:
    question: Question
    documents: list[tuple[str, str]]  # (title, text) in prompt order
    gold_at: int

    def prompt(self) -> str:
        docs = "\n".join(f"Document [{i + 1}](Title: {title}) {text}" for i, (title, text) in enumerate(self.documents))
        return f"{INSTRUCTION}\n\n{docs}\n\nQuestion: {self.question.question}\nAnswer:"


def normalize(text: str) -> str:
    """The paper's (SQuAD's) answer normalisation: lower case, punctuation and articles removed,
    whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def correct(output: str, answers: list[str]) -> bool:
    """Best-subspan exact match: some normalised alias occurs in the normalised first line of the output."""
    out = normalize(output.strip().split("\n")[0])
    return any(normalize(a) and normalize(a) in out for a in answers)


def load_nq(path: str | Path) -> list[Question]:
    """NaturalQuestions-Open with gold passages (`nq-open-oracle.jsonl.gz`: question, answers, ctxs
    with the gold one marked)."""
    from attnkit.evals.files import open_text

    out = []
    with open_text(path, "NQ-open oracle file") as fh:
        for n, line in enumerate(fh, 1):
            try:
                d = json.loads(line)
                gold = next(c for c in d["ctxs"] if c.get("isgold"))
                out.append(Question(d["question"], list(d["answers"]), gold["title"], gold["text"]))
            except (json.JSONDecodeError, KeyError, StopIteration, TypeError):
                raise AttnkitError(f"{path}, line {n}: not an NQ-open oracle row (question, answers, ctxs "
                                   "with one isgold)") from None
    if not out:
        raise AttnkitError(f"{path} holds no questions")
    return out


def distractors(questions: list[Question], index: int, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n gold passages of other questions, none holding an answer alias of question `index` (seeded
    by the question, so every gold position of it gets the same ones, in the same order)."""
    q = questions[index]
    aliases = [normalize(a) for a in q.answers if normalize(a)]
    rng = random.Random(f"{seed}:{index}")
    order = list(range(len(questions)))
    rng.shuffle(order)
    picked, seen = [], {normalize(q.text)}
    for j in order:
        if len(picked) == n:
            break
        other = questions[j]
        body = normalize(other.title + " " + other.text)
        if j == index or body in seen or any(a in body for a in aliases):
            continue
        seen.add(body)
        picked.append((other.title, other.text))
    if len(picked) < n:
        raise AttnkitError(f"only {len(picked)} passages without an answer of question {index}; {n} needed")
    return picked


def build(questions: list[Question], index: int, n_docs: int, gold_at: int, seed: int = 0) -> Example:
    if not 0 <= gold_at < n_docs:
        raise AttnkitError(f"the gold position must be in [0, {n_docs - 1}], got {gold_at}")
    docs = distractors(questions, index, n_docs - 1, seed)
    q = questions[index]
    docs.insert(gold_at, (q.title, q.text))
    return Example(q, docs, gold_at)


def positions_for(n_docs: int, count: int = 5) -> list[int]:
    """`count` gold positions spread from the first document to the last (0-based)."""
    if count < 2:
        return [0]
    return sorted({round(i * (n_docs - 1) / (count - 1)) for i in range(count)})


def evaluate_mdqa(model, tokenizer, questions: list[Question], indices: list[int], n_docs: int,
                  positions: list[int], systems: list, out=None, quiet: bool = False,
                  chat_template: bool | None = None, seed: int = 0, run: list[str] | None = None) -> list[dict]:
    """Rows {index, n_docs, position, system, answer, answers, correct, tokens} for every question,
    gold position and system, through the one generation loop; rows go to `out` as they finish and a
    rerun resumes. `run` names the systems to answer now (default: all); `out`'s settings name every
    system given, so a later call with more of them resumes the same file."""
    from attnkit.core.decode import use_chat_template
    from attnkit.core.family import architecture
    from attnkit.core.loading import model_identity
    from attnkit.core.generate import answer_text, encode_prompts, generate
    from attnkit.evals.runner import digest, run_grid

    bad = [p for p in positions if not 0 <= p < n_docs]
    if bad:
        raise AttnkitError(f"gold position {bad[0]} is not in [0, {n_docs - 1}]")
    chat = use_chat_template(tokenizer, chat_template)
    limit = architecture(model.config).max_positions
    first = len(tokenizer(build(questions, indices[0], n_docs, 0, seed).prompt())["input_ids"])
    if limit and first + ANSWER_TOKENS > limit:
        raise AttnkitError(f"{n_docs} documents take about {first} tokens, past the model's {limit}; use fewer")
    by_name = {s.name: s for s in systems}
    unknown = sorted(set(run or []) - set(by_name))
    if unknown:
        raise AttnkitError(f"no system named {unknown[0]!r} among {', '.join(by_name)}")
    cells = [{"index": i, "n_docs": n_docs, "position": p, "system": s} for i in indices for p in positions
             for s in by_name if run is None or s in run]

    def work(cell):
        ex = build(questions, cell["index"], n_docs, cell["position"], seed)
        prompt = ex.prompt()
        ids, mask = encode_prompts(tokenizer, [prompt], chat)
        out_ids = generate(model, tokenizer, ids, mask, by_name[cell["system"]].technique, ANSWER_TOKENS,
                           stop_rule="eos", stop_strings=("\n",)).ids[0]
        text = answer_text(tokenizer, out_ids)  # the first line decides (`correct`); it is kept whole here
        return {"answer": text, "answers": ex.question.answers, "correct": correct(text, ex.question.answers),
                "tokens": len(tokenizer(prompt)["input_ids"])}

    settings = None if out is None else {
        "kind": "mdqa", **model_identity(model), "seed": seed, "chat_template": chat,
        "questions": digest([q.question for q in questions]), "systems": {s.name: s.fields for s in systems}}
    return run_grid(cells, ("index", "n_docs", "position", "system"), work, out, "mdqa", quiet, settings=settings)


def curve(rows: list[dict]) -> dict:
    """Per system and document count: accuracy per gold position (Wilson 95%), and ends minus middle
    (the mean of the first and last positions' accuracy minus the middle position's, paired per
    question, bootstrap 95%): above 0 is a middle dip; first and last minus middle apart say whether
    both ends make it (Liu et al.'s U) or one does (primacy or recency alone)."""
    from attnkit.evals import stats

    out: dict = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        for n in sorted({r["n_docs"] for r in rows if r["system"] == system}):
            mine = [r for r in rows if r["system"] == system and r["n_docs"] == n]
            pos = sorted({r["position"] for r in mine})
            acc = {p: stats.wilson(sum(r["correct"] for r in mine if r["position"] == p),
                                   sum(1 for r in mine if r["position"] == p)).as_dict() for p in pos}
            by = {(r["index"], r["position"]): float(r["correct"]) for r in mine}
            middle = pos[len(pos) // 2]
            idx = sorted({r["index"] for r in mine})
            ends = [(by[(i, pos[0])] + by[(i, pos[-1])]) / 2 for i in idx if (i, pos[0]) in by and (i, pos[-1]) in by
                    and (i, middle) in by]
            mids = [by[(i, middle)] for i in idx if (i, pos[0]) in by and (i, pos[-1]) in by and (i, middle) in by]
            dip = stats.paired_difference([100 * m for m in mids], [100 * e for e in ends]) if len(pos) >= 3 else None
            sides = {}
            if len(pos) >= 3:  # which end makes the dip: a U has both, a recency effect the last alone
                both = [i for i in idx if all((i, p) in by for p in (pos[0], middle, pos[-1]))]
                for name, p in (("first_minus_middle", pos[0]), ("last_minus_middle", pos[-1])):
                    sides[name] = stats.paired_difference([100 * by[(i, middle)] for i in both],
                                                          [100 * by[(i, p)] for i in both]).as_dict()
            out.setdefault(system, {})[str(n)] = {"accuracy": {str(p): a for p, a in acc.items()},
                                                  "ends_minus_middle": dip.as_dict() if dip else None, **sides}
    return out
