"""`attnkit buckets ...`: the waveform, the base search, generation with buckets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnkit.cli_common import (DEVICE, DEVICE_MAP, DTYPE, MODEL_HELP, console, emit, floats,
                                quiet_transformers, span)
from attnkit.errors import AttnkitError


def resolve_bases(model: str, bases: str | None, search: bool) -> list[float]:
    """--bases / --search as the buckets' bases (`buckets.search.choose_bases`), the search's message printed."""
    from attnkit.buckets.search import choose_bases
    from attnkit.core.loading import load_config

    chosen, message = choose_bases(load_config(model) if search else None,
                                   floats(bases, "--bases") if bases else None, search)
    if message:
        console.print(f"[yellow]{message}[/yellow]")
    return chosen


buckets_app = typer.Typer(no_args_is_help=True, help="Attention Buckets (Chen et al. 2024): RoPE bases in parallel.")


def _search(model: Optional[str], seeds: Optional[str], n: int, grid: Optional[str], distances: Optional[str],
            head_dim: int, tolerance: Optional[int], method: str):
    from attnkit.buckets import search_bases
    from attnkit.buckets.search import REFERENCE_TOLERANCE, search_for_model
    from attnkit.core.loading import load_config

    lo, hi, step = span(grid, "--grid", 3) if grid is not None else (None, None, None)
    seed_list = floats(seeds, "--seeds") if seeds is not None else None
    span_m = tuple(map(int, span(distances, "--distances", 2))) if distances is not None else None
    if model:
        result, head_dim, (m0, m1) = search_for_model(load_config(model), seed_list, n,
                                                     (lo, hi, step) if grid is not None else None, span_m,
                                                     tolerance, method)
    else:
        m0, m1 = span_m or (1000, 4090)
        lo, hi, step = (lo, hi, step) if grid is not None else (10000.0, 30000.0, 500.0)
        result = search_bases(seed_list or [10000.0], n, lo, hi, step, (m0, m1), head_dim,
                              REFERENCE_TOLERANCE if tolerance is None else tolerance, method)
    if result.message:
        console.print(f"[yellow]{result.message}[/yellow]")
    return result, head_dim, (int(m0), int(m1))


@buckets_app.command("waveform")
def waveform_cmd(bases: str = typer.Option("10000", help="RoPE bases, comma-separated"),
                 head_dim: int = typer.Option(128, help="attention head dimension"),
                 range_: str = typer.Option("0:4096", "--range", help="distances a:b (b excluded)"),
                 model: Optional[str] = typer.Option(None, help="take head dim and RoPE scaling from this model"),
                 plot: Optional[Path] = typer.Option(None, help="write the waveforms to this PNG"),
                 as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """The attention upper bound f(m) for each base: where its troughs and peaks lie."""
    import numpy as np

    from attnkit.buckets.search import dominant_peaks, dominant_troughs
    from attnkit.core.rope import waveform

    base_list = floats(bases, "--bases")
    a, b = (int(x) for x in span(range_, "--range", 2))
    if b - a < 3 or not base_list:
        raise AttnkitError("--range needs at least 3 distances and --bases at least one base")
    m = np.arange(a, b)
    inv = None
    if model:
        from attnkit.core.loading import load_config
        from attnkit.core.rope import inv_freq_for
        cfg = load_config(model)
        inv = np.stack([inv_freq_for(cfg, x).double().numpy() for x in base_list])
        head_dim = 2 * inv.shape[1]
    waves = waveform(base_list, head_dim, m, inv_freq=inv)
    result = {"head_dim": head_dim, "range": [a, b], "bases": [
        {"base": x, "min": round(float(w.min()), 4), "argmin": int(m[w.argmin()]),
         "peaks": [int(m[i]) for i in dominant_peaks(w)], "troughs": [int(m[i]) for i in dominant_troughs(w)]}
        for x, w in zip(base_list, waves)]}
    result["envelope_min"] = round(float(waves.max(0).min()), 4)
    if plot:
        from attnkit.evals.plots import waveform_plot
        waveform_plot(base_list, head_dim, m, plot)

    def render():
        table = Table(title=f"RoPE waveform, head dim {head_dim}, m in [{a}, {b})")
        for col in ("base", "min f", "at m", "dominant peaks", "dominant troughs"):
            table.add_column(col)
        for r in result["bases"]:
            table.add_row(f"{r['base']:g}", f"{r['min']:.3f}", str(r["argmin"]),
                          " ".join(map(str, r["peaks"])), " ".join(map(str, r["troughs"])))
        Console().print(table)
        Console().print(f"lowest point of the envelope over all bases: {result['envelope_min']:.3f}")
        if plot:
            Console().print(f"plot: {plot}")
    emit(result, as_json, render)


@buckets_app.command("search-bases")
def search_bases_cmd(model: Optional[str] = typer.Option(None, help="seed with this model's base and head dim"),
                     seeds: Optional[str] = typer.Option(None, help="seed bases (default: the model's, else 10000); '' for none"),
                     n: int = typer.Option(6, help="number of bases"),
                     grid: Optional[str] = typer.Option(None, help="candidate bases lo:hi:step; default: the model's base to 3x it, "
                                                                     "base/20 apart (10000:30000:500 without --model)"),
                     distances: Optional[str] = typer.Option(None, help="distance range a:b (default 1000:4090)"),
                     head_dim: int = typer.Option(128, help="head dimension (taken from --model when given)"),
                     tolerance: Optional[int] = typer.Option(None, help="max offset between a peak and a trough "
                                                             "that match (default 3; with --model, scaled with the "
                                                             "distance range where 3 pairs no base with the seed)"),
                     method: str = typer.Option("reference", help="reference (authors' search) or paper"),
                     plot: Optional[Path] = typer.Option(None, help="plot the chosen bases' waveforms"),
                     as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Greedy search for RoPE bases whose waveform troughs and peaks interleave."""
    import numpy as np

    result, head_dim, (m0, m1) = _search(model, seeds, n, grid, distances, head_dim, tolerance, method)
    if plot:
        from attnkit.evals.plots import waveform_plot
        waveform_plot(result.bases, head_dim, np.arange(0, m1 + 1), plot, search_range=(m0, m1))
    out = {"bases": result.bases, "method": result.method, "head_dim": head_dim, "distances": [m0, m1],
           "steps": result.steps, "message": result.message}
    emit(out, as_json, lambda: Console().print(
        f"bases ({result.method}, head dim {head_dim}, m {m0}..{m1}): " + ", ".join(f"{b:g}" for b in result.bases)))


