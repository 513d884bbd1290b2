"""The metric catalogue, its documentation and the code that emits it stay in step; the generated sections
of the docs (docs/generate.py) are what the code writes."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from analytics_jobs import metrics as analytics
from exporter import metrics

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "docs" / "generate.py"


def load_generator() -> ModuleType:
    """docs/generate.py as a module (it is a script, not an installed package)."""
    spec = importlib.util.spec_from_file_location("docs_generate", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_docs_table_is_generated_from_the_catalogue() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    generated = text.split("<!-- BEGIN GENERATED -->\n", 1)[1].split("<!-- END GENERATED -->", 1)[0]
    assert generated == metrics.markdown_table(), "run: python docs/generate.py (or make docs)"
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


def test_generated_docs_are_what_the_code_writes() -> None:
    res = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr + "\nrun: python docs/generate.py (or make docs)"


def test_generator_check_names_a_stale_file(tmp_path: Path) -> None:
    generator = load_generator()
    for name in generator.SECTIONS:
        shutil.copy(ROOT / "docs" / name, tmp_path / name)
    assert generator.main(["--check", "--docs", str(tmp_path)]) == 0
    runbook = tmp_path / "runbook.md"
    runbook.write_text(runbook.read_text().replace("| `max_norm` = `100` |", "| `max_norm` = `120` |", 1))
    assert generator.differences(tmp_path) == [f"{runbook}: stale, differs from the code"]
    assert generator.main(["--check", "--docs", str(tmp_path)]) == 1
    # Writing mends it, and leaves the hand-written text around the markers as it was.
    assert generator.main(["--docs", str(tmp_path)]) == 0
    assert runbook.read_text() == (ROOT / "docs" / "runbook.md").read_text()
    assert generator.differences(tmp_path) == []


def test_generator_refuses_a_file_without_its_markers(tmp_path: Path) -> None:
    generator = load_generator()
    for name in generator.SECTIONS:
        shutil.copy(ROOT / "docs" / name, tmp_path / name)
    metrics_md = tmp_path / "metrics.md"
    metrics_md.write_text(metrics_md.read_text().replace("<!-- END GENERATED ANALYTICS -->", ""))
    with pytest.raises(ValueError, match="END GENERATED ANALYTICS"):
        generator.render(tmp_path)
    assert generator.main(["--check", "--docs", str(tmp_path)]) == 2
