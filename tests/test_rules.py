"""The Prometheus configuration and rules: valid, unit-tested with promtool, and in step with the metric
catalogue, the runbook and the thresholds of exporter/thresholds.py.

The promtool tests themselves live in prometheus/tests/*.yml; this module runs them and checks that they
cover every rule. Only the tests that run promtool are skipped when it is missing.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from support.runif import run_if

from analytics_jobs import metrics as analytics
from exporter import metrics, thresholds

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "prometheus"
CONFIG = PROM / "prometheus.yml"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
# One file per group: <area>.alerts.yml holds the group training-<area>.alerts.
ALERT_FILES = sorted((PROM / "rules").glob("*.alerts.yml"))
AREAS = {"loss", "gradients", "optimizer", "evaluation", "throughput", "exporter", "hardware", "data", "analytics",
         "checkpoints", "meta"}

TEST_FILES = sorted((PROM / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/training-exporter/training-exporter/blob/main/docs/runbook.md#"

PROMTOOL = shutil.which("promtool")

SEVERITIES = {"critical", "warning", "info"}
COMPONENTS = {"training", "gradients", "optimizer", "evaluation", "throughput", "hardware", "analytics", "data",
              "exporter", "meta"}
# The alerting chain's own alerts (meta.alerts.yml, component meta) are about no run: they carry no run_id.
META_COMPONENT = "meta"
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
    # Its own receiver (deadmansswitch); info so that, routed anywhere else, it ends in the daily digest.
    "TrainingAlertingWatchdog": {"info"},
    # Critical: training-critical notifies Slack and email, so a failure of either is heard through the other.
    "TrainingAlertNotificationsFailing": {"critical"},
}
# The dead man's switch (alertmanager/alertmanager.yml routes it to its own receiver).
ALWAYS_FIRING = {"TrainingAlertingWatchdog"}
# Their value is `up` (0) or a presence marker (1): the description states the fact instead.
NO_VALUE_IN_DESCRIPTION = {"TrainingExporterDown", "TrainingExporterAbsent", "TrainingAlertingWatchdog",
                           "TrainingConfigReloadFailed"}

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


def meta_alerts() -> set[str]:
    return {r["alert"] for r in alerting_rules() if r["labels"]["component"] == META_COMPONENT}


def recording_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def unit_tests() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, test) for path in TEST_FILES for test in load(path)["tests"]]


def alert_cases() -> list[tuple[str, dict[str, Any]]]:
    return [(name, case) for name, test in unit_tests() for case in test.get("alert_rule_test") or []]


# Series of other exporters that rules may join with this project's (on UUID): not in the catalogue.
# DCGM_FI_DEV_XID_ERRORS: NVIDIA's DCGM exporter, the XID source where NVML events are not available.
EXTERNAL_METRICS = {"DCGM_FI_DEV_XID_ERRORS"}
# The alerting chain's own series (meta.alerts.yml): Prometheus's and Alertmanager's (scrape jobs prometheus and
# alertmanager), and Prometheus's series of each scrape besides `up`.
CHAIN_METRICS = {
    "alertmanager_notifications_failed_total", "alertmanager_config_last_reload_successful",
    "prometheus_notifications_errors_total", "prometheus_notifications_alertmanagers_discovered",
    "prometheus_rule_evaluation_failures_total", "prometheus_rule_group_iterations_missed_total",
    "prometheus_config_last_reload_successful", "scrape_samples_scraped",
}


def known_metrics() -> set[str]:
    names = {n for spec in metrics.ALL + analytics.ALL for n in metrics.exposed_names(spec)}
    return names | {"up"} | EXTERNAL_METRICS | CHAIN_METRICS


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


def threshold_mismatches(rule: dict[str, Any], entry: thresholds.AlertThresholds) -> list[str]:
    """How an alerting rule differs from its thresholds entry: `for`, `keep_firing_for`, the windows and the
    numbers of its expr (other than 0 and 1) against the entry's (empty when they agree)."""
    problems = []
    if entry.for_ != rule.get("for", "0s"):
        problems.append(f"for: {entry.for_} in the entry, {rule.get('for', '0s')} in the rule")
    if entry.keep_firing_for != rule.get("keep_firing_for", "0s"):
        problems.append(f"keep_firing_for: {entry.keep_firing_for} in the entry, "
                        f"{rule.get('keep_firing_for', '0s')} in the rule")
    durations, numbers = literals(rule["expr"])
    table_durations = {w.duration for w in entry.windows.values()}
    table_numbers = {float(n.value) for n in entry.numbers.values()}
    if table_durations != durations:
        problems.append(f"windows differ: {sorted(table_durations)} in the entry, {sorted(durations)} in the rule")
    if table_numbers != numbers - {0.0, 1.0}:
        problems.append(f"numbers differ: {sorted(table_numbers)} in the entry, "
                        f"{sorted(numbers - {0.0, 1.0})} in the rule")
    return problems


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


