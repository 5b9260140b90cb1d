"""`attnkit demo`: every technique once, on the embedded model, in under three minutes on a 2-core CPU.

1. needle-in-a-haystack recall over lengths x depths, for the built-in needles (reworded questions,
   which the embedded model answers poorly) and passkey needles (which it answers well);
2. retrieval heads: detection on the passkey needles, the top heads, and the masking ablation for
   K = 1, 2, 4 and the number of retrieval heads (top-K vs K random heads);
3. the retrieval-head KV cache: full cache for the top quarter of heads, sink + window for the rest,
   against random heads at the same memory and all heads windowed;
4. Attention Buckets: the searched bases' waveforms, and passkey recall far from the question in a
   2,000-token prompt, one RoPE base vs the buckets.
With `--technique NAME --set K=V` (any registered technique, yours included) a fifth step runs it
beside the model as it is on passkey NIAH.
Every step writes its rows or plots under the output folder; a rerun resumes finished trials.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .core.family import architecture
from .core.loading import head_dim as model_head_dim
from .core.loading import load_model, model_info, rope_base
from .evals import niah as N

say = Console().print


def run(out_dir: Path, choice=None, record=None) -> None:
    """The four steps, then `choice` (a `core.registry.Choice` and its record built from the embedded
    model's config, already validated) when given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = model_info("embedded")
    say(f"[bold]embedded model[/bold]: {facts['parameters']:,} parameters, {facts['layers']} layers x "
        f"{facts['query_heads']} heads, context {facts['max_positions']}")
    say("about 5 minutes on 2 CPU cores (faster on a rerun: finished trials are read back from the folder)")
    model, tok = load_model("embedded", device="cpu")
    needle_sets = {"built-in needles": N.load_needles(), "passkey needles": N.passkey_needles()}
    haystack = N.load_haystack()
    niah_step(model, tok, needle_sets, haystack, out_dir)
    heads_step(model, tok, needle_sets["passkey needles"], haystack, out_dir)
    kv_step(model, tok, needle_sets["passkey needles"], haystack, out_dir)
    buckets_step(model, tok, needle_sets, haystack, out_dir)
    if choice is not None and choice.name != "plain":
        technique_step(model, tok, choice, record, needle_sets["passkey needles"], haystack, out_dir)


def technique_step(model, tok, choice, record, needles, haystack, out_dir: Path) -> None:
    """The chosen technique against the model as it is, on the same passkey NIAH prompts."""
    from .evals.systems import System, technique_systems

    record = choice.finish(record, model, tok)
    said = getattr(record, "describe", dict)()
    say(f"\n[bold]5. Your technique[/bold]: {choice.name} ({', '.join(f'{k} {v}' for k, v in said.items()) or 'defaults'})")
    systems = [System("model as it is")] + [s for s in technique_systems(choice, record, model, "passkey NIAH")
                                            if s.technique is not None]
    lengths = [512, 1024, 2048]
    summaries = N.compare_systems(model, tok, N.Grid(needles, haystack, lengths, [10, 50, 90]), systems,
                                  out_dir / "technique.jsonl")
    table = Table(title="passkey needles, depths 10/50/90%: mean ROUGE-1 recall")
    table.add_column("system")
    for L in lengths:
        table.add_column(str(L), justify="right")
    table.add_column("mean", justify="right")
    for name, summary in summaries.items():
        cells = N.grid_map(summary["grid"])  # {(length, depth): recall}
        per_length = [[r for (L, _), r in cells.items() if L == length] for length in lengths]
        table.add_row(name, *[f"{sum(v) / len(v):.1f}" if v else "-" for v in per_length],
                      f"{summary['mean_recall']:.1f}")
    say(table)


def niah_step(model, tok, needle_sets: dict, haystack, out_dir: Path) -> None:
    from .evals.plots import niah_heatmaps

    say("\n[bold]1. Needle in a haystack[/bold]: built-in needles (the question paraphrases the needle) and "
        "passkey needles (the question repeats it; random answer)")
    lengths, depths = [256, 512, 1024, 2048], [0, 25, 50, 75, 100]
    grids, means = {}, {}
    table = Table(title="mean ROUGE-1 recall over depths 0-100%")
    table.add_column("needles")
    for L in lengths:
        table.add_column(str(L), justify="right")
    table.add_column("mean", justify="right")
    for i, (name, needles) in enumerate(needle_sets.items()):
        rows = N.evaluate_niah(model, tok, needles, haystack, lengths, depths, out=out_dir / f"niah{i}.jsonl", label=name)
        summary = N.summarize_niah(rows)
        grids[name] = N.grid_map(summary["grid"])
        means[name] = summary["mean_recall"]
        by_length = [[v for (L, _), v in grids[name].items() if L == length] for length in lengths]
        table.add_row(name, *(f"{sum(v) / len(v):.0f}" for v in by_length), f"{summary['mean_recall']:.1f}")
    say(table)
    niah_heatmaps(grids, out_dir / "niah.png", lengths, depths, means=means)
    say(f"heatmaps: {out_dir / 'niah.png'}")


def heads_step(model, tok, needles, haystack, out_dir: Path) -> None:
    """Detection and ablation on the passkey needles: heads can only be scored on trials the model
    answers (recall > 50), and the embedded model answers passkey questions, not paraphrased ones."""
    from .evals.plots import ablation_curve, niah_heatmaps
    from .heads import ablate as A
    from .heads import detect as D
    from .heads import scores as S

    say("\n[bold]2. Retrieval heads[/bold] (Wu et al. 2024), on the passkey needles")
    # the clean prompt: the demo shows the finding on its own haystack, not scores comparable with the
    # published files (that is what `heads detect`'s default, the authors' prompt, is for)
    per_head, rows = D.detect(model, tok, needles, [haystack] * len(needles), [384, 768, 1536], [10, 50, 90],
                              out=out_dir / "detect_trials.jsonl", prompt="clean")
    S.save_scores(per_head, out_dir / "head_scores.json")
    counted = D.counted(rows)
    result = S.summary(per_head, top=max(8, S.summary(per_head)["above_threshold"]))
    table = Table(title=f"top heads ({counted} of {len(rows)} trials counted; {result['above_threshold']} of "
                        f"{result['heads']} heads above {S.THRESHOLD})")
    for col in ("layer", "head", "retrieval score"):
        table.add_column(col, justify="right")
    for layer, head, score in result["top"]:
        table.add_row(str(layer), str(head), f"{score:.2f}")
    say(table)
    S.plot_heatmap(S.as_grid(per_head), out_dir / "head_scores.png", title="embedded model: retrieval score")
    n_heads = result["above_threshold"]
    if counted == 0 or n_heads == 0:
        say("no head passes the threshold (the model retrieved too few needles to score heads): ablation skipped")
        return
    # K = the number of retrieval heads, as the issue asks, and smaller K: in a 64-head model even
    # random heads matter once K is a sizeable share of all heads.
    k_list = sorted({k for k in (1, 2, 4) if k < n_heads} | {n_heads})
    lengths, depths = [512, 1024], [50]
    runs = A.ablate_sweep(model, tok, per_head, k_list, N.Grid(needles, haystack, lengths, depths), seeds=3,
                          out=out_dir / "ablate_trials.jsonl")
    niah_heatmaps(A.condition_grids(runs[-1]), out_dir / "ablation.png", lengths, depths,
                  means={"no mask": runs[-1]["none"], f"top-{runs[-1]['k']} masked": runs[-1]["top"],
                         f"{runs[-1]['k']} random masked": runs[-1]["random"]})
    ablation_curve(runs, out_dir / "ablation_curve.png", title="embedded model, passkey needles: masking ablation")
    table = Table(title=f"mean NIAH recall, heads masked in decoding (no mask: {runs[0]['none']})")
    for col in ("K", "top-K retrieval heads masked", "K random heads masked (3 seeds)"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(str(r["k"]), f"{r['top']:.1f}", f"{r['random']:.1f} +- {r['random_sd'] or 0:.1f}")
    say(table)
    say(f"plots: {out_dir / 'ablation_curve.png'} (recall against K), {out_dir / 'ablation.png'} (K = {n_heads})")


def kv_step(model, tok, needles, haystack, out_dir: Path) -> None:
    """The detected heads turned into memory savings: 2,048-token passkey NIAH at a quarter of the heads."""
    from .evals.plots import kv_tradeoff
    from .heads import scores as S
    from .core.kvconfig import HeadKVConfig
    from .heads.kvcompare import compare_caches

    scores_file = out_dir / "head_scores.json"
    if not scores_file.exists():
        say("no retrieval-score file: KV cache step skipped")
        return
    say("\n[bold]3. Retrieval-head KV cache[/bold]: 25% of KV heads keep the whole context, the rest keep "
        "16 sink + 128 recent tokens")
    settings = HeadKVConfig(sink=16, window=128, prefill_chunk=512)
    results = compare_caches(model, tok, S.load_scores(scores_file), [0.25], N.Grid(needles, haystack, [2048], [10, 50, 90]),
                      settings, seeds=1, out=out_dir / "kv_trials.jsonl")
    names = {"all": "full cache", "none": "every head sink + window", "retrieval": "retrieval heads full",
             "random": "random heads full"}
    table = Table(title="passkey needles in 2,048-token prompts: recall and KV memory")
    for col in ("KV cache", "KV memory", "mean recall"):
        table.add_column(col, justify="left" if col == "KV cache" else "right")
    for r in results:
        table.add_row(names[r["system"]], f"{r['kv_ratio']:.2f}x", f"{r['recall']:.1f}")
    say(table)
    kv_tradeoff(results, out_dir / "kv_cache.png", title="embedded model, passkey NIAH at 2,048 tokens")
    say(f"plot: {out_dir / 'kv_cache.png'}")


def buckets_step(model, tok, needle_sets: dict, haystack, out_dir: Path) -> None:
    import numpy as np

    from .buckets import BucketsConfig, search_bases, single_vs_buckets
    from .buckets.search import default_distances
    from .evals.plots import waveform_plot

    say("\n[bold]4. Attention Buckets[/bold] (Chen et al. 2024)")
    cfg = model.config
    head_dim = model_head_dim(cfg)
    m0, m1 = default_distances(architecture(cfg).max_positions)
    base = rope_base(cfg)
    found = search_bases([base], 4, lo=base, hi=3 * base, step=base / 20, distances=(m0, m1), head_dim=head_dim)
    bases = found.bases
    waveform_plot(bases, head_dim, np.arange(0, architecture(cfg).max_positions), out_dir / "waveform.png",
                  search_range=(m0, m1))
    say(f"bases from the search (head dim {head_dim}, m {m0}..{m1}): {', '.join(f'{b:g}' for b in bases)}; "
        f"waveforms: {out_dir / 'waveform.png'}")
    # Far from the question the single base's attention is weakest: passkey needles at the start of
    # a 2,000-token prompt, where the paper's "shortest stave" should show.
    needles, lengths, depths = needle_sets["passkey needles"], [2000], [0, 10]
    table = Table(title="passkey needles in a 2,000-token prompt: mean ROUGE-1 recall")
    for col in ("RoPE bases", *(f"depth {d}%" for d in depths)):
        table.add_column(col, justify="left" if col.startswith("RoPE") else "right")
    systems = single_vs_buckets(model, BucketsConfig(bases))
    summaries = N.compare_systems(model, tok, N.Grid(needles, haystack, lengths, depths), systems,
                                  out_dir / "buckets_niah.jsonl")
    for name, summary in summaries.items():
        cells = N.grid_map(summary["grid"])
        table.add_row(name, *(f"{cells[(2000, d)]:.0f}" for d in depths))
    say(table)
