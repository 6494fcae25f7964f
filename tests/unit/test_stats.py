"""Student-t intervals over seeds, paired differences and verdict sentences, against hand values."""

import math

import numpy as np
import pytest

from dataeff.stats import Interval, low_at_level, mean_ci, paired_diff, verdict_sentence

# t quantiles from tables: t_{0.975,2} = 4.302653, t_{0.975,1} = 12.706205, t_{0.95,2} = 2.919986.
T975_2, T975_1, T95_2 = 4.302653, 12.706205, 2.919986


def test_mean_ci_three_values_matches_hand_computation():
    # [1, 2, 3]: mean 2, s = 1, half-width = 4.302653 * 1 / sqrt(3) = 2.484138.
    mean, low, high, n = mean_ci([1.0, 2.0, 3.0])
    assert n == 3 and mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(T975_2 / math.sqrt(3), rel=1e-6)
    assert mean - low == pytest.approx(2.484138, rel=1e-6)


def test_mean_ci_level_changes_width():
    # 90% two-sided uses t_{0.95,2}: narrower than the 95% interval.
    _, low, high, _ = mean_ci([1.0, 2.0, 3.0], level=0.90)
    assert (high - low) / 2 == pytest.approx(T95_2 / math.sqrt(3), rel=1e-6)


def test_mean_ci_two_values_uses_one_degree_of_freedom():
    # [0.70, 0.72]: s = 0.01414214, half = 12.706205 * 0.01414214 / sqrt(2) = 0.12706205.
    mean, low, high, n = mean_ci([0.70, 0.72])
    assert (mean, n) == (pytest.approx(0.71), 2)
    assert high - mean == pytest.approx(T975_1 * 0.01, rel=1e-6)


def test_mean_ci_ignores_nan_and_handles_one_and_zero_values():
    assert mean_ci([1.0, math.nan, 2.0, 3.0])[:2] == pytest.approx((2.0, 2.0 - 2.484138), rel=1e-6)
    mean, low, high, n = mean_ci([0.5, math.nan])
    assert (mean, n) == (0.5, 1) and math.isnan(low) and math.isnan(high)
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([math.nan]).mean)


def test_mean_ci_rejects_bad_level():
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)


def test_paired_diff_pairs_by_seed_and_drops_unshared_seeds():
    # Differences on shared seeds 0,1,2: 0.01, 0.02, 0.03 -> mean 0.02, s = 0.01.
    a = {0: 0.71, 1: 0.72, 2: 0.73, 7: 0.10}
    b = {0: 0.70, 1: 0.70, 2: 0.70, 9: 0.99}
    mean, low, high, n = paired_diff(a, b)
    assert n == 3 and mean == pytest.approx(0.02)
    assert high - mean == pytest.approx(T975_2 * 0.01 / math.sqrt(3), rel=1e-6)


def test_paired_interval_is_narrower_than_unpaired_when_seeds_share_variation():
    # Seed effects (+-0.05) dominate both cells; pairing cancels them.
    seed_effect = np.array([-0.05, 0.0, 0.05])
    a = dict(enumerate(0.72 + seed_effect + [0.001, 0.0, -0.001]))
    b = dict(enumerate(0.70 + seed_effect))
    paired = paired_diff(a, b)
    unpaired = mean_ci(list(a.values())).high - mean_ci(list(a.values())).mean
    assert paired.low > 0  # a is better, and the paired interval sees it
    assert paired.high - paired.mean < unpaired / 10


def test_verdict_sentences():
    same = Interval(-0.003, -0.011, 0.005, 3)
    assert verdict_sentence("MedDEL 5%", "full", same) == (
        "MedDEL 5% vs full: −0.3 mIoU [−1.1, +0.5]: not distinguishable with 3 seeds"
    )
    better = paired_diff({0: 0.71, 1: 0.72, 2: 0.73}, {0: 0.70, 1: 0.70, 2: 0.70})  # +2.0 [-0.5, +4.5]
    assert verdict_sentence("A", "B", better).endswith("not distinguishable with 3 seeds")
    clear = Interval(0.02, 0.01, 0.03, 3)
    assert verdict_sentence("OptiDEL 5%", "random 5%", clear) == (
        "OptiDEL 5% vs random 5%: +2.0 mIoU [+1.0, +3.0]: better beyond the 95% CI"
    )
    worse = Interval(-0.02, -0.03, -0.01, 4)
    assert verdict_sentence("A", "B", worse).endswith("worse beyond the 95% CI")
    assert verdict_sentence("A", "B", paired_diff({0: 0.75}, {0: 0.70})) == "A vs B: +5.0 mIoU: one seed: no interval"
    assert verdict_sentence("A", "B", paired_diff({0: 0.75}, {1: 0.70})) == "A vs B: no seed in common: no comparison"
    assert verdict_sentence("A", "B", Interval(0.5, 0.2, 0.8, 3), unit_scale=1, unit="Dice") == (
        "A vs B: +0.5 Dice [+0.2, +0.8]: better beyond the 95% CI"
    )


def test_low_at_level_equals_the_interval_recomputed_at_that_level():
    values = [0.012, -0.003, 0.009, 0.004, 0.011]
    at95, at99 = mean_ci(values, 0.95), mean_ci(values, 0.99)
    assert low_at_level(at95.mean, at95.low, at95.n, 0.99) == pytest.approx(at99.low)
    assert low_at_level(at95.mean, at95.low, at95.n, 0.95) == pytest.approx(at95.low)
    assert math.isnan(low_at_level(0.1, math.nan, 1, 0.99))


def test_scratch_verdict_corrects_for_the_family_of_cells():
    import pandas as pd

    from dataeff.report_markdown import scratch_box
    from dataeff.report_table import scratch_verdicts

    def row(method, ratio, values):
        iv = mean_ci(values)
        return {
            "dataset": "a",
            "method": method,
            "ratio": ratio,
            "versus": "scratch",
            "n": iv.n,
            "diff_mean": iv.mean,
            "ci_low": iv.low,
            "ci_high": iv.high,
            "sentence": method,
        }

    noise = [0.01, -0.01, 0.005, -0.004, 0.002]
    edge = [0.012, 0.001, 0.009, 0.004, 0.011]  # clears 0 at 95%, not at 1 - 0.05 / 9
    strong = [0.10, 0.11, 0.105, 0.098, 0.102]
    rows = [row("random", 0.2, edge)] + [row(f"m{i}", 0.05, noise) for i in range(8)]
    verdict = scratch_verdicts(pd.DataFrame(rows), ["a"])["a"]
    assert verdict["beat"] == [("random", 0.2)] and verdict["family"] == 9
    assert verdict["beat_corrected"] == []
    box = "\n".join(scratch_box({"a": verdict}, 5))
    assert "1 of 9 cells" in box and "None still beats scratch after a Bonferroni correction" in box

    rows[1] = row("full", 1.0, strong)
    verdict = scratch_verdicts(pd.DataFrame(rows), ["a"])["a"]
    assert verdict["beat_corrected"] == [("full", 1.0)]
    assert "still ahead: full" in "\n".join(scratch_box({"a": verdict}, 5))
