"""`attnkit heads ...`: retrieval heads (detect, patterns, gates, ablate, show, compare)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.cli_common import (CHAT_TEMPLATE, DEVICE, DEVICE_MAP, DTYPE, HAYSTACK, MODEL_HELP, NEEDLES, TRIALS_OUT,
                                 console, emit, floats, ints, quiet_transformers)
from attnkit.core.family import architecture
from attnkit.kvcache.config import KV_DEFAULTS
from attnkit.errors import AttnkitError

heads_app = typer.Typer(no_args_is_help=True, help="Retrieval heads (Wu et al. 2024).")


@heads_app.command("detect")
def heads_detect(model: str = typer.Option("embedded", help=MODEL_HELP),
                 needles: Optional[Path] = NEEDLES,
                 haystack: Optional[Path] = typer.Option(None, help="haystack file/folder, or a detection folder with part{i}/p1.txt"),
                 lengths: Optional[str] = typer.Option(None, help="context lengths; default 20 evenly spaced up to --max-length"),
                 max_length: Optional[int] = typer.Option(None, help="default: the model's max positions"),
                 depths: Optional[str] = typer.Option(None, help="depths in percent; default 10 evenly spaced 0-100"),
                 count: str = typer.Option("unique", help="unique (paper: distinct needle tokens) or repeats (authors' code)"),
                 first_token: bool = typer.Option(True, help="score the first generated token too (paper and authors' "
                                                             "code); --no-first-token skips it (neither does)"),
                 prompt: str = typer.Option("authors", help="authors (their construction, artefacts included: scores "
                                                            "comparable with the published files) or clean"),
                 chat_template: Optional[bool] = CHAT_TEMPLATE,
                 threshold: float = typer.Option(0.1, help="retrieval-head threshold on the mean score"),
                 device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
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
    if prompt not in N.PROMPTS:
        raise AttnkitError(f"--prompt must be {' or '.join(N.PROMPTS)}, not {prompt!r}")
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    positions = architecture(mdl.config).max_positions
    limit = max_length or positions
    if limit > positions:
        raise AttnkitError(f"--max-length {limit} is above the model's max positions ({positions})")
    length_list = ints(lengths, "--lengths") if lengths else D.default_lengths(limit)
    depth_list = floats(depths, "--depths") if depths else D.default_depths()
    needle_list = N.load_needles(needles)
    per_head, rows = D.detect(mdl, tok, needle_list, D.haystacks_for(needle_list, haystack), length_list,
                              depth_list, out=out, count=count, first_token=first_token, quiet=as_json,
                              prompt=prompt, chat_template=chat_template)
    S.save_scores(per_head, scores)
    result = S.summary(per_head, top, threshold)
    result["trials"] = len(rows)
    result["counted_trials"] = D.counted(rows)
    result["chat_template"] = N.use_chat_template(tok, chat_template)
    arch = architecture(mdl.config)
    if arch.hybrid:
        result["by_layer_type"] = S.by_layer_type(per_head, arch, threshold)
    if result["counted_trials"] == 0:
        hint = ("; the authors' prompt carries their artefacts (a BOS before the needle, a glued question), "
                "try --prompt clean") if prompt == "authors" else ""
        console.print(f"no trial was answered well enough to count (recall > 50): every score is 0{hint}",
                      highlight=False)
    if plot:
        S.plot_heatmap(S.as_grid(per_head), plot, title=f"retrieval score ({count})")
    where = "".join(f"; {v['above_threshold']} of {v['heads']} in {t}-attention layers"
                    for t, v in result.get("by_layer_type", {}).items())
    emit(result, as_json, lambda: Console().print(
        f"{result['counted_trials']} of {result['trials']} trials counted; "
        f"{result['above_threshold']} of {result['heads']} heads above {threshold}{where}; scores: {scores}"))


@heads_app.command("patterns")
def heads_patterns(model: str = typer.Option("embedded", help=MODEL_HELP),
                   length: int = typer.Option(64, help="tokens in the random block that is read twice"),
                   batch: int = typer.Option(4, help="random blocks (each one a row of the score lists)"),
                   seed: int = typer.Option(0),
                   out: Path = typer.Option(Path("."), help="folder for echo.json and induction.json"),
                   threshold: float = typer.Option(0.1, help="count heads whose mean score is above this"),
                   top: int = typer.Option(10),
                   device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
                   as_json: bool = typer.Option(False, "--json")):
    """Echo and induction scores (RazorAttention) on a random block read twice; score files for `kv plan`."""
    from attnkit.core.loading import load_model
    from attnkit.heads import scores as S
    from attnkit.heads.patterns import pattern_scores

    quiet_transformers()
    if batch < 1:
        raise AttnkitError("--batch must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    echo, induction = pattern_scores(mdl, tok, length, batch, seed)
    S.save_scores(echo, out / "echo.json")
    S.save_scores(induction, out / "induction.json")
    result = {"echo": S.summary(echo, top, threshold), "induction": S.summary(induction, top, threshold),
              "files": [str(out / "echo.json"), str(out / "induction.json")]}

    def render():
        for name in ("echo", "induction"):
            r = result[name]
            best = ", ".join(f"{l}-{h} {m:.2f}" for l, h, m in r["top"])
            console.print(f"{name}: {r['above_threshold']} of {r['heads']} heads above {threshold}; top: {best}",
                          highlight=False)
        console.print(f"scores: {', '.join(result['files'])}", highlight=False)
    emit(result, as_json, render)


@heads_app.command("gates")
def heads_gates(model: str = typer.Option("embedded", help=MODEL_HELP),
                steps: int = typer.Option(80), length: int = typer.Option(768, help="tokens per passkey context"),
                passkeys: int = typer.Option(3, help="passkeys hidden in each context"),
                sink: int = typer.Option(KV_DEFAULTS.sink), window: int = typer.Option(KV_DEFAULTS.window),
                lr: float = typer.Option(0.05), l1: float = typer.Option(0.05, help="sparsity weight: higher, fewer full heads"),
                seed: int = typer.Option(0),
                haystack: Optional[Path] = HAYSTACK,
                out: Path = typer.Option(Path("gates.json"), help="score file to write (one gate per head)"),
                state: Optional[Path] = typer.Option(None, help="checkpoint after every step; a rerun resumes "
                                                               "(default: OUT.state.pt)"),
                device: str = DEVICE, dtype: str = DTYPE,
                as_json: bool = typer.Option(False, "--json")):
    """Learn a gate per KV head (DuoAttention): full attention vs sink + window, on passkey contexts."""
    from attnkit.core.loading import load_model
    from attnkit.evals import niah as N
    from attnkit.heads import scores as S
    from attnkit.heads.gates import GateTraining, train_gates

    quiet_transformers()
    settings = GateTraining(steps, length, passkeys, sink, window, lr, l1, seed)
    text = N.load_haystack(haystack)
    mdl, tok = load_model(model, device=device, dtype=dtype)
    gates, log = train_gates(mdl, tok, settings, text, quiet=as_json,
                             state=state or out.with_name(out.name + ".state.pt"))
    S.save_scores(gates, out)
    result = {"file": str(out), "steps": len(log), "last": log[-1] if log else None,
              "top": S.summary(gates, 10)["top"]}
    emit(result, as_json, lambda: console.print(
        f"{len(log)} steps; last deviation {log[-1]['deviation']:.5f}, mean gate {log[-1]['mean_gate']:.3f}; "
        f"gates: {out}", highlight=False))


@heads_app.command("ablate")
def heads_ablate(model: str = typer.Option("embedded", help=MODEL_HELP),
                 scores: Path = typer.Option(..., help="retrieval-score file (authors' format)"),
                 k: str = typer.Option(..., help="how many heads to mask; a list (1,2,4,8) sweeps K"),
                 mode: str = typer.Option("uniform", help="uniform (zero the query, as the authors) or zero (zero the output)"),
                 phase: str = typer.Option("decode", help="decode (the authors), prefill or both"),
                 seeds: int = typer.Option(3, help="random-head draws"),
                 needles: Optional[Path] = NEEDLES,
                 haystack: Optional[Path] = HAYSTACK,
                 lengths: str = typer.Option("512,1024,2048"), depths: str = typer.Option("0,25,50,75,100"),
                 chat_template: Optional[bool] = CHAT_TEMPLATE,
                 device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
                 out: Optional[Path] = TRIALS_OUT,
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
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    needle_list, hay = N.load_needles(needles), N.load_haystack(haystack)
    runs = A.ablate_sweep(mdl, tok, data, k_list, N.Grid(needle_list, hay, length_list, depth_list),
                          mode=mode, phase=phase, seeds=seeds, out=out, quiet=as_json, chat_template=chat_template)
    if len(runs) > 1:
        if plot:
            from attnkit.evals.plots import ablation_curve
            ablation_curve(runs, plot)
        table = Table(title=f"mean NIAH recall ({mode} mode, {phase}; no mask {runs[0]['none']})")
        for col in ("K", "top-K masked", f"K random masked ({seeds} seeds)"):
            table.add_column(col, justify="right")
        for r in runs:
            table.add_row(str(r["k"]), f"{r['top']}", f"{r['random']} +- {r['random_sd'] or 0} (sample SD)")
        emit({"sweep": runs}, as_json, lambda: Console().print(table))
        return
    res = runs[0]
    kinds = res["top_heads_layer_types"]
    where = (f" (top heads: {kinds.count('full')} in full-attention layers, {kinds.count('sliding')} in "
             "sliding-window layers)") if architecture(mdl.config).hybrid else ""
    if plot:
        from attnkit.evals.plots import niah_heatmaps
        niah_heatmaps(A.condition_grids(res), plot, length_list, depth_list)
    emit(res, as_json, lambda: Console().print(
        f"mean NIAH recall: no mask {res['none']}, top-{res['k']} masked {res['top']}, "
        f"{res['k']} random masked {res['random']} +- {res['random_sd'] or 0} (sample SD over {seeds} seeds){where}"))


@heads_app.command("show")
def heads_show(file: Path = typer.Argument(..., help="score file: one JSON object, 'layer-head' -> per-trial scores"),
               top: int = typer.Option(20, help="how many heads to list"),
               threshold: float = typer.Option(0.1, help="retrieval-head threshold on the mean score"),
               plot: Optional[Path] = typer.Option(None, help="write a layer x head heatmap PNG"),
               model: Optional[str] = typer.Option(None, help="the scores' model: adds each head's layer type "
                                                   "(full / sliding attention; no weights loaded)"),
               as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Rank the heads of a retrieval-score file."""
    from attnkit.core.loading import load_config
    from attnkit.heads import scores as S
    from attnkit.kvcache.plan import check_shape

    data = S.load_scores(file)
    result = S.summary(data, top, threshold)
    arch = None
    if model is not None:
        arch = architecture(load_config(model))
        check_shape(data, arch.layers, arch.query_heads)
        result["by_layer_type"] = S.by_layer_type(data, arch, threshold)
        result["top_layer_types"] = [arch.layer_types[l] for l, _, _ in result["top"]]
        arch = arch if arch.hybrid else None  # one kind of layer: nothing to add to the table
    if plot:
        S.plot_heatmap(S.as_grid(data), plot, title=file.stem)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{file.name}: {result['above_threshold']} of {result['heads']} heads above "
                        f"{threshold} ({100 * result['fraction_above']:.1f}%)")
    for col in ("rank", "layer", "head", "score") + (("attention",) if arch else ()):
        table.add_column(col, justify="right")
    for i, (l, h, m) in enumerate(result["top"], 1):
        table.add_row(str(i), str(l), str(h), f"{m:.2f}", *((arch.layer_types[l],) if arch else ()))
    Console().print(table)
    for kind, row in (result["by_layer_type"] if arch else {}).items():
        console.print(f"{kind}-attention layers: {row['above_threshold']} of {row['heads']} heads above {threshold}",
                      highlight=False)




