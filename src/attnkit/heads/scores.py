"""Retrieval-score files in the authors' published format: one JSON object on one line,
"layer-head" -> list of per-trial scores. Heads are ranked by the mean of their list."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnkit.errors import AttnkitError

THRESHOLD = 0.1  # the paper's: a head with mean score above it is a retrieval head


def load_scores(path: str | Path) -> dict[tuple[int, int], list[float]]:
    p = Path(path)
    if not p.is_file():
        raise AttnkitError(f"score file not found: {p}")
    try:
        raw = json.loads(p.read_text())
        return {tuple(int(x) for x in k.split("-")): [float(v) for v in vals] for k, vals in raw.items()}
    except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as e:
        raise AttnkitError(f"{p}: not a retrieval-score file ({type(e).__name__}: {e})") from None


SHIPPED = Path(__file__).resolve().parent / "shipped"  # scores attnkit measured on each pullable model


def shipped_scores(model_config) -> Path | None:
    """The copy-score file shipped for the pulled registry model `model_config` was loaded from (how each
    was made: `shipped/sources.json`), or None for any other model. Matched by the registry name the
    pull recorded in the model's folder, and checked against the config's shape when loaded."""
    from attnkit.core.models import source_of

    folder = getattr(model_config, "_name_or_path", None) or getattr(model_config, "name_or_path", None)
    name = (source_of(Path(folder)) or {}).get("registry_name") if folder else None
    path = SHIPPED / name / "copy.json" if name else None
    return path if path is not None and path.is_file() else None


def save_scores(scores: dict[tuple[int, int], list[float]], path: str | Path) -> None:
    Path(path).write_text(json.dumps({f"{l}-{h}": v for (l, h), v in sorted(scores.items())}))


def mean_scores(scores: dict[tuple[int, int], list[float]]) -> dict[tuple[int, int], float]:
    return {k: (sum(v) / len(v) if v else 0.0) for k, v in scores.items()}


def ranked(scores: dict[tuple[int, int], list[float]]) -> list[tuple[int, int, float]]:
    """(layer, head, mean) from the highest mean down; ties keep layer-head order."""
    means = mean_scores(scores)
    return sorted(((l, h, m) for (l, h), m in means.items()), key=lambda t: (-t[2], t[0], t[1]))


def summary(scores, top: int = 20, threshold: float = THRESHOLD) -> dict:
    rank = ranked(scores)
    above = sum(1 for *_, m in rank if m > threshold)
    return {"heads": len(rank), "above_threshold": above, "threshold": threshold,
            "fraction_above": round(above / len(rank), 4) if rank else 0.0,
            "top": [[l, h, round(m, 2)] for l, h, m in rank[:top]]}


def by_layer_type(scores, arch, threshold: float = THRESHOLD) -> dict[str, dict]:
    """Where the retrieval heads live in a hybrid model: per layer type ("full" / "sliding"), how many
    heads it has and how many score above `threshold`."""
    means = mean_scores(scores)
    out: dict[str, dict] = {}
    for (l, _), m in means.items():
        row = out.setdefault(arch.layer_types[l], {"heads": 0, "above_threshold": 0})
        row["heads"] += 1
        row["above_threshold"] += int(m > threshold)
    return out


def as_grid(scores) -> torch.Tensor:
    """Mean scores as a [layers, heads] tensor."""
    means = mean_scores(scores)
    layers = 1 + max(l for l, _ in means)
    heads = 1 + max(h for _, h in means)
    grid = torch.zeros(layers, heads)
    for (l, h), m in means.items():
        grid[l, h] = m
    return grid


def plot_heatmap(grid: torch.Tensor, path: str | Path, title: str = "retrieval score",
                 threshold: float = THRESHOLD) -> None:
    """Layer x head heatmap of mean scores; every head labelled, heads above `threshold` ringed."""
    from attnkit.evals.plots import pyplot

    plt = pyplot()
    layers, heads = grid.shape
    fig, ax = plt.subplots(figsize=(2.5 + heads * 0.28, 1.5 + layers * 0.28))
    im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto", vmin=0)
    above = (grid > threshold).nonzero().tolist()
    if above:
        ax.scatter([h for _, h in above], [l for l, _ in above], s=60, facecolors="none", edgecolors="red", lw=1.2)
    title = f"{title}\nringed: {len(above)} of {layers * heads} heads above {threshold:g} (red line on the scale)"
    step = 1 if heads <= 48 else 2
    ax.set_xticks(range(0, heads, step), [str(h) for h in range(0, heads, step)], fontsize=6 if heads > 24 else 8)
    ax.set_yticks(range(layers), [str(l) for l in range(layers)], fontsize=6 if layers > 24 else 8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(im, ax=ax, label="mean retrieval score")
    bar.ax.axhline(threshold, color="red", lw=1.5)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
