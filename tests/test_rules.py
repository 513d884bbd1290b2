"""The Prometheus configuration and rules: valid, unit-tested with promtool, and in step with the metric
catalogue, the runbook and the threshold table at the top of the alerts file.

The promtool tests themselves live in prometheus/tests/*.yml; this module runs them and checks that they
cover every rule. Only the tests that run promtool are skipped when it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from analytics_jobs import metrics as analytics
from exporter import metrics

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "prometheus"
CONFIG = PROM / "prometheus.yml"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
ALERTS_FILE = PROM / "rules" / "training.alerts.yml"
TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/training-exporter/training-exporter/blob/main/docs/runbook.md#"

PROMTOOL = shutil.which("promtool")

SEVERITIES = {"critical", "warning", "info"}
COMPONENTS = {"training", "gradients", "optimizer", "evaluation", "throughput", "hardware", "analytics", "data",
              "exporter"}
ANNOTATIONS = {"summary", "description", "recommendation", "runbook_url"}
OPTIONAL_ANNOTATIONS = {"dashboard"}

# The names (and, where fixed, severities) that Alertmanager routing and the end-to-end test rely on.
CONTRACT: dict[str, set[str] | None] = {
    "TrainingLossNonFinite": {"critical"},
    "TrainingLossSpike": {"warning"},
    "TrainingLossPlateau": {"info"},
    "TrainingGradientExploding": None,
    "TrainingGradientVanishing": None,
    "TrainingLayerGradientExploding": None,
    "TrainingLayerGradientVanishing": None,
    "TrainingDeadLayers": None,
    "TrainingGradientImbalance": None,
    "TrainingLearningRateZero": None,
    "TrainingLearningRateFrozen": None,
    "TrainingPoorCalibration": None,
    "TrainingOverfitting": None,
    "TrainingExactMatchDrop": None,
    "TrainingThroughputDegraded": None,
    "TrainingStalled": None,
    "TrainingExporterDown": None,
    "TrainingExporterAbsent": None,
    "TrainingGpuHot": None,
    "TrainingGpuMemoryNearlyFull": None,
    "TrainingDiskNearlyFull": None,
    "TrainingWeightsExploding": {"warning", "critical"},
    "TrainingWeightsVanishing": {"warning", "critical"},
    "TrainingLayerDriftExcessive": None,
    "TrainingAnalyticsStale": None,
    "TrainingDatasetDrift": {"warning", "critical"},
}
# Their value is `up` (0) or a presence marker (1): the description states the fact instead.
NO_VALUE_IN_DESCRIPTION = {"TrainingExporterDown", "TrainingExporterAbsent"}

DURATION = r"\d+(?:ms|s|m|h|d|w|y)"
NUMBER = r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan", "offset"}


# ---------------------------------------------------------------- helpers


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in load(path)["groups"] for rule in group["rules"]]


def alerting_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recording_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def unit_tests() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, test) for path in TEST_FILES for test in load(path)["tests"]]


def alert_cases() -> list[tuple[str, dict[str, Any]]]:
    return [(name, case) for name, test in unit_tests() for case in test.get("alert_rule_test") or []]


def known_metrics() -> set[str]:
    names = {n for spec in metrics.ALL + analytics.ALL for n in metrics.exposed_names(spec)}
    return names | {"up"}


def strip_selectors(expr: str) -> str:
    """The expression without strings, label matchers, grouping label lists, ranges and offsets."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return re.sub(r"\boffset\s+-?\w+", "", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers that are not functions, aggregations or keywords)."""
    found = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", strip_selectors(expr)):
        if m.group(2) is None and m.group(1).lower() not in KEYWORDS:
            found.add(m.group(1))
    return found


