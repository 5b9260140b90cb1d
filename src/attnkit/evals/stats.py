"""Intervals and tests every published figure uses: Wilson for proportions, a seeded bootstrap for
means of scores, a paired bootstrap and McNemar's exact test for two systems on the same prompts,
the sample SD across seeds. Values are on the 0-100 scale the evaluations report."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

Z95 = 1.959964


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval, the number behind it and how the interval was drawn."""
    mean: float | None
    low: float | None
    high: float | None
    n: int
    method: str  # "Wilson", "bootstrap", "paired bootstrap", ...

    @property
    def ci(self) -> list[float] | None:
        return None if self.low is None else [self.low, self.high]

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 1, signed: bool = False) -> str:
        """`83.3 [70.1, 91.0], n=24`: the way every table cell shows a figure (`signed`: a difference,
        `+12.5 [+4.2, +20.8], n=24`)."""
        if self.mean is None:
            return f"n/a (n={self.n})"
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        body = f.format(self.mean)
        if self.low is not None:
            body += f" [{f.format(self.low)}, {f.format(self.high)}]"
        return f"{body}, n={self.n}"

    @classmethod
    def from_dict(cls, d: dict) -> "Estimate":
        """The inverse of `as_dict` (result files store estimates that way)."""
        low, high = d.get("ci95") or (None, None)
        return cls(d.get("mean"), low, high, d["n"], d.get("method", ""))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.ci, "n": self.n, "method": self.method}


def _clean(values) -> list[float]:
    return [float(v) for v in values if v is not None]


def wilson(successes: int, n: int) -> Estimate:
    """A proportion (as a percentage) with its Wilson score 95% interval."""
    if n == 0:
        return Estimate(None, None, None, 0, "Wilson")
    p = successes / n
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return Estimate(round(100 * p, 2), round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2),
                    n, "Wilson")


def proportion(hits) -> Estimate:
    """0/1 outcomes (or 0/100 scores) as a percentage with the Wilson interval."""
    values = _clean(hits)
    return wilson(sum(1 for v in values if v > 0), len(values))


def bootstrap_mean(values, seed: int = 0, draws: int = 2000) -> Estimate:
    """The mean with a seeded 95% percentile bootstrap interval (None below two values)."""
    values = _clean(values)
    if not values:
        return Estimate(None, None, None, 0, "bootstrap")
    mean = round(statistics.fmean(values), 2)
    if len(values) < 2:
        return Estimate(mean, None, None, len(values), "bootstrap")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(draws))
    return Estimate(mean, round(means[int(0.025 * draws)], 2), round(means[int(0.975 * draws) - 1], 2), len(values),
                    "bootstrap")


def paired_difference(a, b, seed: int = 0, draws: int = 2000) -> Estimate:
    """Mean of b - a over pairs (the same prompts through two systems) with its bootstrap interval;
    a pair with a missing side is left out."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    est = bootstrap_mean([y - x for x, y in pairs], seed, draws)
    return Estimate(est.mean, est.low, est.high, est.n, "paired bootstrap")


def mcnemar(a, b) -> dict:
    """McNemar's exact test on paired 0/1 outcomes: discordant counts and the two-sided p-value."""
    pairs = [(x > 0, y > 0) for x, y in zip(a, b) if x is not None and y is not None]
    only_a = sum(1 for x, y in pairs if x and not y)
    only_b = sum(1 for x, y in pairs if y and not x)
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p": 1.0, "n": len(pairs)}
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return {"only_a": only_a, "only_b": only_b, "p": round(min(1.0, 2 * tail), 6), "n": len(pairs)}


def sample_sd(values) -> float | None:
    """The sample (n - 1) standard deviation, None below two values."""
    values = _clean(values)
    return round(statistics.stdev(values), 2) if len(values) > 1 else None


def mean_over(lists) -> list[float | None]:
    """Per position, the mean of several equally long lists (e.g. one prompt's recall over random-head
    seeds); None where every list is missing it."""
    out = []
    for column in zip(*lists):
        got = _clean(column)
        out.append(statistics.fmean(got) if got else None)
    return out
