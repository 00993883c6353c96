"""Split-conformal calibration on plain score arrays: the guarantee over many calibration sets,
uniform p-values, labels that agree with p-values exactly, and every bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import chisquare

from fastflow import FastFlowError
from fastflow.estimator.calibration import (
    Calibration,
    allowed_exceedances,
    check_false_alarm_rate,
    conformal_threshold,
    guaranteed_rate,
    normals_needed,
    p_values,
    realised_range,
    too_few,
)
from fastflow.model.inference import float32_threshold

N, RATE, SETS, FRESH = 99, 0.05, 1000, 200


def _calibration_sets(seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``SETS`` sorted calibration sets of ``N`` normal scores, and ``FRESH`` new scores for each
    (from a normal distribution ``scale`` times as wide: 1 for new images like the calibration ones)."""
    rng = np.random.default_rng(seed)
    calibration = np.sort(rng.standard_normal((SETS, N)), axis=1)
    fresh = scale * rng.standard_normal((SETS, FRESH))
    return calibration, fresh


def _uniformity(calibration: np.ndarray, fresh: np.ndarray) -> float:
    """The chi-square test's p-value that the p-values of fresh scores, one per calibration set
    (so that they are independent), are uniform on {1, ..., N + 1} / (N + 1)."""
    pooled = np.array([p_values(c, f[:1])[0] for c, f in zip(calibration, fresh, strict=True)])
    ranks = np.rint(pooled * (N + 1)).astype(int)
    np.testing.assert_allclose(ranks / (N + 1), pooled, rtol=0, atol=1e-12)  # on the lattice
    assert ranks.min() >= 1 and ranks.max() <= N + 1
    counts = np.bincount(ranks - 1, minlength=N + 1)
    return float(chisquare(counts).pvalue)


def test_false_alarm_rate_over_many_calibration_sets_is_the_conformal_value() -> None:
    """Over 1,000 calibration sets of 99 scores, the threshold for 0.05 flags fresh scores of the
    same distribution at floor(0.05 * 100) / 100 = 0.05 on average (within 0.005); a single set's
    rate varies around it by about sqrt(a / n), so the guarantee is tested on the average. (The
    0.95 quantile, the former threshold rule, flags 0.060 of them here: outside the bound.)"""
    calibration, fresh = _calibration_sets()
    thresholds = np.array([conformal_threshold(c, RATE) for c in calibration])
    rates = (fresh > thresholds[:, None]).mean(axis=1)
    conformal = math.floor(RATE * (N + 1)) / (N + 1)
    assert conformal <= RATE and guaranteed_rate(N, RATE) == conformal
    assert abs(rates.mean() - conformal) < 0.005, rates.mean()
    assert rates.std() > 0.01  # single sets do vary: the average is what is guaranteed


def test_one_calibration_sets_own_rate_lies_in_its_range_95_times_in_100() -> None:
    """Each set's own false-alarm rate (exact: the normal law's tail above its threshold) falls in
    ``realised_range`` for about 95 % of the 1,000 sets (binomial sd 0.7 %)."""
    from scipy.stats import norm

    calibration, _ = _calibration_sets()
    own = norm.sf([conformal_threshold(c, RATE) for c in calibration])
    low, high = realised_range(N, RATE)
    assert low < RATE < high
    assert 0.925 <= np.mean((own >= low) & (own <= high)) <= 0.975
    assert np.mean(own > high) < 0.05


def test_p_values_of_new_normal_scores_are_uniform_on_the_lattice() -> None:
    calibration, fresh = _calibration_sets()
    assert _uniformity(calibration, fresh) > 0.01


