"""The intervals against reference values computed by hand, and the verdict rules on the papers' own
figures as well as ours."""

import math
import random

import pytest

from attnkit.evals import stats
from attnkit.reproduce import verdicts as V


def test_wilson_matches_the_closed_form():
    # 8 of 10: the textbook Wilson 95% interval is 0.4902 to 0.9433
    est = stats.wilson(8, 10)
    assert est.mean == 80.0 and est.low == pytest.approx(49.02, abs=0.01) and est.high == pytest.approx(94.33, abs=0.01)
    zero = stats.wilson(0, 24)  # no success still has an upper bound above 0
    assert zero.low == 0.0 and 10 < zero.high < 15
    assert stats.proportion([100.0, 0.0, 100.0, None]).n == 3


def test_mcnemar_exact_p_from_the_binomial():
    a = [0] * 6 + [1] * 10
    b = [1] * 6 + [1] * 10  # 6 discordant pairs, all favouring b
    test = stats.mcnemar(a, b)
    assert (test["only_a"], test["only_b"]) == (0, 6) and test["p"] == pytest.approx(2 / 2 ** 6)
    assert stats.mcnemar(b, b)["p"] == 1.0


def test_bootstrap_covers_the_mean_and_the_paired_difference_pairs_by_position():
    rng = random.Random(1)
    values = [rng.gauss(50, 10) for _ in range(200)]
    est = stats.bootstrap_mean(values)
    se = stats.sample_sd(values) / math.sqrt(len(values))
    assert est.low < est.mean < est.high and (est.high - est.low) == pytest.approx(2 * 1.96 * se, rel=0.2)
    before = [10.0, 20.0, 30.0, 40.0]
    after = [12.0, 22.0, 32.0, 42.0]  # every pair +2: the paired interval is exactly 2, unpaired it would not be
    diff = stats.paired_difference(before, after)
    assert diff.mean == 2.0 and diff.ci == [2.0, 2.0] and diff.excludes_zero()
    assert stats.sample_sd([1.0, 3.0]) == pytest.approx(math.sqrt(2), abs=0.005)  # n - 1, not n
    assert stats.mean_over([[0.0, 100.0], [100.0, None]]) == [50.0, 100.0]


def test_sparsity_rule_passes_the_papers_own_models():
    # the paper's distribution: about 3-6% of heads above 0.1 across its models; the rule must call those sparse
    for share in V.PAPER["sparsity"]["range"]:
        assert V.sparsity(round(share * 10), 1000, counted=100).holds
    assert V.sparsity(0, 1000, 100).holds is False and V.sparsity(300, 1000, 100).holds is False
    assert V.sparsity(30, 1000, counted=V.MIN_N - 1).word == V.TOO_FEW


def test_gain_and_ablation_rules():
    n = V.MIN_N
    before = [0.0, 100.0] * (n // 2)
    assert V.gain(before, [100.0] * n)[0].holds
    assert V.gain(before, before)[0].holds is False
    assert V.gain([100.0] * n, [100.0] * n)[0].word == V.NOT_MEASURABLE
    assert V.gain(before[:6], [100.0] * 6)[0].word == V.TOO_FEW
    none = [100.0] * n
    assert V.ablation(none, [0.0] * n, [[100.0] * n, [90.0] * n])[0].holds
    # the top mask takes 40, random takes 30: not twice as much
    assert V.ablation(none, [60.0] * n, [[70.0] * n])[0].holds is False
    assert V.all_hold([V.Verdict(V.HOLDS), V.Verdict(V.FAILS)]).word == V.FAILS
    assert V.all_hold([V.Verdict(V.HOLDS), V.Verdict(V.TOO_FEW)]).word == V.TOO_FEW
