"""`attnkit niah` and `attnkit eval ...`: the tasks, each run on the model as it is and with a technique.

Every command here takes a technique the same way: `--technique NAME --set K=V`, or the options that
spell one technique's settings (`--kv-*`, `--bases/--search/--combine`), generated from its registry
entry (`cli_common.technique_options`); `Choice.load` checks the settings, loads the weights, finishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.cli_common import (CHAT_TEMPLATE, DEVICE, DEVICE_MAP, DTYPE, HAYSTACK, MODEL_HELP, NEEDLES, SETTINGS,
                                TECHNIQUE, TRIALS_OUT, console, emit, floats, ints, quiet_transformers,
                                technique_choice, technique_options)
from attnkit.errors import AttnkitError

eval_app = typer.Typer(no_args_is_help=True, help="Evaluations that compare methods on one task.")


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


@technique_options("kv-cache", "buckets")
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
         technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS,
         as_json: bool = typer.Option(False, "--json", help="print one JSON object"), spelled: dict = None):
    """Needle-in-a-haystack recall over a (length, depth) grid: the model as it is, or with a technique
    (`--technique NAME --set K=V`; `--kv-*` and `--bases/--search` spell the KV cache and Buckets)."""
    from attnkit.evals import niah as N

    quiet_transformers()
    length_list, depth_list = ints(lengths, "--lengths"), floats(depths, "--depths")
    N.check_depths(depth_list)
    if prompt not in N.PROMPTS:
        raise AttnkitError(f"--prompt must be {' or '.join(N.PROMPTS)}, not {prompt!r}")
    choice = technique_choice(technique, settings, spelled)
    needle_list, text = [], ""

    def inputs():  # read after the settings are checked, before the weights load
        nonlocal needle_list, text
        needle_list, text = N.load_needles(needles), N.load_haystack(haystack)

    mdl, tok, record = choice.load(model, device=device, dtype=dtype, device_map=device_map, before_weights=inputs)
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
@technique_options("kv-cache")
def ruler(model: str = typer.Option("embedded", help=MODEL_HELP),
          tasks: str = typer.Option("niah", help="RULER tasks, comma-separated: niah (the 8 NIAH tasks), all, or names "
                                                 "(niah_single_1..3, niah_multikey_1..3, niah_multivalue, "
                                                 "niah_multiquery, vt, cwe, fwe)"),
          lengths: str = typer.Option("4096", help="prompt lengths in tokens"),
          samples: int = typer.Option(24, help="examples per task and length"),
          haystack: Optional[Path] = typer.Option(None, help="essays (a .txt file or a folder, e.g. Paul Graham's) "
                                                            "for the essay tasks; default: built-in prose"),
          seed: int = typer.Option(0, help="seed of the generated examples"),
          question_after: bool = typer.Option(False, help="prefill and compress each context before its question "
                                                          "arrives (query-agnostic); default: the question is in "
                                                          "the prompt the cache compresses (query-aware)"),
          prefill_chunk: int = typer.Option(2048, help="prompt tokens per prefill forward, every system (0: the "
                                                       "whole prompt at once)"),
          answer_prefix: bool = typer.Option(True, help="under the chat template, start the reply with RULER's "
                                                        "answer prefix, as RULER and kvpress do (off: the question "
                                                        "alone)"),
          technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS,
          chat_template: Optional[bool] = CHAT_TEMPLATE,
          device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
          out: Optional[Path] = TRIALS_OUT,
          as_json: bool = typer.Option(False, "--json", help="print one JSON object"), spelled: dict = None):
    """RULER's synthetic long-context tasks (Hsieh et al. 2024), generated offline: the model as it is,
    and with a technique when one is given (`--technique NAME --set K=V`, or `--kv-*` for the
    retrieval-head KV cache), on the same prompts."""
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
    if spelled.get("kv-cache"):  # the KV cache prefills in the evaluation's chunks unless told otherwise
        spelled["kv-cache"].setdefault("chunk", prefill_chunk or max(length_list))
    choice = technique_choice(technique, settings, spelled)
    essays = None

    def inputs():
        nonlocal essays
        from attnkit.evals.niah import load_haystack
        essays = load_haystack(haystack) if haystack else None

    mdl, tok, record = choice.load(model, device=device, dtype=dtype, device_map=device_map, before_weights=inputs)
    systems = [System("full cache", {"cache": "full"})]
    if choice.name != "plain":
        from attnkit.core.registry import entry
        name = choice.label(record)
        systems.append(System(name, {entry(choice.name).row_field: name, **record.describe()}, record))
    rows = R.evaluate_ruler(mdl, tok, task_list, length_list, samples, systems, out, quiet=as_json,
                            chat_template=chat_template, essays=essays, seed=seed,
                            prefill_chunk=prefill_chunk or None, question_after=question_after,
                            answer_prefix=answer_prefix)
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
@technique_options("buckets")
def eval_mdqa(data: Path = typer.Option(..., help="NQ-open with gold passages (nq-open-oracle.jsonl.gz of "
                                                  "Lost in the Middle)"),
              model: str = typer.Option("embedded", help=MODEL_HELP),
              docs: int = typer.Option(20, help="documents per prompt (the paper: 10, 20, 30)"),
              positions: Optional[str] = typer.Option(None, help="gold positions, 0-based (default: 5 spread "
                                                                 "from the first document to the last)"),
              questions: int = typer.Option(50, help="questions, the same at every position"),
              first: int = typer.Option(0, help="index of the first question"),
              technique: Optional[str] = TECHNIQUE, settings: Optional[List[str]] = SETTINGS,
              chat_template: Optional[bool] = CHAT_TEMPLATE,
              device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
              out: Optional[Path] = TRIALS_OUT,
              plot: Optional[Path] = typer.Option(None, help="accuracy against the gold position, PNG"),
              as_json: bool = typer.Option(False, "--json", help="print one JSON object"), spelled: dict = None):
    """Multi-document QA with the gold passage at each position (Lost in the Middle): the model as it
    is, and with a technique on the same prompts; accuracy per position and ends minus middle."""
    from attnkit.evals import mdqa as Q
    from attnkit.evals.systems import System

    quiet_transformers()
    if docs < 2 or questions < 1 or first < 0:
        raise AttnkitError("--docs must be at least 2, --questions at least 1, --first at least 0")
    pos = ints(positions, "--positions") if positions else Q.positions_for(docs)
    choice = technique_choice(technique, settings, spelled)
    qs = []

    def inputs():
        nonlocal qs
        qs = Q.load_nq(data)
        if first + questions > len(qs):
            raise AttnkitError(f"{data} has {len(qs)} questions; --first {first} --questions {questions} passes the end")

    mdl, tok, record = choice.load(model, device=device, dtype=dtype, device_map=device_map, before_weights=inputs)
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


@eval_app.command("kv-retrieval")
@technique_options("buckets")
def kv_retrieval(model: str = typer.Option("embedded", help=MODEL_HELP),
                 data: Optional[Path] = typer.Option(None, help="Lost-in-the-Middle kv-retrieval .jsonl(.gz); default: fresh UUID pairs"),
                 examples: int = typer.Option(5, help="how many examples (each runs every position and system; 20 take about 7 minutes on 2 CPU cores)"),
                 num_pairs: int = typer.Option(10, help="key-value pairs per prompt"),
                 positions: Optional[str] = typer.Option(None, help="gold positions (default: 0, every quarter, last)"),
                 seed: int = typer.Option(0, help="seed of the generated examples"),
                 chat_template: Optional[bool] = CHAT_TEMPLATE,
                 device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
                 out: Optional[Path] = typer.Option(None, help="append rows here as they finish; reruns resume"),
                 plot: Optional[Path] = typer.Option(None, help="accuracy-by-position PNG"),
                 as_json: bool = typer.Option(False, "--json", help="print one JSON object"), spelled: dict = None):
    """Accuracy by gold position, the model's own RoPE base vs Attention Buckets."""
    from attnkit.core.loading import rope_base
    from attnkit.evals import kv_retrieval as kv
    from attnkit.evals.systems import System

    quiet_transformers()
    if num_pairs < 2:
        raise AttnkitError("--num-pairs must be at least 2")
    pos = (ints(positions, "--positions") if positions
           else sorted({0, num_pairs // 4, num_pairs // 2, 3 * num_pairs // 4, num_pairs - 1}))
    exs = kv.load_examples(data)[:examples] if data else kv.generate_examples(examples, num_pairs, seed)
    given = spelled.get("buckets") or {}
    if not given.get("bases") and not given.get("search"):
        raise AttnkitError("give the buckets' --bases, or --search")
    choice = technique_choice(None, None, {"buckets": given})
    mdl, tok, buckets = choice.load(model, device=device, dtype=dtype, device_map=device_map)
    base_list, combine = buckets.bases, buckets.combine
    single = technique_choice(None, None, {"buckets": {"bases": [str(rope_base(mdl.config))], "combine": combine}}) \
        .build(mdl.config)  # the model's own base alone, through the same registry entry
    systems = [System(name, {"bases": cfg.bases, "combine": cfg.combine}, cfg)
               for name, cfg in (("single", single), ("buckets", buckets))]
    summary = kv.evaluate_kv_retrieval(mdl, tok, exs, num_pairs, pos, systems, out=out, quiet=as_json, chat_template=chat_template)
    summary["bases"] = base_list
    if plot:
        from attnkit.evals.plots import accuracy_by_position
        accuracy_by_position(summary, plot, f"{model}: {num_pairs} pairs, {summary['examples']} examples")

    def render():
        table = Table(title=f"kv-retrieval accuracy (%), {num_pairs} pairs, {summary['examples']} examples")
        table.add_column("system")
        for p in pos:
            table.add_column(str(p), justify="right")
        table.add_column("mean", justify="right")
        for name, acc in summary["accuracy"].items():
            table.add_row(name, *[f"{acc[str(p)]:.0f}" for p in pos], f"{summary['mean'][name]:.1f}")
        Console().print(table)
    emit(summary, as_json, render)


def _estimate_text(d: dict | None) -> str:
    """An Estimate.as_dict() as `mean [low, high], n=N`."""
    from attnkit.evals.stats import Estimate
    return "-" if d is None else Estimate.from_dict(d).text()