needs_promtool = run_if(promtool=True)


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
        if name in ALWAYS_FIRING:
            # A dead man's switch has no quiet case: it must fire whatever the series, without a `for`.
            assert rule["expr"].strip() == "vector(1)" and "for" not in rule, name
            continue
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
    meta = meta_alerts()
    assert {r["alert"] for r in alerting_rules()} - meta <= with_run_id
    # Only an exporter that never published a run has nothing to take run_id from; the chain's alerts have none.
    for _, case in alert_cases():
        for alert in case.get("exp_alerts") or []:
            if case["alertname"] in meta:
                assert "run_id" not in alert["exp_labels"], case
                continue
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
        assert "$labels.run_id" in ann["description"] or rule["labels"]["component"] == META_COMPONENT, name
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


def test_thresholds_match_the_rules() -> None:
    table = thresholds.ALERTS
    rows = {(entry.alert, entry.severity): entry for entry in table}
    assert len(rows) == len(table), "one entry per (alert, severity)"
    rule_keys = set()
    for rule in alerting_rules():
        key = (rule["alert"], rule["labels"]["severity"])
        assert key not in rule_keys, f"two rules for {key}"
        rule_keys.add(key)
        assert key in rows, f"no entry in exporter/thresholds.py for {key}"
        assert threshold_mismatches(rule, rows[key]) == [], key
    assert set(rows) == rule_keys, "entries without a rule"


def test_threshold_entries_are_complete() -> None:
    for entry in thresholds.ALERTS:
        assert entry.when.strip() and entry.severity in SEVERITIES, entry.alert
        whys = {name: n.why for name, n in entry.numbers.items()} | {name: w.why for name, w in entry.windows.items()}
        assert len(whys) == len(entry.numbers) + len(entry.windows), (entry.alert, "a name used twice")
        for name, why in whys.items():
            assert re.fullmatch(r"[a-z][a-z0-9_]*", name) and why.strip(), (entry.alert, name)
        for window in entry.windows.values():
            assert re.fullmatch(DURATION, window.duration), (entry.alert, window)
        # The one-line description names only the entry's own values.
        named = set(re.findall(r"`(\w+)`", entry.when))
        assert named <= set(entry.numbers) | set(entry.windows), (entry.alert, named)
    for name, setting in thresholds.SETTINGS.items():
        assert name.isupper() and setting.why.strip() and setting.used_by.strip(), name


def test_threshold_checker_catches_a_mismatch() -> None:
    durations, numbers = literals("min_over_time(training_grad_norm[2m]) > 100")
    assert durations == {"2m"} and numbers == {100.0}
    assert literals("min_over_time(training_grad_norm[3m]) > 120") != (durations, numbers)
    rule = {"expr": "min_over_time(training_grad_norm[2m]) > 100", "for": "5m"}
    entry = thresholds.GRADIENT_EXPLODING
    assert threshold_mismatches(rule, entry) == []
    assert threshold_mismatches({**rule, "expr": "min_over_time(training_grad_norm[3m]) > 100"}, entry)
    assert threshold_mismatches({**rule, "expr": "min_over_time(training_grad_norm[2m]) > 120"}, entry)
    assert threshold_mismatches({**rule, "expr": "min_over_time(training_grad_norm[2m]) > 100 < 1e3"}, entry)
    assert threshold_mismatches({**rule, "for": "10m"}, entry)
    assert threshold_mismatches({**rule, "keep_firing_for": "5m"}, entry)
    assert threshold_mismatches(rule, dataclasses.replace(entry, keep_firing_for="5m"))
    assert threshold_mismatches(rule, dataclasses.replace(entry, windows={}))


def test_thresholds_module_imports_no_project_module_and_nothing_heavy() -> None:
    tree = ast.parse((ROOT / "exporter" / "thresholds.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative import"
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "collections", "dataclasses", "re", "typing"}, imported


# ------------------------------------------------------------ files


def test_one_alerts_file_per_group() -> None:
    assert {path.name.removesuffix(".alerts.yml") for path in ALERT_FILES} == AREAS
    for path in ALERT_FILES:
        groups = load(path)["groups"]
        assert [g["name"] for g in groups] == [f"training-{path.name.removesuffix('.alerts.yml')}.alerts"], path
        assert all("alert" in rule for rule in groups[0]["rules"]), path
    # Component meta is the alerting chain's, and only meta.alerts.yml's.
    in_meta_file = {r["alert"] for g in load(PROM / "rules" / "meta.alerts.yml")["groups"] for r in g["rules"]}
    assert in_meta_file == meta_alerts()
    for path in RULE_FILES:
        # Recording rules live in <name>.rules.yml files, one per subject.
        assert path in ALERT_FILES or path.name.endswith(".rules.yml"), path


def test_unit_test_rule_files_exist() -> None:
    for path in TEST_FILES:
        rule_files = load(path)["rule_files"]
        assert rule_files, path
        for name in rule_files:
            assert (path.parent / name).resolve() in RULE_FILES, (path.name, name)


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
    # Meta-monitoring (meta.alerts.yml) reads Prometheus's and Alertmanager's own series.
    assert jobs["prometheus"]["static_configs"][0]["targets"] == ["localhost:9090"]
    assert jobs["alertmanager"]["static_configs"][0]["targets"] == am
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
