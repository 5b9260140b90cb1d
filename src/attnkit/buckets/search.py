"""Choosing RoPE bases whose attention waveforms interleave (Attention Buckets, section 3).

`method="reference"` (default) reproduces the authors' greedy search step by step, including its
quirks: dominant peaks/troughs found by following an envelope level, the running peak/trough lists
filtered after every addition. `method="paper"` is our cleaner reading of the paper's goal, "fortify
the shortest stave": add the base that most raises the lowest point, over the distance range, of the
upper envelope max_b f_b(m) of the chosen bases (ties: the higher mean envelope, then the smaller base).
"""

from __future__ import annotations

from typing import Literal

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..errors import AttnkitError

from ..core.rope import waveform

LEVEL_TOL = 0.001
PEAK_GAP, TROUGH_GAP = 50, 60
PEAK_WINDOW = 500
MAX_EXTREMA = 6


@dataclass
class SearchResult:
    bases: list[float]
    message: str = ""  # set when the search stopped early
    steps: list[dict] = field(default_factory=list)  # base added, cover, distance
    method: str = "reference"  # the search that chose the bases


def _local(f: np.ndarray, sign: int) -> np.ndarray:
    g = sign * f
    return np.flatnonzero((g[1:-1] > g[:-2]) & (g[1:-1] > g[2:])) + 1


def dominant_peaks(f: np.ndarray) -> list[int]:
    """Indices of the envelope's dominant peaks, left to right (see module docstring)."""
    maxima = _local(f, 1)
    if len(maxima) == 0:
        return []
    level, kept = f[maxima].max(), []
    for n, i in enumerate(maxima):
        if abs(f[i] - level) > LEVEL_TOL:
            continue
        if not kept or i - kept[-1] > PEAK_GAP:
            kept.append(int(i))
            if len(kept) == MAX_EXTREMA:
                break
        nxt = maxima[n + 1] if n + 1 < len(maxima) else len(f)
        start = min(i + PEAK_GAP, nxt)
        window = f[start:start + PEAK_WINDOW]
        if len(window) == 0:
            break
        level = window.max()
    return kept


def dominant_troughs(f: np.ndarray) -> list[int]:
    """Indices of the envelope's dominant troughs, found right to left, returned in increasing order."""
    minima = _local(f, -1)
    if len(minima) == 0:
        return []
    level, kept = f[minima].min(), []
    for n in range(len(minima) - 1, -1, -1):
        i = minima[n]
        if abs(f[i] - level) > LEVEL_TOL:
            continue
        if not kept or kept[-1] - i > TROUGH_GAP:
            kept.append(int(i))
            if len(kept) == MAX_EXTREMA:
                break
        prev = minima[n - 1] if n > 0 else 0
        bound = min(i - PEAK_GAP, prev)
        if bound <= 0:
            break
        level = f[:bound].min()
    return sorted(kept)


def _cover(peaks, troughs, chosen_peaks, chosen_troughs, tol) -> tuple[int, float]:
    """(pairs at most `tol` apart, mean squared offset) between the candidate's peaks and the chosen
    troughs plus the chosen peaks and the candidate's troughs."""
    offsets = [p - t for p in peaks for t in chosen_troughs if abs(p - t) <= tol]
    offsets += [p - t for p in chosen_peaks for t in troughs if abs(p - t) <= tol]
    if not offsets:
        return 0, float("inf")
    return len(offsets), sum(o * o for o in offsets) / len(offsets)


def _merge(peaks: list[int], troughs: list[int], new_peaks, new_troughs) -> tuple[list[int], list[int]]:
    peaks, troughs = sorted(peaks + list(new_peaks)), sorted(troughs + list(new_troughs))
    both = set(peaks) & set(troughs)
    return [p for p in peaks if p not in both], [t for t in troughs if t not in both]


@lru_cache(maxsize=64)
def _extrema_table(lo: int, hi: int, step: int, m0: int, m1: int, head_dim: int):
    bases = np.arange(lo, hi + 1, step, dtype=np.float64)
    waves = waveform(bases, head_dim, np.arange(m0, m1 + 1))
    return bases, waves, [(dominant_peaks(w), dominant_troughs(w)) for w in waves]


