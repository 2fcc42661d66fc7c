"""Percentiles of one run, and medians with min-max over the rounds of a run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100) of unsorted `values`."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    """One measure over the rounds of a run."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def valid(self) -> bool:
        return self.rounds > 0 and not math.isnan(self.median)


MISSING = Summary(math.nan, math.nan, math.nan, 0)


@dataclass
class Results:
    """Every value measured in a run, by key, one value per round."""

    values: dict[str, list[float]] = field(default_factory=dict)
    # Facts of the run shown with the results (message sizes, counts...).
    facts: dict[str, str] = field(default_factory=dict)
    # Sections that failed: the run did not measure what it should.
    errors: list[str] = field(default_factory=list)
    # Things worth knowing that do not invalidate the run.
    notes: list[str] = field(default_factory=list)
    # Structured findings that are not one value per round (profiles), JSON-ready.
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def summary(self, key: str) -> Summary:
        values = [v for v in self.values.get(key, []) if not math.isnan(v)]
        if not values:
            return MISSING
        return Summary(statistics.median(values), min(values), max(values), len(values))

    def median(self, key: str) -> float:
        return self.summary(key).median

    def ratio(self, numerator: str, denominator: str) -> float:
        """The ratio of two medians (NaN when either is missing or the denominator is 0)."""
        top, bottom = self.median(numerator), self.median(denominator)
        if math.isnan(top) or math.isnan(bottom) or bottom == 0:
            return math.nan
        return top / bottom
