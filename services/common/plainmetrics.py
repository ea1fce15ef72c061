"""Prometheus histograms for hot paths, kept in plain numbers.

prometheus_client's Histogram takes a lock and walks its buckets in Python
on every observation, and a labelled one looks its child up first: about
half a microsecond, paid per request or per event. A worker process here is
one thread, so a histogram can be a list of counts bumped with ``bisect``
and handed to Prometheus at scrape time by a collector. Register it with
``registry.register(histogram)``; it exports the usual ``_bucket``,
``_count`` and ``_sum`` series.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class PlainHistogram:
    """A histogram with optional labels; ``observe(seconds, *label_values)``."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(sorted(float(b) for b in buckets))
        self._bound_names = (*map(floatToGoString, self._bounds), "+Inf")
        self._labelnames = list(labelnames)
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts = self._counts.get(labels)
        if counts is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self.name} takes labels {self._labelnames}, got {labels}")
            counts = self._counts[labels] = [0] * (len(self._bounds) + 1)
            self._sums[labels] = 0.0
        # bisect_left: a value equal to a bound counts in that bound's bucket (le).
        counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sums[labels] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self._labelnames)
        for labels, counts in sorted(self._counts.items()):
            cumulative, running = [], 0
            for bound, n in zip(self._bound_names, counts, strict=True):
                running += n
                cumulative.append((bound, running))
            family.add_metric(list(labels), cumulative, self._sums[labels])
        yield family