def search_bases(seeds=(10000.0,), n: int = 6, lo: float = 10000, hi: float = 30000, step: float = 500,
                 distances: tuple[int, int] = (1000, 4090), head_dim: int = 128, tolerance: int = 3,
                 method: Literal["reference", "paper"] = "reference") -> SearchResult:
    """Greedy search for `n` RoPE bases in lo..hi (step) whose waveforms interleave; returns them sorted."""
    if method not in ("reference", "paper"):
        raise AttnkitError(f"unknown method {method!r}: use 'reference' or 'paper'")
    if n < 1 or hi < lo or step <= 0:
        raise AttnkitError("the base search needs n >= 1, hi >= lo and step > 0")
    if distances[1] - distances[0] < 3:
        raise AttnkitError("the distance range needs at least 3 positions")
    if method == "paper":
        return _search_paper(list(seeds), n, lo, hi, step, distances, head_dim)
    grid, _, extrema = _extrema_table(int(lo), int(hi), int(step), *distances, head_dim)
    by_base = dict(zip(grid.tolist(), extrema))

    def extrema_of(b: float):
        if b not in by_base:
            w = waveform([b], head_dim, np.arange(distances[0], distances[1] + 1))[0]
            by_base[b] = (dominant_peaks(w), dominant_troughs(w))
        return by_base[b]

    chosen: list[float] = []
    steps: list[dict] = []
    peaks: list[int] = []
    troughs: list[int] = []
    seeds = [float(s) for s in seeds]
    if not seeds:  # best pair first
        best = None
        for a in grid.tolist():
            pa, ta = extrema_of(a)
            for b in grid[grid > a].tolist():
                pb, tb = extrema_of(b)
                cover, dist = _cover(pb, tb, pa, ta, tolerance)
                if cover and (best is None or (cover, -dist) > (best[0], -best[1])):
                    best = (cover, dist, a, b)
        if best is None:
            return SearchResult([], "no pair of bases in the range has interleaving waveforms")
        seeds = [best[2], best[3]]
        steps.append({"base": best[3], "cover": best[0], "distance": best[1]})
    for s in seeds[:n]:
        chosen.append(s)
        peaks, troughs = _merge(peaks, troughs, *extrema_of(s))
    while len(chosen) < n:
        best = None
        for b in grid.tolist():
            if b in chosen:
                continue
            pb, tb = extrema_of(b)
            cover, dist = _cover(pb, tb, peaks, troughs, tolerance)
            if cover and (best is None or (cover, -dist) > (best[0], -best[1])):
                best = (cover, dist, b)
        if best is None:
            return SearchResult(sorted(chosen), f"stopped at {len(chosen)} bases: no candidate's peaks "
                                "or troughs fall within the tolerance of the chosen ones", steps)
        chosen.append(best[2])
        steps.append({"base": best[2], "cover": best[0], "distance": best[1]})
        peaks, troughs = _merge(peaks, troughs, *extrema_of(best[2]))
    return SearchResult(sorted(chosen), "", steps)


def _search_paper(seeds, n, lo, hi, step, distances, head_dim) -> SearchResult:
    grid = np.arange(lo, hi + 1, step, dtype=np.float64)
    m = np.arange(distances[0], distances[1] + 1)
    waves = waveform(grid, head_dim, m)
    chosen = [float(s) for s in seeds][:n]
    if chosen:
        envelope = waveform(chosen, head_dim, m).max(axis=0)
    else:  # start from the base whose own waveform has the highest floor
        first = int(np.argmax(waves.min(axis=1)))
        chosen, envelope = [float(grid[first])], waves[first]
    steps = []
    while len(chosen) < n:
        candidates = np.maximum(waves, envelope[None, :])
        score = np.stack([candidates.min(axis=1), candidates.mean(axis=1)], axis=1)
        score[np.isin(grid, chosen)] = -np.inf
        order = np.lexsort((grid, -score[:, 1], -score[:, 0]))  # floor, then mean, then small base
        pick = int(order[0])
        if not np.isfinite(score[pick, 0]):
            return SearchResult(sorted(chosen), "stopped early: no bases left in the range", steps, "paper")
        chosen.append(float(grid[pick]))
        envelope = candidates[pick]
        steps.append({"base": float(grid[pick]), "floor": float(score[pick, 0]), "mean": float(score[pick, 1])})
    return SearchResult(sorted(chosen), "", steps, "paper")


