"""Percentiles and Prometheus histogram reading for the benchmark report."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, median, p95, p99, min, max of `values`."""
    return {
        "n": len(values),
        "median": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
    }


_BUCKET = re.compile(r"^(\w+)_bucket\{(.*)\} ([0-9.e+-]+|\+Inf)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def histogram_buckets(text: str, metric: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of `metric` by its `source` label: {source: {le: n}}."""
    found: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        match = _BUCKET.match(line)
        if match is None or match.group(1) != metric:
            continue
        labels = dict(_LABEL.findall(match.group(2)))
        le = labels.get("le", "+Inf")
        bound = math.inf if le == "+Inf" else float(le)
        found.setdefault(labels.get("source", ""), {})[bound] = float(match.group(3))
    return found


def histogram_quantile(
    before: dict[float, float], after: dict[float, float], q: float
) -> float:
    """The upper bound of the bucket holding the q-th percentile of the new samples."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    total = deltas[-1] if deltas else 0.0
    if total <= 0:
        return math.nan
    for bound, cumulative in zip(bounds, deltas, strict=True):
        if cumulative >= total * q / 100:
            return bound
    return math.inf
