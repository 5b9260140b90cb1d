"""Plots (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def niah_heatmaps(grids: dict[str, dict], path: str | Path, lengths: list[int], depths: list[float]) -> None:
    """One depth (y) x length (x) recall heatmap per named grid, side by side."""
    import numpy as np
    plt = _plt()
    panel = max(3.5, 0.9 * len(lengths))
    fig, axes = plt.subplots(1, len(grids), figsize=(panel * len(grids) + 1.5, 0.5 * len(depths) + 2.5),
                             squeeze=False)
    for n, (ax, (title, grid)) in enumerate(zip(axes[0], grids.items())):
        data = np.array([[grid.get((L, d), np.nan) for L in lengths] for d in depths])
        im = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if n == 0:
            ax.set_ylabel("needle depth")
        mean = np.nanmean(data) if np.isfinite(data).any() else float("nan")
        ax.set_title(f"{title}\nmean recall {mean:.1f}", fontsize=10)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if np.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="ROUGE-1 recall")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
