"""Run S2A variants over a task's examples: one JSONL row per (example, variant), written as it finishes."""

from __future__ import annotations

from pathlib import Path

from dataclasses import asdict

from ..evals.runner import ResultFile, cell_key, digest, progress_bar
from .backends import Backend, ChatSampling
from .pipeline import S2A
from .tasks import PAPER, Example, Task

KEY = ("task", "example", "variant")


def evaluate_s2a(backend: Backend, task: Task, examples: list[Example], variants: list[str], out: Path | None = None,
             sampling: ChatSampling | None = None, judge: Backend | None = None, fallback: bool = True,
             batch: int = 8, quiet: bool = False) -> list[dict]:
    """All rows (old ones read back from `out`, new ones appended to it in batches as they finish)."""
    sampling = sampling or ChatSampling()
    judging = ChatSampling(temperature=0.0, top_p=1.0, max_tokens=16, seed=sampling.seed)  # verdicts: greedy, short
    if out is None:
        return _evaluate(backend, task, examples, variants, None, {}, sampling, judge, judging, fallback, batch, quiet)
    settings = {"kind": "s2a", "task": task.name, "examples": digest([[e.id, e.text] for e in examples]),
                "backend": _identity(backend), "sampling": asdict(sampling),
                "judge": _identity(judge) if judge is not None else None, "fallback": fallback,
                "answer_suffix": task.answer_suffix}
    with ResultFile(out, settings) as results:
        done = {cell_key(r, KEY): r for r in results.done if all(k in r for k in KEY)}
        return _evaluate(backend, task, examples, variants, results, done, sampling, judge, judging, fallback,
                         batch, quiet)


def _identity(backend) -> dict:
    """What a results file records about a backend; one without `identity()` is named by its class."""
    ident = getattr(backend, "identity", None)
    return ident() if callable(ident) else {"backend": type(backend).__name__}


def _evaluate(backend, task, examples, variants, results, done, sampling, judge, judging, fallback, batch,
              quiet) -> list[dict]:
    """Examples go in blocks of `batch`, every variant answering a block before the next block starts:
    a run stopped at any point holds every variant of the same examples, paired."""
    rows = {}
    pipes = {v: S2A(backend, v, sampling, fallback, task.answer_suffix) for v in variants}
    with progress_bar(quiet) as bar:
        job = bar.add_task(f"s2a {task.name}", total=len(examples) * len(variants))
        for ex in examples:
            for key in [(task.name, ex.id, v) for v in variants if (task.name, ex.id, v) in done]:
                # the kept answers scored again by today's scorer (a judge's verdicts are kept as they are)
                rows[key] = done[key] if task.needs_judge else {**done[key], **task.score(ex, done[key]["answer"])}
                bar.advance(job)
        for i in range(0, len(examples), batch):
            for variant in variants:
                chunk = [ex for ex in examples[i:i + batch] if (task.name, ex.id, variant) not in done]
                if not chunk:
                    continue
                answers = pipes[variant].run([e.text for e in chunk], [e.oracle for e in chunk])
                for ex, res in zip(chunk, answers):
                    row = {"task": task.name, "example": ex.id, "variant": variant, "group": ex.group,
                           "prompt": ex.text, **res.to_dict(), **task.score(ex, res.answer, judge, judging)}
                    rows[(task.name, ex.id, variant)] = row
                    if results is not None:
                        results.append(row)
                    bar.advance(job)
    return [rows[(task.name, e.id, v)] for v in variants for e in examples]


def summarize_s2a(rows: list[dict], task: str, metric: str = "score") -> dict:
    """Per variant and per variant x group: n, mean (x100 for accuracies) and 95% interval; parse failures."""
    from .tasks import TASKS

    binary = TASKS[task].binary
    scale = 100.0 if binary else 1.0

    def stats(rs):  # accuracies: Wilson; scores: bootstrap of the mean
        from ..evals import stats as S
        values = [scale * r[metric] for r in rs if r.get(metric) is not None]
        est = S.proportion(values) if binary else S.bootstrap_mean(values)
        return {"n": est.n, "mean": None if est.mean is None else round(est.mean, 1),
                "ci95": None if est.low is None else [round(est.low, 1), round(est.high, 1)]}

    def adoption(rs):  # how often the answer repeats the suggested incorrect answer (Wilson)
        from ..evals import stats as S
        values = [100.0 * r["adopted"] for r in rs if r.get("adopted") is not None]
        est = S.proportion(values)
        return None if not values else {"n": est.n, "mean": round(est.mean, 1),
                                        "ci95": [round(est.low, 1), round(est.high, 1)]}

    out = {"task": task, "metric": metric, "variants": {}, "groups": {}, "adoption": {}, "paper": PAPER.get(task, {})}
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        out["variants"][v] = {**stats(rs), "parse_failures": sum(not r.get("parse_ok", True) for r in rs),
                              "parse_rate": round(100.0 * sum(r.get("parse_ok", True) for r in rs) / len(rs), 1),
                              "truncated": sum(bool(r.get("truncated")) for r in rs),
                              "tokens": sum(r["tokens"]["prompt"] + r["tokens"]["completion"] for r in rs)}
        groups = sorted({r["group"] for r in rs})
        out["groups"][v] = {g: stats([r for r in rs if r["group"] == g]) for g in groups}
        if any("adopted" in r for r in rs):
            out["adoption"][v] = {g: adoption([r for r in rs if r["group"] == g]) for g in groups}
    return out


def plot_s2a(summary: dict, path: str | Path) -> None:
    """Bar chart of each variant's score with its 95% interval, paper figures as markers."""
    from ..evals.plots import pyplot
    plt = pyplot()
    names = list(summary["variants"])
    means = [summary["variants"][v]["mean"] or 0 for v in names]
    err = [[m - (summary["variants"][v]["ci95"] or [m, m])[0] for v, m in zip(names, means)],
           [(summary["variants"][v]["ci95"] or [m, m])[1] - m for v, m in zip(names, means)]]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4))
    ax.bar(names, means, yerr=err, capsize=4, color="#4C72B0")
    label = "paper (LLaMA-2-70B-chat)"
    for i, v in enumerate(names):
        if v in summary["paper"]:
            ax.plot(i, summary["paper"][v], "r_", markersize=22, mew=2, label=label)
            label = None
    ax.set_ylabel(summary["metric"] + (" (%)" if summary["task"] != "longform" else ""))
    ax.set_title(f"S2A on {summary['task']}")
    if label is None:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
