"""Retrieval-head detection: NIAH trials over (needle, length, depth), copy scores per head.

A trial counts only when its answer's ROUGE-1 recall against real_needle exceeds 50; a head's
retrieval score is the mean of its per-trial scores over counted trials. Prompts are built the
authors' way by default (`prompt="authors"`, see `attnkit.evals.authors_prompt`), so that scores are
comparable with their published files; `prompt="clean"` uses attnkit's NIAH builder. Every trial is appended to a
JSONL file as it finishes, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from attnkit.core.family import architecture
from attnkit.errors import AttnkitError
from attnkit.evals import niah as N
from attnkit.evals.runner import run_grid
from attnkit.heads.copying import Count, trial

MIN_RECALL = 50.0


def counted(rows: list[dict], min_recall: float = MIN_RECALL) -> int:
    """How many trials count: answered with ROUGE-1 recall above `min_recall`."""
    return sum(1 for r in rows if r.get("recall") is not None and r["recall"] > min_recall)


def default_lengths(max_length: int, n: int = 20) -> list[int]:
    return sorted({round(max_length * (i + 1) / n) for i in range(n)})


def default_depths(n: int = 10) -> list[float]:
    return [round(100 * i / (n - 1), 2) for i in range(n)]


def haystacks_for(needles: list[N.Needle], haystack: str | Path | None) -> list[str]:
    """One haystack text per needle: part{i}/p1.txt of a detection folder pairs with needle i."""
    if haystack is not None and Path(haystack).is_dir() and (Path(haystack) / "part1").is_dir():
        texts = []
        for i in range(1, len(needles) + 1):
            part = Path(haystack) / f"part{i}" / "p1.txt"
            if not part.is_file():
                raise AttnkitError(f"{part} is missing: needle {i} has no haystack")
            texts.append(N.load_haystack(part))
        return texts
    text = N.load_haystack(haystack)
    return [text] * len(needles)


def detect(model, tokenizer, needles: list[N.Needle], haystacks: list[str], lengths: list[int],
           depths: list[float], out: Path | None = None, count: Count = "unique", first_token: bool = True,
           min_recall: float = MIN_RECALL, quiet: bool = False, prompt: Literal["authors", "clean"] = "authors",
           chat_template: bool | None = None) -> tuple[dict, list[dict]]:
    """Return ({(layer, head): [per-trial scores of counted trials]}, trial rows). `chat_template`
    None: the tokenizer's template when it has one."""
    N.check_lengths(model, lengths)
    N.check_depths(depths)
    chat_template = N.use_chat_template(tokenizer, chat_template)
    builders = {}
    arch = architecture(model.config)
    layers, heads = arch.layers, arch.query_heads

    def work(cell):
        i = cell["needle"]
        if i not in builders:
            builders[i] = N.prompt_builder(prompt, tokenizer, haystacks[i], chat_template, max(lengths))
        try:
            built = builders[i].build(needles[i], cell["length"], cell["depth"])
        except AttnkitError as e:
            return {"answer": None, "recall": None, "skipped": str(e)}
        scores, generated = trial(model, tokenizer, built.input_ids, built.span, count=count,
                                  first_token=first_token, stop_rule=prompt)
        answer = tokenizer.decode(generated, skip_special_tokens=True).strip()
        return {"answer": answer, "recall": N.recall(answer, needles[i].real_needle),
                "scores": [round(float(x), 8) for x in scores.flatten()]}

    cells = N.grid_cells(needles, lengths, depths, count=count, first_token=first_token)
    # min_recall is left out: it filters trials when they are aggregated, rows hold them all
    settings = N.run_settings("heads-detect", model, needles, haystacks, lengths, depths, prompt=prompt,
                              chat_template=chat_template) if out is not None else None
    rows = run_grid(cells, ("count", "first_token", "needle", "length", "depth"), work, out,
                    description="detection trials", quiet=quiet, settings=settings)
    per_head = {(l, h): [] for l in range(layers) for h in range(heads)}
    for row in rows:
        if row.get("recall") is not None and row["recall"] > min_recall:
            for j, s in enumerate(row["scores"]):
                per_head[divmod(j, heads)].append(s)
    return per_head, rows
