"""Compare two retrieval-score files of the same shape: the paper's "universal and intrinsic" finding is
that a base model and its continued-pretraining / chat / MoE-upcycled descendants use the same
retrieval heads. Reported: the overlap of the two top-K sets, the Pearson and Spearman correlations
of the mean scores over all heads, and the heads in one top-K but not the other."""

from __future__ import annotations

import numpy as np

from attnkit.errors import AttnkitError
from attnkit.heads.scores import as_grid, mean_scores, ranked


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as Spearman's coefficient needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.std() == 0 or b.std() == 0:
        return None  # undefined for a constant score file
    return float(np.corrcoef(a, b)[0, 1])


def compare_scores(a: dict, b: dict, top: int = 20) -> dict:
    """a, b: {(layer, head): [per-trial scores]} of the same model shape."""
    if set(a) != set(b):
        la, lb = as_grid(a).shape, as_grid(b).shape
        raise AttnkitError(f"the score files have different shapes ({la[0]} x {la[1]} and {lb[0]} x {lb[1]} "
                           "layers x heads): compare files of models with the same architecture")
    if top < 1:
        raise AttnkitError("--top must be at least 1")
    keys = sorted(a)
    ma, mb = mean_scores(a), mean_scores(b)
    va, vb = np.array([ma[k] for k in keys]), np.array([mb[k] for k in keys])
    top = min(top, len(keys))
    ta = [(l, h) for l, h, _ in ranked(a)[:top]]
    tb = [(l, h) for l, h, _ in ranked(b)[:top]]
    shared = set(ta) & set(tb)
    pearson = _pearson(va, vb)
    spearman = _pearson(_ranks(va), _ranks(vb))
    return {"heads": len(keys), "top": top, "overlap": len(shared), "overlap_fraction": round(len(shared) / top, 4),
            "pearson": None if pearson is None else round(pearson, 4),
            "spearman": None if spearman is None else round(spearman, 4),
            "only_a": [list(k) for k in ta if k not in shared], "only_b": [list(k) for k in tb if k not in shared],
            "top_a": [list(k) for k in ta], "top_b": [list(k) for k in tb]}


def plot_overlap(a: dict, b: dict, names: tuple[str, str], result: dict, path) -> None:
    """The two layer x head heatmaps side by side on one colour scale; each top-K head is ringed,
    white when it is in both top-K sets, red when only in this one."""
    from attnkit.evals.plots import pyplot

    plt = pyplot()
    ga, gb = as_grid(a).numpy(), as_grid(b).numpy()
    layers, heads = ga.shape
    vmax = max(ga.max(), gb.max(), 1e-9)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (2 + heads * 0.22) + 1, 1.5 + layers * 0.22), squeeze=False)
    shared = {tuple(k) for k in result["top_a"]} & {tuple(k) for k in result["top_b"]}
    for ax, grid, name, tops in zip(axes[0], (ga, gb), names, (result["top_a"], result["top_b"])):
        im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
        for l, h in tops:
            ax.scatter([h], [l], s=40, facecolors="none", edgecolors="white" if (l, h) in shared else "red", lw=1.2)
        ax.set_title(f"{name}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.suptitle(f"top-{result['top']} overlap {result['overlap']}/{result['top']}, Spearman {result['spearman']}, "
                 f"Pearson {result['pearson']} (rings: top-{result['top']}; white = in both)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="mean retrieval score")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
