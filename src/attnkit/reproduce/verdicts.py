"""The rules that turn measured figures into "holds" / "does not hold" / "too few to say", written
once: the study report, the README's tables and the tests all call these.

Every rule compares systems on the same prompts, so the intervals are paired; none says "holds"
from fewer than MIN_N prompts per compared cell."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.evals import stats
from attnkit.s2a.tasks import PAPER as S2A_PAPER

MIN_N = 24  # prompts per compared cell below which no claim is decided

HOLDS, FAILS, TOO_FEW, NOT_MEASURABLE = "holds", "does not hold", "too few to say", "not measurable"

# The papers' figures the rules are set against, with where each comes from.
PAPER = {
    "sparsity": {"range": (3.0, 6.0), "source": "Wu et al. 2024 (arXiv 2404.15574), the per-model distribution of "
                 "retrieval scores: roughly 3-6% of heads above 0.1 across Llama-2, Yi, Qwen1.5 and Mistral "
                 "(the abstract rounds this to \"less than 5%\")"},
    "masking": {"source": "Wu et al. 2024, the masking experiment on needle-in-a-haystack: the top retrieval heads "
                "masked, recall collapses; as many random heads masked, it barely moves"},
    "buckets": {"source": "Chen et al. 2024 (arXiv 2312.04455): gains on tool use (ToolBench) and retrieval-"
                "augmented QA with Llama-2-7B; no NIAH or key-value figure is given"},
    "middle-dip": {"source": "Liu et al. 2023 (arXiv 2307.03172), multi-document QA over NaturalQuestions-Open "
                   "(10-30 documents): accuracy highest with the answer's document first or last, lowest in the "
                   "middle (a U-shaped curve)"},
    "s2a-sycophancy": {**S2A_PAPER["sycophancy"], "source": "Weston & Sukhbaatar 2023 (arXiv 2311.11829), factual QA with opinions: "
                                 "TriviaQA questions in SycophancyEval's opinion templates, answers judged by "
                                 "GPT-4, LLaMA-2-70B-chat"},
    "s2a-gsm-ic": {**S2A_PAPER["gsm-ic"], "source": "Weston & Sukhbaatar 2023, GSM-IC math word problems with in-topic irrelevant "
                             "sentences, LLaMA-2-70B-chat"},
}

MIN_PARSED = 50.0  # S2A: below this share of parsed rewrites the model is not doing S2A at all
SPARSE_SHARE = 0.10  # "a sparse set": at most this share above the threshold (the paper's 3-6% pass it)
ABLATION_DROP = 25.0  # points of recall the top-K mask must take away
CONSISTENT = 0.5  # top-set overlap and Spearman both at least this


@dataclass(frozen=True)
class Verdict:
    word: str  # one of HOLDS, FAILS, TOO_FEW, NOT_MEASURABLE
    why: str = ""

    @property
    def holds(self) -> bool | None:
        return {HOLDS: True, FAILS: False}.get(self.word)

    def markdown(self) -> str:
        word = f"**{self.word}**" if self.word == FAILS else self.word
        return f"{word} ({self.why})" if self.why else word


def sparsity(above: int, heads: int, counted: int) -> Verdict:
    """Few heads copy: a share above 0 and at most SPARSE_SHARE, from at least MIN_N counted trials."""
    if counted < MIN_N:
        return Verdict(TOO_FEW, f"{counted} counted detection trials, fewer than {MIN_N}")
    share = above / heads if heads else 0.0
    ok = 0 < share <= SPARSE_SHARE
    return Verdict(HOLDS if ok else FAILS, f"{100 * share:.1f}% of heads, rule: above 0 and at most "
                                           f"{100 * SPARSE_SHARE:.0f}%")


def consistency(overlap_fraction: float | None, spearman: float | None, counted: int) -> Verdict:
    """The same heads from two detection runs; `counted`: the smaller run's counted trials."""
    if overlap_fraction is None:
        return Verdict(TOO_FEW, "a run counted no trial")
    if counted < MIN_N:
        return Verdict(TOO_FEW, f"{counted} counted trials in the smaller run, fewer than {MIN_N}")
    ok = overlap_fraction >= CONSISTENT and (spearman or 0) >= CONSISTENT
    return Verdict(HOLDS if ok else FAILS, f"rule: overlap and Spearman both >= {CONSISTENT}")


