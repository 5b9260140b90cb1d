"""`attnkit kv ...`: the retrieval-head KV cache's commands (sinks, plan, compare)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.cli_common import (CHAT_TEMPLATE, DEVICE, DEVICE_MAP, DTYPE, HAYSTACK, MODEL_HELP, NEEDLES, TRIALS_OUT,
                                console, emit, floats, ints, quiet_transformers, registry_default)
from attnkit.core.family import architecture
from attnkit.errors import AttnkitError

kv_app = typer.Typer(no_args_is_help=True,
                     help="Retrieval-head KV cache: full cache for retrieval heads, sink + window for the rest.")
DEFAULT = {k: registry_default("kv-cache", k) for k in ("full", "sink", "window", "chunk", "prefill")}  # one default each
KV_CHOICE_HELP = "which KV heads keep the full cache: retrieval (top scores), random, none (all sink + window)"


@kv_app.command("sinks")
def kv_sinks(model: str = typer.Option("embedded", help=MODEL_HELP),
             haystack: Optional[Path] = HAYSTACK,
             length: int = typer.Option(1024, help="tokens per stretch of text"),
             batch: int = typer.Option(2, help="stretches of text averaged"),
             budget: int = typer.Option(DEFAULT["sink"] + DEFAULT["window"],
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
    from attnkit.kvcache import sinks as K

    quiet_transformers()
    if batch < 1 or max_sink < 0 or max_window < 1:
        raise AttnkitError("--batch and --max-window must be at least 1, --max-sink at least 0")
    mdl, tok = load_model(model, device=device, dtype=dtype)
    text = N.load_haystack(haystack, min_chars=batch * length * 8)
    profile = K.attention_profile(mdl, tok, text, length, max_sink, max_window, batch)
    split = K.best_split(profile, budget)
    default = {"sink": DEFAULT["sink"], "window": DEFAULT["window"]}
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
                                                                  "repeat to combine several (copy, echo, induction, "
                                                                  "gates); default: the scores shipped for a pulled model"),
            choose: str = typer.Option("retrieval", help=KV_CHOICE_HELP),
            spread: str = typer.Option("global", help="global: the best heads anywhere; layer: as many in every layer"),
            compensate: bool = typer.Option(False, help="window heads keep a compensation token (one more key each)"),
            full: float = typer.Option(DEFAULT["full"], help="fraction of KV heads that keep the full cache"),
            count: Optional[int] = typer.Option(None, help="number of full-cache KV heads (instead of --full)"),
            reduce: str = typer.Option("max", help="a KV head's score from its query heads: max or mean"),
            sink: int = typer.Option(DEFAULT["sink"]), window: int = typer.Option(DEFAULT["window"]),
            tokens: str = typer.Option("32768,131072", help="context lengths to size the cache for"),
            dtype_bytes: int = typer.Option(2, help="bytes per cached value (2 for bf16/fp16)"),
            seed: int = typer.Option(0, help="random choice: the draw"),
            as_json: bool = typer.Option(False, "--json")):
    """Which KV heads keep the full cache, and the cache's size against the full cache (no weights loaded)."""
    from attnkit.kvcache.config import native_kv_bytes
    from attnkit.core.loading import load_config
    from attnkit.kvcache.plan import budget_count, choosable, load_score_sets, plan

    token_list = ints(tokens, "--tokens")
    cfg = load_config(model)
    if not scores and choose == "retrieval":  # a pulled model's own scores, shipped with attnkit
        from attnkit.heads.scores import shipped_scores
        scores = [shipped_scores(cfg)] if shipped_scores(cfg) else None
    kv = plan(load_score_sets(scores or None), cfg, choose, full, count=count, sink=sink, window=window, prefill_chunk=1,
              reduce=reduce, seed=seed, spread=spread, compensate=compensate)
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
               sink: int = typer.Option(DEFAULT["sink"]), window: int = typer.Option(DEFAULT["window"]),
               chunk: int = typer.Option(DEFAULT["chunk"], help="prefill chunk (tokens)"),
               compensate: bool = typer.Option(False, help="window heads keep a compensation token (RazorAttention)"),
               prefill: str = typer.Option(DEFAULT["prefill"], help="full: every head reads the prompt, trimmed after each "
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
    from attnkit.kvcache.config import HeadKVConfig
    from attnkit.evals import niah as N
    from attnkit.kvcache.compare import compare_caches
    from attnkit.kvcache.plan import check_shape, model_shape

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
        from attnkit.kvcache.plan import RECIPE
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
