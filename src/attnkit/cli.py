"""The `attnkit` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.buckets.cli import buckets_app, eval_app
from attnkit.cli_common import console, emit, floats, ints, quiet_transformers
from attnkit.errors import AttnkitError
from attnkit.s2a.cli import s2a_app, serve

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fix and explain how LLMs use their context.")

@app.command()
def info(model: str = typer.Argument(..., help="local model directory or 'embedded'"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Architecture facts: layers, heads, KV heads, head dim, RoPE, max positions, parameters."""
    from attnkit.core.loading import model_info

    facts = model_info(model)
    if as_json:
        print(json.dumps(facts))
        return
    table = Table(title=str(model), show_header=False)
    for k, v in facts.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) and k == "parameters" else str(v))
    Console().print(table)


def _niah_table(summary: dict, title: str) -> Table:
    lengths = sorted({c["length"] for c in summary["grid"]})
    depths = sorted({c["depth"] for c in summary["grid"]})
    from attnkit.evals.niah import grid_map
    cell = grid_map(summary["grid"])
    table = Table(title=f"{title}: mean ROUGE-1 recall {summary['mean_recall']}")
    table.add_column("depth \\ length")
    for L in lengths:
        table.add_column(str(L), justify="right")
    for d in depths:
        table.add_row(f"{d:g}%", *[f"{cell[(L, d)]:.0f}" if (L, d) in cell else "-" for L in lengths])
    return table