@heads_app.command("compare")
def heads_compare(a: Path = typer.Argument(..., help="first score file"),
                  b: Path = typer.Argument(..., help="second score file (same layers x heads)"),
                  top: int = typer.Option(20, help="size of the top-K sets compared"),
                  plot: Optional[Path] = typer.Option(None, help="side-by-side heatmaps, top-K heads ringed"),
                  as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Do two models use the same retrieval heads? Top-K overlap and score correlations (Wu et al.'s
    "universal and intrinsic" finding: a base model and its descendants share them)."""
    from attnkit.heads import compare as C
    from attnkit.heads.scores import load_scores

    sa, sb = load_scores(a), load_scores(b)
    result = C.compare_scores(sa, sb, top)
    if plot:
        C.plot_overlap(sa, sb, (a.stem, b.stem), result, plot)

    def render():
        console.print(f"{a.name} vs {b.name}: {result['heads']} heads; top-{result['top']} overlap "
                      f"{result['overlap']}/{result['top']}; Spearman {result['spearman']}, Pearson {result['pearson']}",
                      highlight=False)
        table = Table(title=f"in one top-{result['top']} only")
        table.add_column(a.name)
        table.add_column(b.name)
        rows = max(len(result["only_a"]), len(result["only_b"]))
        cell = lambda xs, i: f"{xs[i][0]}-{xs[i][1]}" if i < len(xs) else ""  # noqa: E731
        for i in range(rows):
            table.add_row(cell(result["only_a"], i), cell(result["only_b"], i))
        if rows:
            Console().print(table)
    emit(result, as_json, render)
