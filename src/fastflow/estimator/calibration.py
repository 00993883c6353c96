"""Split-conformal calibration: the deployment threshold for a target false-alarm rate, and
p-values, from the scores of normal images the model did not train on.

With n calibration scores, a new normal image's score is as likely to take any of the n + 1
ranks among them (exchangeability: the images come from the same process). So the threshold
``t`` = the ceil((n + 1)(1 - a))-th smallest calibration score flags a new normal image
(score > t) with probability at most floor(a (n + 1)) / (n + 1) <= a, on average over
calibration sets (exactly that for scores without ties). One calibration set's own rate
varies around that: for continuous scores it follows Beta(m, n + 1 - m), m = floor(a (n + 1)),
whose 95 % range ``realised_range`` gives (wide for few images: 0.4-46 % for 6 images). The p-value of a score s is
(1 + #{calibration scores >= s}) / (n + 1): near 1 for a typical normal image, 1 / (n + 1) for
one above every calibration score; for a new normal image it is uniform on {1, ..., n + 1} / (n + 1).

Labels and p-values agree exactly: score > threshold iff p-value <= ``guaranteed_rate``, ties
included. Both come from the attainable p-values (1 + m) / (n + 1) computed in float64 the same
way, so a rate written as a decimal (0.29) is not moved by float rounding of (n + 1)(1 - a).
Where n is too small for a (n + 1 < 1 / a) the threshold is the largest score, which
guarantees 1 / (n + 1); ``too_few`` says so in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastflow.core.errors import FastFlowError, is_real, require

__all__ = [
    "Calibration",
    "allowed_exceedances",
    "check_false_alarm_rate",
    "conformal_threshold",
    "guaranteed_rate",
    "normals_needed",
    "p_value_json",
    "p_values",
    "realised_range",
    "too_few",
]

P_VALUE_MEANING = "(1 + number of calibration scores >= the image's score) / (n + 1)"


def check_false_alarm_rate(rate: Any, name: str = "false_alarm_rate") -> float:
    """``rate`` as a float, or the one-line error naming ``name`` unless it lies in (0, 1)."""
    require(is_real(rate) and 0 < rate < 1, name, "a number between 0 and 1 (exclusive), e.g. 0.01", rate)
    return float(rate)


def allowed_exceedances(n: int, rate: float) -> int:
    """How many of the attainable p-values (1..n+1) / (n + 1) are <= ``rate``: floor(rate (n + 1))
    in exact arithmetic, here counted on the float64 values ``p_values`` computes."""
    count = min(max(math.floor(rate * (n + 1)), 0), n + 1)
    while count > 0 and count / (n + 1) > rate:
        count -= 1
    while count <= n and (count + 1) / (n + 1) <= rate:
        count += 1
    return count


def conformal_threshold(sorted_scores: np.ndarray, rate: float) -> float:
    """The ceil((n + 1)(1 - rate))-th smallest of the ascending ``sorted_scores``; their largest
    where n is too small for ``rate``."""
    n = len(sorted_scores)
    if n == 0:
        raise FastFlowError(
            "the model holds no calibration scores, so no threshold for a false-alarm rate; calibrate it "
            "on normal images: fastflow calibrate RUN NORMALS (FastFlow.calibrate(images) in Python)"
        )
    return float(sorted_scores[n - max(allowed_exceedances(n, rate), 1)])


def guaranteed_rate(n: int, rate: float) -> float:
    """The false-alarm probability the threshold of n calibration scores guarantees for ``rate``:
    floor(rate (n + 1)) / (n + 1) <= rate, or 1 / (n + 1) where n is too small for ``rate``."""
    return max(allowed_exceedances(n, rate), 1) / (n + 1)


def realised_range(n: int, rate: float, confidence: float = 0.95) -> tuple[float, float]:
    """Where one calibration set's own false-alarm rate lies with probability ``confidence``: the
    central interval of Beta(m, n + 1 - m), m = max(floor(rate (n + 1)), 1), the law of the
    share of new normal scores above the threshold for continuous scores."""
    from scipy.stats import beta

    m = max(allowed_exceedances(n, rate), 1)
    tail = (1 - confidence) / 2
    return float(beta.ppf(tail, m, n + 1 - m)), float(beta.ppf(1 - tail, m, n + 1 - m))


def normals_needed(rate: float) -> int:
    """The fewest calibration images that can guarantee ``rate``: the smallest n with 1 / (n + 1) <= rate."""
    n = max(math.ceil(1 / rate) - 1, 0)
    while n > 0 and 1 / n <= rate:
        n -= 1
    while 1 / (n + 1) > rate:
        n += 1
    return n


def too_few(n: int, rate: float) -> str | None:
    """The one-line warning where n calibration images cannot guarantee ``rate``, else None."""
    if allowed_exceedances(n, rate) >= 1:
        return None
    return (
        f"{n} normal calibration images cannot guarantee a false-alarm rate of {rate:g}: the threshold is "
        f"their largest score, which guarantees {1 / (n + 1):.3g} (1/{n + 1}), the smallest rate {n} images "
        f"can; {rate:g} needs at least {normals_needed(rate)} normal images (fastflow calibrate RUN NORMALS)"
    )


def p_values(sorted_scores: np.ndarray, scores: Any) -> np.ndarray:
    """Conformal p-values of ``scores`` against the ascending calibration scores: (1 + #{calibration
    >= s}) / (n + 1) each, float64; NaN where there is no calibration score."""
    values = np.asarray(scores, dtype=np.float64)
    n = len(sorted_scores)
    if n == 0:
        return np.full(values.shape, np.nan)
    at_least = n - np.searchsorted(sorted_scores, values, side="left")
    return (1.0 + at_least) / (n + 1)


def p_value_json(p_value: float) -> float | None:
    """A p-value for JSON: None for NaN (no calibration scores), which JSON lacks."""
    return None if np.isnan(p_value) else float(p_value)


@dataclass(frozen=True, eq=False)
class Calibration:
    """Normal images' scores a threshold and p-values come from (ascending, float64), the
    false-alarm rate the deployment threshold was set at from them, and where they came from.

    ``false_alarm_rate`` is None where the threshold did not come from these scores: a model
    file of an older fastflow (a quantile of its held-out scores) or ``FastFlow.from_model``.
    """

    scores: np.ndarray
    false_alarm_rate: float | None
    source: str

    @classmethod
    def of(cls, scores: Any, false_alarm_rate: float | None, source: str) -> Calibration:
        """Sorted float64 copies of ``scores``; a non-finite one is an error (a diverged model)."""
        values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if not np.isfinite(values).all():
            raise FastFlowError(
                f"calibration scores from {source} are not all finite; the model diverged: retrain it"
            )
        rate = None if false_alarm_rate is None else check_false_alarm_rate(false_alarm_rate)
        return cls(values, rate, source)

    @property
    def n(self) -> int:
        return len(self.scores)

    def _rate(self, rate: float | None) -> float:
        if rate is not None:
            return check_false_alarm_rate(rate)
        if self.false_alarm_rate is None:
            raise FastFlowError(
                f"the threshold was not set from a false-alarm rate ({self.source}); pass a rate"
            )
        return self.false_alarm_rate

    def threshold(self, rate: float | None = None) -> float:
        """The split-conformal threshold for ``rate`` (default: the calibration's own)."""
        return conformal_threshold(self.scores, self._rate(rate))

    def guaranteed_rate(self, rate: float | None = None) -> float:
        """What ``threshold(rate)`` guarantees: a new normal image is flagged with at most this probability."""
        return guaranteed_rate(self.n, self._rate(rate))

    def realised_range(self, rate: float | None = None) -> tuple[float, float]:
        """Where this calibration's own false-alarm rate at ``rate`` lies with 95 % probability."""
        return realised_range(self.n, self._rate(rate))

    def too_few(self, rate: float | None = None) -> str | None:
        """The one-line warning where these scores are too few for ``rate``, else None."""
        return too_few(self.n, self._rate(rate))

    def p_values(self, scores: Any) -> np.ndarray:
        """Conformal p-values of ``scores`` (``p_values``)."""
        return p_values(self.scores, scores)

    def summary(self, rate: float | None = None) -> dict[str, Any]:
        """What a JSON answer says of the calibration its labels and p-values come from, at
        ``rate`` (default: the calibration's own, where it has one)."""
        rate = self.false_alarm_rate if rate is None else check_false_alarm_rate(rate)
        return {
            "false_alarm_rate": rate,
            "guaranteed_false_alarm_rate": None if rate is None else self.guaranteed_rate(rate),
            "calibration_images": self.n,
            "calibration_source": self.source,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: for the model file and an export's ``model.json``."""
        return {
            "scores": [float(s) for s in self.scores],
            "false_alarm_rate": self.false_alarm_rate,
            "source": self.source,
            "p_value": P_VALUE_MEANING,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls.of(data.get("scores", []), data.get("false_alarm_rate"), str(data.get("source", "")))

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Calibration:
        """An export's calibration from its ``model.json``; none (no p-values) in exports of older versions."""
        if "calibration" in metadata:
            return cls.from_dict(metadata["calibration"])
        return cls.of(
            [],
            None,
            "an export of an older fastflow, without calibration scores: export the model again for p-values",
        )