@app.command()
def niah(model: str = typer.Option("embedded", help="local model directory or 'embedded'"),
         needles: Optional[Path] = typer.Option(None, help="needles JSONL (needle, question, real_needle), or \"passkey\"; default: built-in"),
         haystack: Optional[Path] = typer.Option(None, help=".txt file or folder of .txt files"),
         lengths: str = typer.Option("512,1024,2048", help="context lengths in tokens"),
         depths: str = typer.Option("0,25,50,75,100", help="needle depths in percent"),
         chat_template: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
         device: str = typer.Option("cpu"), dtype: str = typer.Option("float32"),
         out: Optional[Path] = typer.Option(None, help="append results here as they finish; reruns resume"),
         plot: Optional[Path] = typer.Option(None, help="write a depth x length heatmap PNG"),
         bases: Optional[str] = typer.Option(None, help="also run Attention Buckets with these RoPE bases"),
         search: bool = typer.Option(False, help="also run Attention Buckets with searched bases"),
         combine: str = typer.Option("paper", help="buckets' combine mode: paper or reference"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Needle-in-a-haystack recall over a (length, depth) grid (optionally: one RoPE base vs buckets)."""
    from attnkit.core.loading import load_model
    from attnkit.evals import niah as N

    quiet_transformers()
    length_list, depth_list = ints(lengths, "--lengths"), floats(depths, "--depths")
    needle_list = N.load_needles(needles)
    text = N.load_haystack(haystack)
    mdl, tok = load_model(model, device=device, dtype=dtype)
    systems = {"NIAH": ({}, None)}
    if bases or search:
        from attnkit.buckets import BucketedModel, BucketsConfig
        from attnkit.buckets.cli import _bases
        base_list = _bases(model, bases, search)
        config = BucketsConfig(base_list, combine)
        systems = {"one base": ({"system": "single"}, None),
                   "buckets": ({"system": config.label}, BucketedModel(mdl, tok, config).as_decoder())}
    summaries = {}
    for name, (extra, decode) in systems.items():
        rows = N.evaluate(mdl, tok, needle_list, text, length_list, depth_list, out=out, chat_template=chat_template,
                          quiet=as_json, label=name, extra=extra, decode=decode)
        summaries[name] = N.summarize(rows)
    summary = summaries[next(iter(systems))]
    if "buckets" in summaries:
        summary = {**summary, "buckets": {**summaries["buckets"], "bases": base_list, "combine": combine}}
    if plot:
        from attnkit.evals.plots import niah_heatmaps
        niah_heatmaps({name: N.grid_map(s["grid"]) for name, s in summaries.items()}, plot, length_list, depth_list)
    if as_json:
        print(json.dumps(summary))
    else:
        for name, s in summaries.items():
            Console().print(_niah_table(s, f"{model}, {name}" if len(summaries) > 1 else str(model)))
        if summary["skipped"]:
            console.print(f"skipped trials: {summary['skipped']} (see --out for reasons)")


@app.command()
def demo(out_dir: Path = typer.Option(Path("attnkit-demo"), help="where plots and results go")):
    """Every technique on the embedded model: NIAH, retrieval heads and their ablation, Attention Buckets."""
    from attnkit import demo as D

    quiet_transformers()
    D.run(out_dir)


heads_app = typer.Typer(no_args_is_help=True, help="Retrieval heads (Wu et al. 2024).")
app.add_typer(heads_app, name="heads")
app.add_typer(buckets_app, name="buckets")
app.add_typer(eval_app, name="eval")
app.add_typer(s2a_app, name="s2a")
app.command("serve")(serve)


@heads_app.command("detect")
def heads_detect(model: str = typer.Option("embedded", help="local model directory or 'embedded'"),
                 needles: Optional[Path] = typer.Option(None, help="needles JSONL or \"passkey\"; default: built-in"),
                 haystack: Optional[Path] = typer.Option(None, help="haystack file/folder, or a detection folder with part{i}/p1.txt"),
                 lengths: Optional[str] = typer.Option(None, help="context lengths; default 20 evenly spaced up to --max-length"),
                 max_length: Optional[int] = typer.Option(None, help="default: the model's max positions"),
                 depths: Optional[str] = typer.Option(None, help="depths in percent; default 10 evenly spaced 0-100"),
                 count: str = typer.Option("unique", help="unique (paper: distinct needle tokens) or repeats (authors' code)"),
                 first_token: bool = typer.Option(True, help="also score the token produced by the prefill (paper); off = authors' code"),
                 threshold: float = typer.Option(0.1, help="retrieval-head threshold on the mean score"),
                 device: str = typer.Option("cpu"), dtype: str = typer.Option("float32"),
                 out: Path = typer.Option(Path("detect_trials.jsonl"), help="trials, appended as they finish; reruns resume"),
                 scores: Path = typer.Option(Path("head_scores.json"), help="score file to write (authors' format)"),
                 top: int = typer.Option(20), plot: Optional[Path] = typer.Option(None),
                 as_json: bool = typer.Option(False, "--json")):
    """Detect retrieval heads with NIAH trials (Wu et al. 2024)."""
    from attnkit.core.loading import load_model
    from attnkit.evals import niah as N
    from attnkit.heads import detect as D
    from attnkit.heads import scores as S

    quiet_transformers()
    if count not in ("unique", "repeats"):
        raise AttnkitError(f"--count must be unique or repeats, not {count!r}")
    mdl, tok = load_model(model, device=device, dtype=dtype)
    limit = max_length or mdl.config.max_position_embeddings
    length_list = ints(lengths, "--lengths") if lengths else D.default_lengths(limit)
    depth_list = floats(depths, "--depths") if depths else D.default_depths()
    needle_list = N.load_needles(needles)
    per_head, rows = D.detect(mdl, tok, needle_list, D.haystacks_for(needle_list, haystack), length_list,
                              depth_list, out=out, count=count, first_token=first_token, quiet=as_json)
    S.save_scores(per_head, scores)
    result = S.summary(per_head, top, threshold)
    result["trials"] = len(rows)
    result["counted_trials"] = sum(1 for r in rows if r.get("recall") is not None and r["recall"] > D.MIN_RECALL)
    if result["counted_trials"] == 0:
        console.print("no trial was answered well enough to count (recall > 50): every score is 0")
    if plot:
        S.plot_heatmap(S.as_grid(per_head), plot, title=f"retrieval score ({count})")
    emit(result, as_json, lambda: Console().print(
        f"{result['counted_trials']} of {result['trials']} trials counted; "
        f"{result['above_threshold']} of {result['heads']} heads above {threshold}; scores: {scores}"))


@heads_app.command("ablate")
def heads_ablate(model: str = typer.Option("embedded", help="local model directory or 'embedded'"),
                 scores: Path = typer.Option(..., help="retrieval-score file (authors' format)"),
                 k: str = typer.Option(..., help="how many heads to mask; a list (1,2,4,8) sweeps K"),
                 mode: str = typer.Option("uniform", help="uniform (zero the query, as the authors) or zero (zero the output)"),
                 phase: str = typer.Option("decode", help="decode (the authors), prefill or both"),
                 seeds: int = typer.Option(3, help="random-head draws"),
                 needles: Optional[Path] = typer.Option(None, help="needles JSONL or \"passkey\"; default: built-in"),
                 haystack: Optional[Path] = typer.Option(None),
                 lengths: str = typer.Option("512,1024,2048"), depths: str = typer.Option("0,25,50,75,100"),
                 device: str = typer.Option("cpu"), dtype: str = typer.Option("float32"),
                 out: Optional[Path] = typer.Option(None, help="trials JSONL; reruns resume"),
                 plot: Optional[Path] = typer.Option(None, help="one K: three heatmaps side by side; several: recall against K"),
                 as_json: bool = typer.Option(False, "--json")):
    """NIAH with no mask vs the top-K retrieval heads masked vs K random non-retrieval heads."""
    from attnkit.core.loading import load_model
    from attnkit.evals import niah as N
    from attnkit.heads import ablate as A
    from attnkit.heads import scores as S

    quiet_transformers()
    from attnkit.core.hook import HeadMask
    HeadMask(mode=mode, phase=phase)  # validates both before any work
    k_list = ints(k, "--k")
    if any(x < 1 for x in k_list):
        raise AttnkitError("--k must be at least 1")
    length_list, depth_list = ints(lengths, "--lengths"), floats(depths, "--depths")
    data = S.load_scores(scores)
    mdl, tok = load_model(model, device=device, dtype=dtype)
    needle_list, hay = N.load_needles(needles), N.load_haystack(haystack)
    runs = A.ablate_sweep(mdl, tok, data, k_list, needle_list, hay, length_list, depth_list,
                          mode=mode, phase=phase, seeds=seeds, out=out, quiet=as_json)
    if len(runs) > 1:
        if plot:
            from attnkit.evals.plots import ablation_curve
            ablation_curve(runs, plot)
        table = Table(title=f"mean NIAH recall ({mode} mode, {phase}; no mask {runs[0]['none']})")
        for col in ("K", "top-K masked", f"K random masked ({seeds} seeds)"):
            table.add_column(col, justify="right")
        for r in runs:
            table.add_row(str(r["k"]), f"{r['top']}", f"{r['random']} +- {r['random_std']}")
        emit({"sweep": runs}, as_json, lambda: Console().print(table))
        return
    res = runs[0]
    if plot:
        from attnkit.evals.plots import niah_heatmaps
        niah_heatmaps(A.condition_grids(res), plot, length_list, depth_list)
    emit(res, as_json, lambda: Console().print(
        f"mean NIAH recall: no mask {res['none']}, top-{res['k']} masked {res['top']}, "
        f"{res['k']} random masked {res['random']} +- {res['random_std']} ({seeds} seeds)"))


@heads_app.command("show")
def heads_show(file: Path = typer.Argument(..., help="score file: one JSON object, 'layer-head' -> per-trial scores"),
               top: int = typer.Option(20, help="how many heads to list"),
               threshold: float = typer.Option(0.1, help="retrieval-head threshold on the mean score"),
               plot: Optional[Path] = typer.Option(None, help="write a layer x head heatmap PNG"),
               as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Rank the heads of a retrieval-score file."""
    from attnkit.heads import scores as S

    data = S.load_scores(file)
    result = S.summary(data, top, threshold)
    if plot:
        S.plot_heatmap(S.as_grid(data), plot, title=file.stem)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{file.name}: {result['above_threshold']} of {result['heads']} heads above "
                        f"{threshold} ({100 * result['fraction_above']:.1f}%)")
    for col in ("rank", "layer", "head", "score"):
        table.add_column(col, justify="right")
    for i, (l, h, m) in enumerate(result["top"], 1):
        table.add_row(str(i), str(l), str(h), f"{m:.2f}")
    Console().print(table)


def main() -> None:
    try:
        app()
    except AttnkitError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished results are kept")
        sys.exit(130)


if __name__ == "__main__":
    main()
