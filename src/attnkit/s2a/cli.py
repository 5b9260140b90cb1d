"""`attnkit s2a ask|eval|variants` (`attnkit serve --upstream` is the S2A proxy, in attnkit.serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.cli_common import DEVICE, DEVICE_MAP, DTYPE, console, emit, quiet_transformers
from attnkit.errors import AttnkitError

s2a_app = typer.Typer(no_args_is_help=True, help="System 2 Attention (Weston & Sukhbaatar 2023).")

BACKEND_HELP = "hf (a local model) or openai (an OpenAI-compatible endpoint)"


def _backend(backend: str, model: str, base_url: Optional[str], api_key_env: str, concurrency: int, device: str,
             dtype: str = "auto", device_map: Optional[str] = None):
    from attnkit.s2a.backends import make_backend
    quiet_transformers()
    return make_backend(backend, model, base_url, api_key_env, concurrency, device, dtype, device_map=device_map)


@s2a_app.command("variants")
def variants():
    """List the S2A variants and baselines."""
    from attnkit.s2a.prompts import VARIANTS
    table = Table(title="S2A variants")
    table.add_column("name")
    table.add_column("what it does")
    for v in VARIANTS.values():
        table.add_row(v.name, v.description)
    Console().print(table)


@s2a_app.command("ask")
def ask(text: str = typer.Argument(..., help="the user's text (question with context, opinions, distractors)"),
        variant: str = typer.Option("s2a", help="see `attnkit s2a variants`"),
        backend: str = typer.Option("hf", help=BACKEND_HELP),
        model: str = typer.Option("embedded", help="local model dir / 'embedded', or the endpoint's model name"),
        base_url: Optional[str] = typer.Option(None, help="endpoint URL for the openai backend, e.g. http://127.0.0.1:8000/v1"),
        api_key_env: str = typer.Option("OPENAI_API_KEY", help="environment variable holding the API key"),
        temperature: float = typer.Option(0.6), top_p: float = typer.Option(0.9),
        max_tokens: int = typer.Option(256), seed: Optional[int] = typer.Option(0),
        device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
        as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Rewrite, then answer from the rewrite alone."""
    from attnkit.s2a import S2A, ChatSampling

    b = _backend(backend, model, base_url, api_key_env, 1, device, dtype, device_map)
    res = S2A(b, variant, ChatSampling(temperature, top_p, max_tokens, seed)).run([text])[0]

    def render():
        if res.rewrite is not None:
            console.print("[bold]step 1, rewrite[/bold]" + ("" if res.parse_ok else " [yellow](not parsed; answered the original)[/yellow]"))
            console.print(res.final_prompt, highlight=False)
        Console().print(res.answer, highlight=False)
    emit(res.to_dict(), as_json, render)


@s2a_app.command("eval")
def eval_cmd(task: str = typer.Argument(..., help="sycophancy, gsm-ic or longform"),
             data: Path = typer.Option(..., help="answer.jsonl / GSM-IC_*.json or gsm8k .jsonl / feedback.jsonl"),
             variants: str = typer.Option("baseline,s2a", help="comma-separated variants"),
             backend: str = typer.Option("hf", help=BACKEND_HELP),
             model: str = typer.Option("embedded", help="local model dir / 'embedded', or the endpoint's model name"),
             base_url: Optional[str] = typer.Option(None, help="endpoint URL for the openai backend"),
             api_key_env: str = typer.Option("OPENAI_API_KEY", help="environment variable holding the API key"),
             concurrency: int = typer.Option(8, help="requests in flight (openai backend)"),
             judge_model: Optional[str] = typer.Option(None, help="LLM judge model (paper: GPT-4)"),
             judge_backend: Optional[str] = typer.Option(None, help="the judge's backend (default: --backend)"),
             judge_base_url: Optional[str] = typer.Option(None, help="the judge's endpoint (default: --base-url)"),
             dataset: str = typer.Option("trivia_qa", help="sycophancy: which base.dataset"),
             templates: Optional[str] = typer.Option(None, help="sycophancy: none,suggest-incorrect,discourage-correct,suggest-correct"),
             limit: Optional[int] = typer.Option(200, help="examples (paper: 200)"),
             seed: int = typer.Option(0, help="sampling seed; also places generated GSM-IC distractors"),
             temperature: float = typer.Option(0.6), top_p: float = typer.Option(0.9),
             max_tokens: int = typer.Option(256), batch: int = typer.Option(8),
             fallback: bool = typer.Option(True, help="answer the original prompt when a rewrite cannot be parsed"),
             device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
             out: Optional[Path] = typer.Option(None, help="append rows here as they finish; reruns resume"),
             plot: Optional[Path] = typer.Option(None, help="bar chart PNG"),
             as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Score S2A variants on a task; one JSONL row per (example, variant)."""
    from attnkit.s2a import tasks as T
    from attnkit.s2a.backends import ChatSampling
    from attnkit.s2a.evaluate import evaluate_s2a, plot_s2a, summarize_s2a
    from attnkit.s2a.prompts import VARIANTS

    if task not in T.TASKS:
        raise AttnkitError(f"unknown task {task!r}: choose from {', '.join(T.TASKS)}")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise AttnkitError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    examples = T.load_task_examples(task, data, dataset, templates.split(",") if templates else None, limit, seed)
    if T.TASKS[task].needs_judge and not judge_model:
        raise AttnkitError(f"the {task} task is scored by an LLM judge: give --judge-model")
    b = _backend(backend, model, base_url, api_key_env, concurrency, device, dtype, device_map)
    judge = (_backend(judge_backend or backend, judge_model, judge_base_url or base_url, api_key_env, concurrency,
                      device, dtype, device_map)
             if judge_model else None)
    sampling = ChatSampling(temperature, top_p, max_tokens, seed)
    rows = evaluate_s2a(b, T.TASKS[task], examples, names, out, sampling, judge, fallback, batch, quiet=as_json)
    summary = summarize_s2a(rows, task)
    if plot:
        plot_s2a(summary, plot)

    emit(summary, as_json, lambda: _show_eval(summary, task, len(examples), model))


def _show_eval(summary: dict, task: str, n: int, model: str) -> None:
    table = Table(title=f"S2A {task}: {n} examples" + (f", {model}" if model else ""))
    for col in ("variant", "n", "score", "95% interval", "parse failures", "paper (LLaMA-2-70B-chat)"):
        table.add_column(col)
    for v, s in summary["variants"].items():
        paper = summary["paper"].get(v)
        table.add_row(v, str(s["n"]), f"{s['mean']}", f"{s['ci95']}", str(s["parse_failures"]),
                      "" if paper is None else f"{paper}")
    Console().print(table)
    groups = Table(title="by group (opinion template / distractor type)")
    groups.add_column("variant")
    all_groups = sorted({g for gs in summary["groups"].values() for g in gs})
    for g in all_groups:
        groups.add_column(g)
    for v, gs in summary["groups"].items():
        groups.add_row(v, *[f"{gs[g]['mean']} {gs[g]['ci95']} n={gs[g]['n']}" if g in gs else "" for g in all_groups])
    Console().print(groups)