def test_the_uniformity_test_rejects_scores_from_another_distribution() -> None:
    """The same chi-square test has the power to notice new images that score wider than the
    calibration images (30 % wider): their p-values pile up at both ends."""
    calibration, fresh = _calibration_sets(scale=1.3)
    assert _uniformity(calibration, fresh) < 0.01


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_labels_agree_with_p_values_exactly_ties_included(dtype: type) -> None:
    """score > threshold iff p-value <= the guaranteed rate (= the rate where n suffices), for
    every n up to 300 and rates written as decimals, on integer scores full of ties and on scores
    just beside every calibration score; for float32 scores the float32 comparison the inference
    graph makes agrees too."""
    rng = np.random.default_rng(1)
    rates = [0.001, 0.01, 0.05, 0.07, 0.1, 0.29, 0.3, 0.5, 0.9, 0.99]
    for n in [*range(1, 60), 98, 99, 100, 199, 300]:
        calibration = np.sort(rng.integers(0, 6, n)).astype(dtype).astype(np.float64)
        nearby = np.concatenate(
            [calibration, np.nextafter(calibration, np.inf), np.nextafter(calibration, -np.inf)]
        )
        scores = np.concatenate([nearby, rng.uniform(-1, 7, 50)]).astype(dtype)
        p = p_values(calibration, scores)
        for rate in [*rates, 1 / (n + 1), 2 / (n + 1)]:
            if not 0 < rate < 1:
                continue
            threshold = conformal_threshold(calibration, rate)
            labels = scores > threshold
            np.testing.assert_array_equal(labels, p <= guaranteed_rate(n, rate), err_msg=f"{n} {rate}")
            if too_few(n, rate) is None:
                np.testing.assert_array_equal(labels, p <= rate, err_msg=f"{n} {rate}")
            if dtype is np.float32:  # the graph's scores are float32, compared with a float32 threshold
                graph = scores > np.float32(float32_threshold(threshold))
                np.testing.assert_array_equal(graph, labels)


def test_threshold_is_the_order_statistic_in_exact_arithmetic() -> None:
    """The ceil((n + 1)(1 - a))-th smallest score, with a taken as the decimal it is written as
    (float rounding of 100 * 0.71 = 70.99999999999999 must not move it)."""
    for n in (19, 20, 99, 100, 999):
        scores = np.arange(1.0, n + 1)  # the k-th smallest is k
        for text in ("0.01", "0.05", "0.07", "0.1", "0.29", "0.3", "0.71"):
            k = math.ceil((n + 1) * (1 - Fraction(text)))
            expected = float(min(k, n))
            assert conformal_threshold(scores, float(text)) == expected, (n, text)
            assert allowed_exceedances(n, float(text)) == n + 1 - k


def test_p_values_count_the_calibration_scores_at_or_above() -> None:
    calibration = np.array([1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(
        p_values(calibration, [0.5, 1.0, 2.0, 2.5, 3.0, 9.0]), [1, 1, 0.8, 0.4, 0.4, 0.2]
    )
    assert np.isnan(p_values(np.array([]), [1.0, 2.0])).all()


def test_too_few_images_take_the_largest_score_and_say_what_the_rate_needs() -> None:
    scores = np.arange(6.0)
    assert conformal_threshold(scores, 0.01) == 5.0
    message = too_few(6, 0.01)
    assert message is not None and "\n" not in message
    assert "1/7" in message and "0.143" in message and "needs at least 99 normal images" in message
    assert guaranteed_rate(6, 0.01) == pytest.approx(1 / 7)
    assert too_few(99, 0.01) is None and too_few(98, 0.01) is not None
    assert [normals_needed(r) for r in (0.01, 0.001, 0.05, 0.3, 0.5)] == [99, 999, 19, 3, 1]


@pytest.mark.parametrize("rate", [0, 1, -0.1, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_a_rate_outside_zero_one_is_a_one_line_error(rate: object) -> None:
    with pytest.raises(FastFlowError, match=r"false_alarm_rate must be a number between 0 and 1") as error:
        check_false_alarm_rate(rate)
    assert "\n" not in str(error.value)


def test_calibration_object_round_trip_and_refusals() -> None:
    calibration = Calibration.of([3.0, 1.0, 2.0], 0.3, "three images")
    np.testing.assert_array_equal(calibration.scores, [1.0, 2.0, 3.0])
    assert calibration.threshold() == 3.0 and calibration.threshold(0.5) == 2.0
    again = Calibration.from_dict(calibration.to_dict())
    np.testing.assert_array_equal(again.scores, calibration.scores)
    assert (again.false_alarm_rate, again.source) == (0.3, "three images")
    assert calibration.summary(0.5) == {
        "false_alarm_rate": 0.5,
        "guaranteed_false_alarm_rate": 0.5,
        "calibration_images": 3,
        "calibration_source": "three images",
    }
    with pytest.raises(FastFlowError, match="not all finite"):
        Calibration.of([1.0, float("nan")], 0.1, "a diverged model")
    with pytest.raises(FastFlowError, match="no calibration scores.*fastflow calibrate"):
        Calibration.of([], None, "none").threshold(0.1)
    with pytest.raises(FastFlowError, match="not set from a false-alarm rate"):
        Calibration.of([1.0], None, "an old file").threshold()
    assert Calibration.from_metadata({}).n == 0