@buckets_app.command("generate")
def generate_cmd(model: str = typer.Option("embedded", help=MODEL_HELP),
                 prompt: str = typer.Option(..., help="the prompt"),
                 bases: Optional[str] = typer.Option(None, help="RoPE bases, comma-separated"),
                 search: bool = typer.Option(False, help="run the base search first (seeded with the model's base)"),
                 combine: str = typer.Option("paper", help="paper (probability-weighted) or reference (authors' logits)"),
                 max_new_tokens: int = typer.Option(50), temperature: float = typer.Option(0.0),
                 top_p: float = typer.Option(1.0), seed: Optional[int] = typer.Option(None),
                 stop: Optional[str] = typer.Option(None, help="stop string, e.g. '\\n'"),
                 device: str = DEVICE, dtype: str = DTYPE, device_map: Optional[str] = DEVICE_MAP,
                 plot_weights: Optional[Path] = typer.Option(None, help="plot each base's weight per step"),
                 as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Generate with several RoPE bases combined at every step."""
    import numpy as np

    from attnkit.buckets import BucketedModel, BucketsConfig
    from attnkit.core.generate import Sampling
    from attnkit.core.loading import load_model

    quiet_transformers()
    base_list = resolve_bases(model, bases, search)
    cfg = BucketsConfig(base_list, combine)
    mdl, tok = load_model(model, device=device, dtype=dtype, device_map=device_map)
    stops = (stop.encode().decode("unicode_escape"),) if stop else ()
    sampling = Sampling(temperature, top_p, seed)
    gen = BucketedModel(mdl, tok, cfg).generate(prompt, max_new_tokens, sampling, stops)[0]
    if plot_weights:
        from attnkit.evals.plots import weights_plot
        weights_plot(gen.weights, base_list, [tok.decode([t]) for t in gen.token_ids], plot_weights)
    mean_w = np.array(gen.weights).mean(0).round(4).tolist() if gen.weights else []
    emit({"text": gen.text, "bases": base_list, "combine": combine, "mean_weights": mean_w,
          "weights": gen.weights}, as_json,
         lambda: (Console().print(gen.text),
                  console.print("mean weight per base: " + ", ".join(f"{b:g}={w:.2f}" for b, w in zip(base_list, mean_w)))))


