"""Plots (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def niah_heatmaps(grids: dict[str, dict], path: str | Path, lengths: list[int], depths: list[float],
                  means: dict[str, float] | None = None) -> None:
    """One depth (y) x length (x) recall heatmap per named grid, side by side; with a single depth, grouped
    bars instead (a heatmap of one row says little). `means`: the per-grid mean over trials, as the
    tables print it (the mean of cells differs when some trials were skipped)."""
    import numpy as np
    plt = pyplot()
    if len(depths) == 1:
        return _niah_bars(grids, path, lengths, depths[0], means)
    panel = max(3.5, 0.45 * len(lengths) + 1.5)
    fig, axes = plt.subplots(1, len(grids), figsize=(panel * len(grids) + 1.5, 0.5 * len(depths) + 2.5),
                             squeeze=False)
    step = max(1, len(lengths) // 12)  # at most about 12 length labels, so that they never collide
    for n, (ax, (title, grid)) in enumerate(zip(axes[0], grids.items())):
        data = np.array([[grid.get((L, d), np.nan) for L in lengths] for d in depths])
        im = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(0, len(lengths), step), [f"{L:,}" for L in lengths[::step]], rotation=45, ha="right",
                      fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)")
        if n == 0:
            ax.set_ylabel("needle depth")
        mean = (means or {}).get(title)
        if mean is None:
            mean = np.nanmean(data) if np.isfinite(data).any() else float("nan")
        ax.set_title(f"{title}\nmean recall {mean:.1f}", fontsize=10)
        if len(lengths) * len(depths) <= 150:
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if np.isfinite(data[i, j]):
                        ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="ROUGE-1 recall")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _niah_bars(grids: dict[str, dict], path, lengths: list[int], depth: float, means) -> None:
    import numpy as np
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(lengths) * len(grids) ** 0.5 + 3), 4))
    width = 0.8 / len(grids)
    for n, (title, grid) in enumerate(grids.items()):
        values = [grid.get((L, depth), np.nan) for L in lengths]
        mean = (means or {}).get(title, np.nanmean(values))
        bars = ax.bar(np.arange(len(lengths)) + (n - (len(grids) - 1) / 2) * width, values, width,
                      label=f"{title} (mean {mean:.1f})")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(lengths)), [f"{L:,}" for L in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ROUGE-1 recall")
    ax.set_ylim(0, 110)
    ax.set_title(f"needle depth {depth:g}%", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def waveform_plot(bases: list[float], head_dim: int, distances, path: str | Path, envelope: bool = True,
                  search_range: tuple[int, int] | None = None) -> None:
    """f(m) per base: the raw wave faint, its running maximum (the ceiling a fact at that distance can
    reach) bold, the max over bases in black, and the searched distances shaded."""
    import numpy as np

    from ..core.rope import waveform
    plt = pyplot()
    distances = np.asarray(distances)
    waves = waveform(bases, head_dim, distances)
    window = max(1, len(distances) // 60)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, (b, w) in enumerate(zip(bases, waves)):
        c = colors[i % len(colors)]
        ax.plot(distances, w, lw=0.5, alpha=0.25, color=c)
        ax.plot(distances, _running_max(w, window), lw=1.6, color=c, label=f"base {b:g}")
    if envelope and len(bases) > 1:
        ax.plot(distances, _running_max(waves.max(0), window), color="black", lw=2.2, label="max over bases")
    if search_range:
        ax.axvspan(*search_range, color="grey", alpha=0.12, label=f"searched distances {search_range[0]}-{search_range[1]}")
    ax.set_xlabel("relative distance m (tokens)")
    ax.set_ylabel("attention upper bound f(m)")
    ax.set_title(f"RoPE attention waveform, head dim {head_dim} (bold: running max over {window} tokens)")
    ax.legend(fontsize=8, ncol=min(4, len(bases) + 2), loc="upper right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _running_max(x, window: int):
    import numpy as np
    if window <= 1:
        return x
    padded = np.pad(x, (window // 2, window - 1 - window // 2), mode="edge")
    return np.lib.stride_tricks.sliding_window_view(padded, window).max(-1)


def accuracy_by_position(summary: dict, path: str | Path, title: str = "") -> None:
    """Accuracy (y) against the gold pair's position (x), one line per system."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    positions = summary["positions"]
    for name, acc in summary["accuracy"].items():
        ax.plot(positions, [acc[str(p)] for p in positions], marker="o", label=f"{name} (mean {summary['mean'][name]})")
    ax.set_xlabel("position of the gold key-value pair")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or "key-value retrieval by gold position")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def ablation_curve(results: list[dict], path: str | Path, title: str = "") -> None:
    """NIAH recall (y) against the number of masked heads K (x): the top-K retrieval heads vs K random
    heads (mean and spread over seeds), with the unmasked recall as a dashed line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["k"] for r in results]
    ax.axhline(results[0]["none"], color="grey", linestyle="--", label="no mask")
    ax.plot(ks, [r["top"] for r in results], marker="o", color="tab:red", label="top-K retrieval heads masked")
    ax.errorbar(ks, [r["random"] for r in results], yerr=[r["random_sd"] or 0 for r in results], marker="s",
                color="tab:blue", capsize=3, label="K random heads masked (sample SD over seeds)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("masked heads K")
    ax.set_ylabel("mean NIAH recall (ROUGE-1)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or f"masking ablation ({results[0]['mode']} mode, {results[0]['phase']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def weights_plot(weights: list[list[float]], bases: list[float], tokens: list[str], path: str | Path) -> None:
    """Per-step combination weight of each base, as a stacked area."""
    import numpy as np
    plt = pyplot()
    w = np.array(weights).T
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(tokens)), 3.5))
    ax.stackplot(range(len(tokens)), w, labels=[f"{b:g}" for b in bases])
    ax.set_xticks(range(len(tokens)), tokens, rotation=70, fontsize=7)
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1), title="RoPE base")
    ax.set_xlabel("generated token")
    ax.set_title("Attention Buckets: each base's weight at every step")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def kv_tradeoff(results: list[dict], path: str | Path, title: str = "") -> None:
    """NIAH recall (y) against KV-cache memory as a fraction of the full cache (x), one line per way
    of choosing the full-cache heads; the full cache and all-window caches are single points."""
    plt = pyplot()
    results = [r for r in results if r.get("recall") is not None]  # skipped systems have no point
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ends = {r["system"]: r for r in results if r["system"] in ("all", "none")}
    lines = {}  # one line per head choice: each importance, then random
    for r in results:
        if r["system"] in ("retrieval", "random"):
            key = r.get("importance") or r["system"]
            lines.setdefault(key, []).append(r)
    palette = ["tab:green", "tab:blue", "tab:purple", "tab:olive", "tab:cyan", "tab:brown", "tab:pink"]
    for i, (key, rows) in enumerate(sorted(lines.items(), key=lambda kv: kv[0] == "random")):
        color, marker = ("tab:orange", "s") if key == "random" else (palette[i % len(palette)], "o")
        name = "random heads full (same budget)" if key == "random" else \
            ("retrieval heads full" if key == "retrieval" else f"heads by {key} full")
        points = sorted([(r["kv_ratio"], r["recall"]) for r in rows] +
                        [(ends["none"]["kv_ratio"], ends["none"]["recall"])] * ("none" in ends))
        if len(points) > 1:
            ax.plot(*zip(*points), color=color, marker=marker, label=name)
            for r in rows:
                ax.annotate(f"{r['full']:g}", (r["kv_ratio"], r["recall"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
    for e, (color, name) in {"all": ("black", "full cache"), "none": ("tab:red", "all heads sink + window")}.items():
        if e in ends:
            ax.scatter([ends[e]["kv_ratio"]], [ends[e]["recall"]], color=color, zorder=3, s=60, label=name)
    ax.set_xlabel("KV-cache memory (fraction of the full cache)")
    ax.set_ylabel("NIAH mean ROUGE-1 recall")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Retrieval-head KV cache: recall against memory", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def position_curve(curve: dict, path: str | Path, title: str = "") -> None:
    """Accuracy (y) against the gold document's position (x, 1-based), one line per system and
    document count, with Wilson 95% intervals as bars (`evals.mdqa.curve`'s output)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for system, by_n in curve.items():
        for n, c in by_n.items():
            pos = sorted(int(p) for p in c["accuracy"])
            acc = [c["accuracy"][str(p)] for p in pos]
            mean = [a["mean"] for a in acc]
            err = [[m - a["ci95"][0] for m, a in zip(mean, acc)], [a["ci95"][1] - m for m, a in zip(mean, acc)]]
            ax.errorbar([p + 1 for p in pos], mean, yerr=err, marker="o", capsize=3,
                        label=f"{system}, {n} documents (n={acc[0]['n']} per position)")
    ax.set_xlabel("position of the document with the answer")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "multi-document QA by gold position", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def memory_curve(points: list[dict], path: str | Path, title: str = "", y: str = "RULER NIAH average") -> None:
    """Score (y, with its 95% interval) against KV memory (x, fraction of the model's own cache), one
    marker per cache family: points are {family, kv_ratio, mean, low, high}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    families = list(dict.fromkeys(p["family"] for p in points))
    for i, fam in enumerate(families):
        mine = sorted((p for p in points if p["family"] == fam), key=lambda p: p["kv_ratio"])
        xs, ms = [p["kv_ratio"] for p in mine], [p["mean"] for p in mine]
        err = [[m - p["low"] for m, p in zip(ms, mine)], [p["high"] - m for m, p in zip(ms, mine)]]
        ax.errorbar(xs, ms, yerr=err, marker="os^vD<>"[i % 7], capsize=3, label=fam,
                    linestyle="-" if len(mine) > 1 else "none")
    ax.set_xlabel("KV memory (fraction of the model's own cache)")
    ax.set_ylabel(y)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
