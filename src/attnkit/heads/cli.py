"""`attnkit heads ...` (retrieval heads) and `attnkit kv ...` (the retrieval-head KV cache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.cli_common import (CHAT_TEMPLATE, DEVICE, DEVICE_MAP, DTYPE, HAYSTACK, MODEL_HELP, NEEDLES, TRIALS_OUT,
                                 console, emit, floats, ints, quiet_transformers)
from attnkit.core.family import architecture
from attnkit.core.kvconfig import KV_DEFAULTS
from attnkit.errors import AttnkitError

heads_app = typer.Typer(no_args_is_help=True, help="Retrieval heads (Wu et al. 2024).")
kv_app = typer.Typer(no_args_is_help=True,
                     help="Retrieval-head KV cache: full cache for retrieval heads, sink + window for the rest.")


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
    from attnkit.heads.kvplan import check_shape

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


KV_CHOICE_HELP = "which KV heads keep the full cache: retrieval (top scores), random, none (all sink + window)"


@kv_app.command("sinks")
def kv_sinks(model: str = typer.Option("embedded", help=MODEL_HELP),
             haystack: Optional[Path] = HAYSTACK,
             length: int = typer.Option(1024, help="tokens per stretch of text"),
             batch: int = typer.Option(2, help="stretches of text averaged"),
             budget: int = typer.Option(KV_DEFAULTS.sink + KV_DEFAULTS.window,
                                        help="tokens a window head keeps (sink + window) to split"),
             coverage: float = typer.Option(0.9, help="also report the smallest budget keeping this share of attention"),
             max_sink: int = typer.Option(64), max_window: int = typer.Option(512),
             out: Optional[Path] = typer.Option(None, help="write the profile and the choices as JSON"),
             plot: Optional[Path] = typer.Option(None, help="PNG of attention mass against sink and window size"),
             device: str = DEVICE, dtype: str = DTYPE,
             as_json: bool = typer.Option(False, "--json")):
    """Sink and window for the KV cache from where the model's attention goes (first keys vs recent keys)."""
    from dataclasses import asdict

    from attnkit.core.loading import load_model
    from attnkit.evals import niah as N
    from attnkit.heads import sinks as K

    quiet_transformers()
    if batch < 1 or max_sink < 0 or max_window < 1:
        raise AttnkitError("--batch and --max-window must be at least 1, --max-sink at least 0")
    mdl, tok = load_model(model, device=device, dtype=dtype)
    text = N.load_haystack(haystack, min_chars=batch * length * 8)
    profile = K.attention_profile(mdl, tok, text, length, max_sink, max_window, batch)
    split = K.best_split(profile, budget)
    default = {"sink": KV_DEFAULTS.sink, "window": KV_DEFAULTS.window}
    default["kept_mass"] = round(K.kept_mass(profile, **default), 4) if \
        default["sink"] <= max_sink and default["window"] <= max_window else None
    smallest = K.smallest_budget(profile, coverage)
    result = {"model": model, "budget": budget, "best": split, "default": default, "coverage": coverage,
              "smallest_budget": smallest, "profile": asdict(profile)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    if plot is not None:
        K.plot_profile(profile, plot, model, marks=[split])

    def render():
        sm = profile.sink_mass
        console.print(f"attention on the first 1 / 4 / 16 / {max_sink} keys: "
                      f"{sm[1]:.2f} / {sm[min(4, max_sink)]:.2f} / {sm[min(16, max_sink)]:.2f} / {sm[-1]:.2f}; "
                      f"on the last 128 keys: {profile.recent_mass[min(128, max_window)]:.2f}", highlight=False)
        console.print(f"budget {budget}: best --sink {split['sink']} --window {split['window']} keeps "
                      f"{split['kept_mass']:.3f} of the attention"
                      + (f" (the defaults {default['sink']} / {default['window']}: {default['kept_mass']:.3f})"
                         if default["kept_mass"] is not None and default["sink"] + default["window"] == budget else ""),
                      highlight=False)
        if smallest:
            console.print(f"smallest budget keeping {coverage:g}: {smallest['budget']} "
                          f"(--sink {smallest['sink']} --window {smallest['window']}, {smallest['kept_mass']:.3f})",
                          highlight=False)
        else:
            console.print(f"no budget up to {max_sink + max_window} keeps {coverage:g} of the attention", highlight=False)
    emit(result, as_json, render)


@kv_app.command("plan")
def kv_plan(model: str = typer.Option("embedded", help=MODEL_HELP),
            scores: Optional[List[Path]] = typer.Option(None, help="score file (attnkit's or the published ones); "
                                                                  "repeat to combine several (copy, echo, induction, gates)"),
            choose: str = typer.Option("retrieval", help=KV_CHOICE_HELP),
            spread: str = typer.Option("global", help="global: the best heads anywhere; layer: as many in every layer"),
            compensate: bool = typer.Option(False, help="window heads keep a compensation token (one more key each)"),
            full: float = typer.Option(0.25, help="fraction of KV heads that keep the full cache"),
            count: Optional[int] = typer.Option(None, help="number of full-cache KV heads (instead of --full)"),
            reduce: str = typer.Option("max", help="a KV head's score from its query heads: max or mean"),
            sink: int = typer.Option(KV_DEFAULTS.sink), window: int = typer.Option(KV_DEFAULTS.window),
            tokens: str = typer.Option("32768,131072", help="context lengths to size the cache for"),
            dtype_bytes: int = typer.Option(2, help="bytes per cached value (2 for bf16/fp16)"),
            seed: int = typer.Option(0, help="random choice: the draw"),
            as_json: bool = typer.Option(False, "--json")):
    """Which KV heads keep the full cache, and the cache's size against the full cache (no weights loaded)."""
    from attnkit.core.kvconfig import native_kv_bytes
    from attnkit.core.loading import load_config
    from attnkit.heads.kvplan import budget_count, choosable, plan_from_options

    token_list = ints(tokens, "--tokens")
    cfg = load_config(model)
    kv = plan_from_options(cfg, scores or None, choose, full, count, sink, window, 1, reduce, seed, spread, compensate)
    arch = architecture(cfg)
    pool = len(choosable(cfg))
    wanted = budget_count(full, count, pool) if choose in ("retrieval", "random") else len(kv.full)
    sizes = [{"tokens": t, "full_cache_bytes": native_kv_bytes(arch, t, 1, dtype_bytes),
              "bytes": kv.kv_bytes(arch, t, 1, dtype_bytes)} for t in token_list]
    for s in sizes:
        s["ratio"] = round(s["bytes"] / s["full_cache_bytes"], 4)
    sliding = [l for l, t in enumerate(arch.layer_types) if t == "sliding"]
    result = {"full_heads": sorted(kv.full), "kv_heads": arch.layers * arch.kv_heads, "choosable_kv_heads": pool,
              "requested": wanted, "unfilled": wanted - len(kv.full), "sliding_layers": sliding,
              "sink": sink, "window": window, "sizes": sizes}

    def render():
        console.print(f"{len(kv.full)} of {pool} choosable KV heads keep the full cache: "
                      + (", ".join(f"{l}-{h}" for l, h in sorted(kv.full)) or "none"), highlight=False)
        if sliding:
            console.print(f"{len(sliding)} of {arch.layers} layers are sliding-window layers (window "
                          f"{arch.windows[sliding[0]]}): they keep their own window in both caches, and only the "
                          f"{len(arch.full_layers)} full-attention layers' KV heads can be chosen", highlight=False)
        if result["unfilled"] > 0:
            console.print(f"the budget asks for {wanted} heads, but only {len(kv.full)} scored above 0: "
                          f"{result['unfilled']} place(s) left unused", highlight=False)
        table = Table(title=f"KV cache per sequence ({dtype_bytes}-byte values), sink {sink}, window {window}")
        for col in ("tokens", "model's own cache", "this cache", "ratio"):
            table.add_column(col, justify="right")
        for s in sizes:
            table.add_row(f"{s['tokens']:,}", _gib(s["full_cache_bytes"]), _gib(s["bytes"]), f"{s['ratio']:.3f}")
        Console().print(table)
    emit(result, as_json, render)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def named_score_files(specs: list[str], combos: list[str]) -> dict[str, list[dict]]:
    """`--scores [NAME=]PATH` (NAME defaults to the file's stem) and `--combine NAME+NAME` as
    {importance name: score dicts}."""
    from attnkit.heads.scores import load_scores

    files: dict[str, dict] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or Path(path).stem
        if name in files:
            raise AttnkitError(f"two score files are named {name!r}: name them with --scores NAME=PATH")
        files[name] = load_scores(path)
    sources = {name: [data] for name, data in files.items()}
    for combo in combos:
        parts = combo.split("+")
        missing = [p for p in parts if p not in files]
        if missing or len(parts) < 2:
            raise AttnkitError(f"--combine {combo!r}: give two or more of the --scores names ({', '.join(files)}) "
                               "joined by '+'")
        sources[combo] = [files[p] for p in parts]
    return sources


@kv_app.command("compare")
def kv_compare(model: str = typer.Option("embedded", help=MODEL_HELP),
               scores: List[str] = typer.Option(..., help="score file for this model, as PATH or NAME=PATH; repeat for "
                                                          "one row per importance (copy, echo, induction, gates ...)"),
               combine: Optional[List[str]] = typer.Option(None, help="also a row choosing by several files, e.g. "
                                                                      "copy+echo+induction (their --scores names)"),
               budgets: str = typer.Option("0,0.125,0.25,0.5", help="fractions of KV heads with the full cache"),
               sink: int = typer.Option(KV_DEFAULTS.sink), window: int = typer.Option(KV_DEFAULTS.window),
               chunk: int = typer.Option(KV_DEFAULTS.prefill_chunk, help="prefill chunk (tokens)"),
               compensate: bool = typer.Option(False, help="window heads keep a compensation token (RazorAttention)"),
               prefill: str = typer.Option("full", help="full: every head reads the prompt, trimmed after each "
                                                        "prefill chunk; window: window heads see only their window "
                                                        "in prefill too (less prefill memory)"),
               recipe: bool = typer.Option(True, help="also a row choosing by every score file combined with echo "
                                                      "and induction scores measured on the model (seconds)"),
               seeds: int = typer.Option(1, help="random-head draws per budget"),
               head_tokens: int = typer.Option(0, help="window heads also keep this many middle tokens each on "
                                                       "average (token budgets: by importance in the retrieval rows, "
                                                       "evenly in the random and all-window rows; full prefill)"),
               needles: Optional[Path] = NEEDLES,
               haystack: Optional[Path] = HAYSTACK,
               lengths: str = typer.Option("2048"), depths: str = typer.Option("0,25,50,75,100"),
               chat_template: Optional[bool] = CHAT_TEMPLATE,
               device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
               out: Optional[Path] = TRIALS_OUT,
               plot: Optional[Path] = typer.Option(None, help="recall against KV memory, one line per head choice"),
               as_json: bool = typer.Option(False, "--json")):
    """NIAH recall and KV memory: full cache vs heads chosen by each score vs random vs all-window heads."""
    from attnkit.core.loading import load_model
    from attnkit.core.kvconfig import HeadKVConfig
    from attnkit.evals import niah as N
    from attnkit.heads.kvcompare import compare_caches
    from attnkit.heads.kvplan import check_shape, model_shape

    quiet_transformers()
    budget_list = floats(budgets, "--budgets")
    if any(not 0 <= b <= 1 for b in budget_list):
        raise AttnkitError(f"--budgets must be fractions in [0, 1], got {budgets}")
    settings = HeadKVConfig(sink=sink, window=window, prefill_chunk=chunk, compensate=compensate, prefill=prefill)
    if seeds < 1:
        raise AttnkitError("--seeds must be at least 1")
    length_list, depth_list = ints(lengths, "--lengths"), floats(depths, "--depths")
    sources = named_score_files(scores, combine or [])
    needle_list, hay = N.load_needles(needles), N.load_haystack(haystack)
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    for sets in sources.values():
        for data in sets:
            check_shape(data, *model_shape(mdl.config)[:2])
    if recipe:
        from attnkit.heads.kvplan import RECIPE
        from attnkit.heads.patterns import pattern_scores
        given = {name: sets[0] for name, sets in sources.items() if len(sets) == 1 and name not in RECIPE}
        name = "+".join([*given, *RECIPE])
        if given and name not in sources:
            sources[name] = [*given.values(), *pattern_scores(mdl, tok)]
    results = compare_caches(mdl, tok, sources, budget_list, N.Grid(needle_list, hay, length_list, depth_list),
                             settings, seeds, out, quiet=as_json, chat_template=chat_template, head_tokens=head_tokens)
    if plot:
        from attnkit.evals.plots import kv_tradeoff
        kv_tradeoff(results, plot, title=f"{Path(model).name}: NIAH at {max(length_list)} tokens, "
                                         f"sink {sink}, window {window}")
    names = {"all": "full cache", "none": "all heads sink + window",
             "random": f"random heads full ({seeds} seed{'s' if seeds > 1 else ''})"}

    def render():
        table = Table(title=f"KV cache at {max(length_list)} tokens: NIAH mean ROUGE-1 recall and memory")
        for col in ("cache", "budget", "full-cache KV heads", "KV memory", "recall"):
            table.add_column(col, justify="left" if col == "cache" else "right")
        for r in results:
            spread = f" +- {r['recall_sd']} (SD over seeds)" if r.get("recall_sd") else ""
            recall = f"skipped ({r['skipped']})" if r.get("skipped") else f"{r['recall']}{spread}"
            name = names.get(r["system"]) or f"heads by {r['importance']} full"
            table.add_row(name, f"{r['full']:g}", str(r.get("full_heads", "")), f"{r['kv_ratio']:.3f}x", recall)
        Console().print(table)
    emit({"results": results}, as_json, render)


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
