"""An exporter's /metrics page read over HTTP, as samples keyed by (name, labels)."""

from __future__ import annotations

from collections.abc import Mapping

import requests
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, timeout: float = 2, headers: Mapping[str, str] | None = None) -> Samples:
    """Samples of one /metrics page keyed by (name, labels); an HTTP error status raises."""
    response = requests.get(url, headers=headers, timeout=timeout)
    response.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): float(s.value)
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The first sample named ``name`` whose labels include ``labels``, or None."""
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and set(labels.items()) <= sample_labels:
            return value
    return None