def _saturated(*lists) -> bool:
    """Every value of every list at the same bound (all 0 or all 100): nothing to move."""
    values = [v for l in lists for v in l if v is not None]
    return bool(values) and (all(v == 0 for v in values) or all(v == 100 for v in values))


def gain(before: list, after: list) -> tuple[Verdict, stats.Estimate]:
    """`after` beats `before` on the same prompts: the paired 95% interval of after - before above 0."""
    diff = stats.paired_difference(before, after)
    if _saturated(before, after):
        return Verdict(NOT_MEASURABLE, "both at the same bound on every prompt"), diff
    if diff.n < MIN_N:
        return Verdict(TOO_FEW, f"n={diff.n} paired prompts, fewer than {MIN_N}"), diff
    if diff.low is not None and diff.low > 0:
        return Verdict(HOLDS, "paired 95% interval above 0"), diff
    return Verdict(FAILS, "paired 95% interval " + ("below 0" if diff.high is not None and diff.high < 0
                                                    else "includes 0")), diff


def middle_dip(ends_minus_middle: stats.Estimate) -> Verdict:
    """A lost-in-the-middle dip: the paired interval of (mean of the end positions - the middle
    position) above 0, from at least MIN_N questions."""
    d = ends_minus_middle
    if d.n is None or d.n < MIN_N:
        return Verdict(TOO_FEW, f"n={d.n or 0} questions, fewer than {MIN_N}")
    if d.low is not None and d.low > 0:
        return Verdict(HOLDS, "paired 95% interval of ends minus middle above 0")
    return Verdict(FAILS, "paired 95% interval of ends minus middle " + ("below 0" if d.high is not None and d.high < 0
                                                                         else "includes 0"))


def middle_dip_of(raw: dict | None) -> tuple[Verdict, stats.Estimate]:
    """`middle_dip` of a curve's stored "ends_minus_middle" (None with fewer than 3 positions)."""
    est = stats.Estimate.from_dict(raw) if raw else stats.Estimate(None, None, None, 0)
    return middle_dip(est), est


def gain_where_dip(dip: Verdict, before: list, after: list) -> tuple[Verdict, stats.Estimate]:
    """`gain`, decided only where the model has a middle dip to fix: without one, not measurable."""
    verdict, diff = gain(before, after)
    if dip.word != HOLDS and verdict.word in (HOLDS, FAILS):
        return Verdict(NOT_MEASURABLE, "no middle dip shown on this model: nothing for buckets to fix"), diff
    return verdict, diff


def ablation(none: list, top: list, random_by_seed: list[list]) -> tuple[Verdict, stats.Estimate]:
    """Masking the top-K heads takes at least ABLATION_DROP points and at least twice what K random
    heads take, and the paired interval of (random - top) lies above 0."""
    rand = stats.mean_over(random_by_seed) if random_by_seed else []
    gap = stats.paired_difference(top, rand)  # random minus top, per prompt
    n = min(len(stats._clean(none)), gap.n)
    if n and all(v == 0 for v in stats._clean(none)):
        return Verdict(NOT_MEASURABLE, "recall is 0 with nothing masked"), gap
    if n < MIN_N:
        return Verdict(TOO_FEW, f"n={n} prompts, fewer than {MIN_N}"), gap
    drop_top = stats.paired_difference(top, none).mean or 0.0
    drop_rand = stats.paired_difference(rand, none).mean or 0.0
    ok = drop_top >= ABLATION_DROP and drop_top >= 2 * max(drop_rand, 0.0) and gap.low is not None and gap.low > 0
    why = (f"top drop {drop_top:.1f}, random drop {drop_rand:.1f}; rule: top drop >= {ABLATION_DROP:g}, "
           f">= 2x the random drop, paired interval of random - top above 0")
    return Verdict(HOLDS if ok else FAILS, why), gap


def all_hold(verdicts: list[Verdict]) -> Verdict:
    """One verdict for a claim tested in several cells: fails if any fails, holds if all hold."""
    words = [v.word for v in verdicts]
    if not words:
        return Verdict(TOO_FEW, "no cell")
    if FAILS in words:
        return Verdict(FAILS, f"{words.count(FAILS)} of {len(words)} cells fail")
    if all(w == HOLDS for w in words):
        return Verdict(HOLDS, f"all {len(words)} cells")
    return Verdict(TOO_FEW if TOO_FEW in words else NOT_MEASURABLE, f"{words.count(HOLDS)} of {len(words)} cells hold")