def literals(expr: str) -> tuple[set[str], set[float]]:
    """Durations (ranges, subquery steps, offsets) and numbers written in an expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"(?<![\w.:])[a-zA-Z_:][\w:]*", " ", expr)  # identifiers, including rate15m in a rule name
    durations = set(re.findall(rf"(?<![\w.])({DURATION})(?![\w.])", expr))
    expr = re.sub(rf"(?<![\w.])(?:{DURATION})(?![\w.])", " ", expr)
    numbers = {float(n) for n in re.findall(rf"(?<![\w.])({NUMBER})(?![\w.])", expr)}
    return durations, numbers


def threshold_table() -> list[dict[str, Any]]:
    """Rows of the commented table at the top of the alerts file (continuation lines joined)."""
    header = ALERTS_FILE.read_text().split("\ngroups:", 1)[0]
    rows: list[dict[str, Any]] = []
    for line in header.splitlines():
        row = re.match(r"# (Training\w+)\s+(critical|warning|info)\s+(\S+)\s+(.*)$", line)
        if row:
            rows.append({"alert": row[1], "severity": row[2], "for": row[3], "text": row[4]})
        elif rows and re.match(r"#\s{20,}\S", line):
            rows[-1]["text"] += " " + line[1:].strip()
    for row in rows:
        row["tokens"] = re.findall(r"`([^`]+)`", row["text"])
    return rows


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")


# ------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_check_config() -> None:
    res = promtool("check", "config", str(CONFIG.relative_to(ROOT)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout + res.stderr, res.stdout + res.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    res = promtool("check", "rules", *(str(p.relative_to(ROOT)) for p in RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert TEST_FILES
    res = promtool("test", "rules", *(str(p.relative_to(ROOT)) for p in TEST_FILES))
    assert res.returncode == 0 and "FAILED" not in res.stdout + res.stderr, res.stdout + res.stderr


# ------------------------------------------------------------------ coverage


def test_every_alert_fires_and_stays_quiet_in_a_unit_test() -> None:
    firing: dict[str, set[str]] = {}
    quiet: set[str] = set()
    for _, case in alert_cases():
        exp = case.get("exp_alerts") or []
        if not exp:
            quiet.add(case["alertname"])
        for alert in exp:
            firing.setdefault(case["alertname"], set()).add(alert["exp_labels"]["severity"])
            # Annotations are compared exactly by promtool only when they are given.
            assert set(alert.get("exp_annotations") or {}) >= ANNOTATIONS, (case["alertname"], alert)
    for rule in alerting_rules():
        name, severity = rule["alert"], rule["labels"]["severity"]
        assert severity in firing.get(name, set()), f"no test where {name} ({severity}) fires"
        assert name in quiet, f"no test where {name} must not fire (exp_alerts: [])"


def test_every_recording_rule_has_an_expression_test() -> None:
    tested = " ".join(
        case["expr"] for _, test in unit_tests() for case in test.get("promql_expr_test") or []
    )
    for name in recording_names():
        assert re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", tested), f"no promql_expr_test for {name}"


def test_every_alert_keeps_run_id() -> None:
    with_run_id = {
        case["alertname"]
        for _, case in alert_cases()
        for alert in case.get("exp_alerts") or []
        if alert["exp_labels"].get("run_id")
    }
    assert {r["alert"] for r in alerting_rules()} <= with_run_id
    # Only an exporter that never published a run has nothing to take run_id from.
    for _, case in alert_cases():
        for alert in case.get("exp_alerts") or []:
            assert alert["exp_labels"].get("run_id") or case["alertname"] == "TrainingExporterDown", case


# ----------------------------------------------------------- metric names


def test_rules_only_use_catalogue_metrics() -> None:
    allowed = known_metrics() | recording_names()
    for rule in rules():
        unknown = metric_names(rule["expr"]) - allowed
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {sorted(unknown)}"


def test_metric_name_parser_sees_what_it_should() -> None:
    expr = (
        'max without (layer) (max_over_time(training_grad_norm{job=~"a|b"}[2m:1m] offset 5m) < +Inf) '
        "and on (run_id) up == 0 or count without () (training_loss unless (training_loss < Inf > -Inf))"
    )
    assert metric_names(expr) == {"training_grad_norm", "up", "training_loss"}
    assert literals("x[5m:] offset 1h > 1e-07 and run:y:rate15m < 0.7 * q[6h:1m] >= 5") == (
        {"5m", "1h", "6h", "1m"}, {1e-07, 0.7, 5.0})


def test_unit_test_series_use_catalogue_metrics() -> None:
    allowed = known_metrics() | recording_names()
    for file, test in unit_tests():
        for series in test.get("input_series") or []:
            name = re.match(r"[a-zA-Z_:][\w:]*", series["series"])
            assert name and name.group(0) in allowed, (file, series["series"])


# ----------------------------------------------------- labels, annotations


def test_alerts_have_severity_component_and_annotations() -> None:
    for rule in alerting_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Training[A-Z][A-Za-z]+", name), name
        assert set(rule["labels"]) == {"severity", "component"}, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["labels"]["component"] in COMPONENTS, name
        ann = rule["annotations"]
        assert ANNOTATIONS <= set(ann) <= ANNOTATIONS | OPTIONAL_ANNOTATIONS, name
        assert ann["runbook_url"] == RUNBOOK_URL + name.lower(), name
        assert "{{" not in ann["summary"], f"{name}: the summary is a fixed sentence"
        assert "$labels.run_id" in ann["description"], name
        assert "$value" in ann["description"] or name in NO_VALUE_IN_DESCRIPTION, name
        assert ann["recommendation"].strip(), name


def test_contract_names_and_severities() -> None:
    by_name: dict[str, set[str]] = {}
    for rule in alerting_rules():
        by_name.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    for name, severities in CONTRACT.items():
        assert name in by_name, f"missing alert {name}"
        if severities is not None:
            assert by_name[name] == severities, name
    for rule in alerting_rules():
        if rule["alert"] in ("TrainingLossNonFinite", "TrainingLossSpike"):
            # Notified within seconds at a 1 s evaluation interval; a one-step spike is caught.
            assert rule.get("for", "0s") == "0s", rule["alert"]
        if rule["alert"] == "TrainingLossNonFinite":
            # Resolves a minute after the last non-finite step (the end-to-end test waits for it).
            assert "increase(training_nonfinite_loss_total[1m])" in rule["expr"]


def test_runbook_has_one_section_per_alert() -> None:
    headings = re.findall(r"^## (.+)$", RUNBOOK.read_text(), flags=re.M)
    names = {r["alert"] for r in alerting_rules()}
    assert len(headings) == len(set(headings))
    assert set(headings) == names
    for heading in headings:
        assert github_anchor(heading) == heading.lower()
    text = RUNBOOK.read_text()
    for name in names:
        section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Meaning.**", "**Likely causes.**", "**What to do.**"):
            assert part in section, (name, part)


# ------------------------------------------------------------ thresholds


def test_threshold_table_matches_the_rules() -> None:
    table = threshold_table()
    rows = {(row["alert"], row["severity"]): row for row in table}
    assert len(rows) == len(table), "one row per (alert, severity)"
    rule_keys = set()
    for rule in alerting_rules():
        key = (rule["alert"], rule["labels"]["severity"])
        rule_keys.add(key)
        assert key in rows, f"no threshold table row for {key}"
        row = rows[key]
        assert row["for"] == rule.get("for", "0s"), key
        durations, numbers = literals(rule["expr"])
        table_durations = {t for t in row["tokens"] if re.fullmatch(DURATION, t)}
        table_numbers = {float(t) for t in row["tokens"] if not re.fullmatch(DURATION, t)}
        assert table_durations == durations, (key, "windows differ", table_durations, durations)
        assert table_numbers == numbers - {0.0, 1.0}, (key, "numbers differ", table_numbers, numbers)
    assert set(rows) == rule_keys, "rows without a rule"


def test_threshold_checker_catches_a_mismatch() -> None:
    durations, numbers = literals("min_over_time(training_grad_norm[2m]) > 100")
    assert durations == {"2m"} and numbers == {100.0}
    assert literals("min_over_time(training_grad_norm[3m]) > 120") != (durations, numbers)


# ------------------------------------------------------------ configuration


def test_prometheus_config_scrapes_both_exporters() -> None:
    config = load(CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"
    assert config["rule_files"] == ["rules/*.yml"]
    am = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == ["alertmanager:9093"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["training"]["static_configs"][0]["targets"] == ["host.docker.internal:9945"]
    assert jobs["training-analytics"]["static_configs"][0]["targets"] == ["host.docker.internal:9946"]
    patterns = [f for sd in jobs["training"]["file_sd_configs"] for f in sd["files"]]
    files = sorted(p for pattern in patterns for p in (CONFIG.parent).glob(pattern))
    # The example is not loaded (it would be two targets always down) but has the loaded format.
    example = CONFIG.parent / "targets" / "training.json.example"
    assert example not in files
    for path in [*files, example]:
        for group in json.loads(path.read_text()):
            assert group["targets"] and all(re.fullmatch(r"[\w.\-]+:\d+", t) for t in group["targets"])
            # A run_id target label would rename the exporter's own to exported_run_id.
            assert "run_id" not in group.get("labels", {}), path
