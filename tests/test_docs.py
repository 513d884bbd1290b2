"""The metric catalogue, its documentation and the code that emits it stay in step."""

from __future__ import annotations

import re
from pathlib import Path

from analytics_jobs import metrics as analytics
from exporter import metrics

ROOT = Path(__file__).resolve().parents[1]


def test_docs_table_is_generated_from_the_catalogue() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    generated = text.split("<!-- BEGIN GENERATED -->\n", 1)[1].split("<!-- END GENERATED -->", 1)[0]
    assert generated == metrics.markdown_table(), "run: python -m exporter.metrics and paste into docs/metrics.md"
    generated = text.split("<!-- BEGIN GENERATED ANALYTICS -->\n", 1)[1].split("<!-- END GENERATED ANALYTICS -->")[0]
    assert generated == metrics.markdown_table(analytics.ALL)


def test_catalogue_follows_prometheus_conventions() -> None:
    specs = metrics.ALL + analytics.ALL
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for spec in specs:
        assert re.fullmatch(r"training_[a-z0-9_]+", spec.name), spec.name
        assert (spec.kind == "counter") == spec.name.endswith("_total"), spec.name
        if spec.unit:
            assert spec.name.endswith(f"_{spec.unit}") or f"_{spec.unit}_" in spec.name, spec.name
        if spec.kind == "histogram":
            assert list(spec.buckets) == sorted(spec.buckets) and len(spec.buckets) <= 15
        assert "run_id" not in spec.labels and spec.help.endswith(".")


def test_units_are_base_units() -> None:
    for spec in metrics.ALL + analytics.ALL:
        assert not re.search(r"_(milliseconds|ms|kilobytes|megabytes|mib|gib|percent)(_|$)", spec.name), spec.name