def default_distances(max_positions: int) -> tuple[int, int]:
    """The authors searched m = 1000..4090 for a 4K model; keep those proportions for other contexts."""
    if max_positions == 4096:
        return 1000, 4090
    return max(8, round(max_positions * 1000 / 4096)), max(16, max_positions - 6)


# the reference code's grid (10K-30K, 500 apart, 6 bases, tolerance 3), written for Llama-2's base 10,000
SEARCH_GRID = (10000.0, 30000.0, 500.0)


def model_grid(base: float) -> tuple[float, float, float]:
    """The search range scaled to a model's trained base: base .. 3 x base in steps of base / 20 (the
    reference grid exactly for base 10,000; 100K-300K for SmolLM2, 1M-3M for Gemma-3's global layers)."""
    return (float(base), 3.0 * base, base / 20)


# the reference tolerance (3 positions) was set for the reference distances, 1000..4090
REFERENCE_TOLERANCE, REFERENCE_SPAN = 3, 4090 - 1000


def scaled_tolerance(distances: tuple[int, int]) -> int:
    """The reference tolerance grown in proportion to a distance range wider than the reference one
    (3 positions over 3,090; 24 over Qwen2.5's and Gemma-3's 8000..32762)."""
    return max(REFERENCE_TOLERANCE, round(REFERENCE_TOLERANCE * (distances[1] - distances[0]) / REFERENCE_SPAN))


def search_for_model(model_config, seeds: list[float] | None = None, n: int = 6,
                     grid: tuple[float, float, float] | None = None, distances: tuple[int, int] | None = None,
                     tolerance: int | None = None, method: Literal["reference", "paper"] = "reference"):
    """The base search seeded with the model's own RoPE base (that of its global layers), over the
    distances its context spans and with its head dim, over `grid` (lo, hi, step; default: `model_grid`
    of the model's base). Returns (SearchResult, head dim, (m0, m1)).

    `tolerance=None` takes the reference's 3 positions; where that finds no base to pair with the seed
    (a 32K model's range is 8x the reference's, and its waveform's extrema lie farther apart: Qwen2.5
    and Gemma-3 at base 1e6 stop at their own base alone, which would make the buckets the single base),
    the search runs again with `scaled_tolerance`, and where that pairs none either (Gemma-3's head dim
    256), the bases come from `method="paper"`; the result's message says which."""
    from ..core.family import architecture

    arch = architecture(model_config)
    if arch.rope_base is None:
        raise AttnkitError(f"{arch.model_type} has no RoPE base in its config; Attention Buckets needs a RoPE model")
    m0, m1 = default_distances(arch.max_positions) if distances is None else distances
    grid = grid or model_grid(arch.rope_base)
    span = (int(m0), int(m1))
    tol = REFERENCE_TOLERANCE if tolerance is None else tolerance
    result = search_bases(seeds or [arch.rope_base], n, *grid, span, arch.head_dim, tol, method)
    wider = scaled_tolerance(span)
    fallback = tolerance is None and method == "reference" and n > 1  # the default search may widen, then switch
    if fallback and len(result.bases) < 2 and wider > tol:
        retry = search_bases(seeds or [arch.rope_base], n, *grid, span, arch.head_dim, wider, method)
        retry.message = (f"tolerance {tol} paired no base with the seed over distances {span[0]}-{span[1]}; "
                         f"searched again with tolerance {wider} (scaled with the range)"
                         + (f"; {retry.message}" if retry.message else ""))
        result = retry
    if fallback and len(result.bases) < 2:
        found = _search_paper(list(result.bases), n, *grid, span, arch.head_dim)
        found.message = (f"the reference search paired no base with the seed over distances {span[0]}-{span[1]} "
                         f"(tolerance {tol}, then {max(tol, wider)}); bases by the paper's reading instead "
                         "(method 'paper': raise the envelope's floor)")
        result = found
    return result, arch.head_dim, span


def choose_bases(model_config, bases: list[float] | None, search: bool) -> tuple[list[float], str]:
    """The buckets' bases from the `--bases` / `--search` options, validated once for every command:
    (bases, the search's message or "")."""
    if search and bases:
        raise AttnkitError("give --bases or --search, not both (the search would replace the bases)")
    if search:
        result = search_for_model(model_config)[0]
        return list(result.bases), result.message or ""
    if bases:
        return list(bases), ""
    raise AttnkitError("give --bases or --search")
