"""The Grafana dashboards: generated from code, wired to the catalogue, the rules and the provisioning.

The committed JSON (grafana/dashboards/) is what grafana/generate.py writes;
every dashboard has a fixed uid, tags, a prometheus ``datasource`` variable
used by every panel, query, variable and annotation, the chained ``job`` ->
``instance`` -> ``run_id`` variables, links to the others and a unit on every
panel; every metric a query names is in exporter/metrics.py,
analytics_jobs/metrics.py or the recording rules, and every query parses
(promtool). tests/test_dashboards_e2e.py runs every query against a real
Prometheus scraping a real demo run.

The helpers here (query extraction, PromQL name extraction, variable
substitution) are shared with that test.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from analytics_jobs import metrics as analytics_metrics
from exporter import metrics

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
RULES_DIR = ROOT / "prometheus" / "rules"
EXPECTED_UIDS = {"training-run", "training-layers", "training-evaluation", "training-hardware",
                 "training-systems"}
CHAIN = ("job", "instance", "run_id")
# Labels Prometheus or the exporter's constant labels add to every series.
TARGET_LABELS = {"job", "instance", "run_id", "rank"}
# Labels of Prometheus's ALERTS series: the rule's labels plus the series'.
ALERTS_LABELS = {"alertname", "alertstate", "severity", "component", *TARGET_LABELS}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_BRACES = re.compile(r'\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}')
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NUMBER = re.compile(r"(?<![\w:.])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
             "bool", "inf", "nan", "Inf", "NaN", "atan2"}
_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)\s*$")


# --------------------------------------------------------------------------- shared helpers


def load_generator() -> ModuleType:
    """grafana/generate.py as a module (it is a script, not an installed package)."""
    # The SDK needs Python >= 3.11 (pyproject.toml installs it there only).
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk needs Python >= 3.11")
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    """uid -> dashboard JSON, as committed."""
    loaded = [json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))]
    return {dash["uid"]: dash for dash in loaded}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows and their collapsed children flattened, rows themselves left out)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool
    kind: str  # "panel", "variable" or "annotation"


def queries(dashboard: dict[str, Any]) -> Iterator[Query]:
    """Every PromQL query of a dashboard: panel targets, query variables (label_values), annotations."""
    uid = dashboard["uid"]
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield Query(uid, panel["title"], target["refId"], target["expr"], bool(target.get("instant")), "panel")
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            yield Query(uid, f"${var['name']}", "", var["query"], True, "variable")
    for annotation in dashboard["annotations"]["list"]:
        if annotation.get("expr"):
            yield Query(uid, annotation["name"], "", annotation["expr"], False, "annotation")


def split_label_values(query: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> (selector, label)."""
    match = _LABEL_VALUES.match(query)
    assert match and match["selector"], f"not label_values(selector, label): {query}"
    return match["selector"], match["label"]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (or label_values query) reads, including ``__name__=~"a|b"``."""
    match = _LABEL_VALUES.match(expr)
    if match:
        expr = match["selector"] or ""
    names: set[str] = set()
    for body in _BRACES.findall(expr):
        for label, op, value in _MATCHER.findall(body):
            if label == "__name__":
                assert op in ("=", "=~"), expr
                names.update(value.split("|"))
    bare = _BRACES.sub(" ", _STRING.sub('""', expr))
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\boffset\s+-?(\d+[a-z]+)+|@\s*[\w.()]+", " ", bare)
    bare = _GROUPING.sub(" ", bare)
    bare = _NUMBER.sub(" ", bare)
    for token in _IDENT.finditer(bare):
        name = token.group()
        if name in _KEYWORDS or re.match(r"\s*\(", bare[token.end():]):
            continue  # an operator keyword or a function call
        names.add(name)
    return names


def selectors(expr: str) -> Iterator[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric name, {label: (operator, value)}) of every ``name{...}`` selector."""
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*" + _BRACES.pattern, expr):
        yield match[1], {label: (op, value) for label, op, value in _MATCHER.findall(match[2])}


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by / without / on / ignoring / group_left / group_right clauses."""
    found: set[str] = set()
    for _, labels in _GROUPING.findall(_STRING.sub('""', expr)):
        found.update(label.strip() for label in labels.split(",") if label.strip())
    return found


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus query: an escaped alternation.

    Grafana escapes regex metacharacters with a backslash that is itself
    escaped for the PromQL string (``\\\\.``), and wraps several values in
    parentheses.
    """
    escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, list[str]], *, interval_s: float, range_s: float,
               rate_interval_s: float) -> str:
    """``expr`` with Grafana's built-in and the dashboard's template variables replaced."""
    builtins = {"__rate_interval": f"{rate_interval_s:.0f}s", "__interval": f"{interval_s:.0f}s",
                "__range": f"{range_s:.0f}s", "__range_s": f"{range_s:.0f}"}
    values = {**builtins, **{name: grafana_regex(vals) for name, vals in variables.items()}}

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    # Longest names first: $__range_s before $__range.
    return re.sub(r"\$\{(\w+)\}|\$(__range_s|__rate_interval|__interval|__range|\w+)", replace, expr)


def recording_rules() -> dict[str, str]:
    """Recorded name -> its expression, from prometheus/rules/*.yml."""
    rules: dict[str, str] = {}
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            for rule in group.get("rules", []):
                if "record" in rule:
                    rules[rule["record"]] = rule["expr"]
    return rules


def catalogue() -> dict[str, metrics.MetricSpec]:
    """Every sample name the two exporters expose -> its family."""
    return {name: spec for spec in metrics.ALL + analytics_metrics.ALL for name in metrics.exposed_names(spec)}


def families_read(expr: str, rules: dict[str, str] | None = None) -> set[str]:
    """Exporter sample names ``expr`` reads, through recording rules too."""
    rules = recording_rules() if rules is None else rules
    found: set[str] = set()
    pending = list(metric_names(expr))
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        if name in rules:
            pending.extend(metric_names(rules[name]))
    return found - set(rules)


# --------------------------------------------------------------------------- tests


def test_committed_json_is_what_the_code_generates() -> None:
    generator = load_generator()
    assert generator.differences() == [], "run: python grafana/generate.py (or make dashboards)"
    assert {f"{name}.json" for name in generator.DASHBOARDS} == {p.name for p in DASHBOARD_DIR.glob("*.json")}


def test_the_check_mode_catches_an_edited_file(tmp_path: Path) -> None:
    generator = load_generator()
    for name, text in generator.render().items():
        (tmp_path / name).write_text(text)
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0
    edited = tmp_path / "training-run.json"
    edited.write_text(edited.read_text().replace('"Training run"', '"Renamed by hand"'))
    assert generator.differences(tmp_path) == ["training-run.json: differs from the code"]
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1


def test_each_dashboard_has_uid_tags_links_and_the_alert_annotation() -> None:
    scrape_interval = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    dashes = dashboards()
    assert set(dashes) == EXPECTED_UIDS
    for uid, dash in dashes.items():
        assert "training-exporter" in dash["tags"] and len(dash["tags"]) >= 2, uid
        assert dash["title"] and dash["description"], uid
        link = next(link for link in dash["links"] if link["type"] == "dashboards")
        assert "training-exporter" in link["tags"] and link["includeVars"] and link["keepTime"], uid
        annotation = next(a for a in dash["annotations"]["list"] if a["name"] == "Alerts")
        assert annotation["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, uid
        assert annotation["enable"] and "ALERTS{" in annotation["expr"] and '"$run_id"' in annotation["expr"]
        assert annotation["titleFormat"] == "{{alertname}}"
        # One point per scrape: a one-minute alert (a NaN loss) still shows as a region.
        assert annotation["step"] == scrape_interval, uid


def test_datasource_variable_and_the_chained_job_instance_run_variables() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prometheus_uid = next(ds["uid"] for ds in provisioned["datasources"] if ds["type"] == "prometheus")
    for uid, dash in dashboards().items():
        variables = dash["templating"]["list"]
        assert [v["name"] for v in variables] == ["datasource", *CHAIN], uid
        datasource = variables[0]
        assert datasource["type"] == "datasource" and datasource["query"] == "prometheus", uid
        assert datasource["current"]["value"] == prometheus_uid, uid
        anchors = set()
        for position, var in enumerate(variables[1:]):
            assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}", (uid, var["name"])
            assert var["multi"], (uid, var["name"])
            selector, label = split_label_values(var["query"])
            assert label == var["name"], (uid, var["query"])
            # Each variable is filtered by the ones before it in the chain, and only by those.
            used = set(re.findall(r"\$(\w+)", selector))
            assert used == set(CHAIN[:position]), (uid, var["query"])
            for name in used:
                assert f'{name}=~"${name}"' in selector, (uid, var["query"])
            anchors.add(_BRACES.sub("", selector) + str(sorted(metric_names(selector))))
        assert len(anchors) == 1, f"{uid}: the three variables read different series: {anchors}"


def test_every_panel_uses_the_datasource_variable_and_has_a_unit() -> None:
    # Panels are written for the Grafana the stack runs (their pluginVersion
    # keeps Grafana from migrating them as if saved by an older version).
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana_version = compose["services"]["grafana"]["image"].rpartition(":")[2]
    for uid, dash in dashboards().items():
        seen_titles: set[str] = set()
        for panel in panels(dash):
            where = (uid, panel.get("title"))
            assert panel["title"] not in seen_titles, f"duplicate panel title {where}"
            seen_titles.add(panel["title"])
            assert panel.get("description"), where
            assert panel.get("pluginVersion") == grafana_version, where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"], where
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)) and all(refs), where
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
                assert target["expr"].strip(), where
            unit = panel["fieldConfig"]["defaults"].get("unit")
            assert isinstance(unit, str) and unit.strip(), f"no unit on {where}"


def test_panels_fit_the_grid_without_overlapping() -> None:
    for uid, dash in dashboards().items():
        cells: dict[tuple[int, int], str] = {}
        for panel in dash["panels"]:
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, (uid, panel["title"], pos)
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{uid}: {panel['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = panel["title"]


def test_every_metric_a_query_reads_is_in_the_catalogue_or_the_rules() -> None:
    known = set(catalogue()) | set(recording_rules()) | {"ALERTS"}
    for dash in dashboards().values():
        for query in queries(dash):
            names = metric_names(query.expr)
            assert names, f"no metric found in {query}"
            unknown = names - known
            assert not unknown, f"{query.dashboard} / {query.panel}: unknown metric(s) {sorted(unknown)}"
    # The rules' own inputs must exist too, or a panel reading a rule shows nothing.
    for record, expr in recording_rules().items():
        assert metric_names(expr) <= known, record


def test_every_selector_filters_on_job_instance_and_run() -> None:
    spec_of = catalogue()
    rules = recording_rules()
    for dash in dashboards().values():
        for query in queries(dash):
            if query.kind == "variable":
                continue
            blanked = _BRACES.sub("{}", _STRING.sub('""', query.expr))
            for name in metric_names(query.expr):
                # A bare metric name would ignore the variables.
                assert re.search(rf"(?<![\w:]){re.escape(name)}\{{", blanked), f"bare {name} in {query}"
            for name, matchers in selectors(query.expr):
                where = f"{query.dashboard} / {query.panel}: {name}"
                wanted = ("run_id",) if name == "ALERTS" else CHAIN
                for label in wanted:
                    assert matchers.get(label) == ("=~", f"${label}"), f"{where} lacks {label}=~\"${label}\""
                allowed = ALERTS_LABELS if name == "ALERTS" else TARGET_LABELS | set(
                    spec_of[name].labels if name in spec_of else _rule_labels(name, rules, spec_of))
                assert set(matchers) <= allowed, f"{where}: unknown label(s) {set(matchers) - allowed}"
            labels_in_expr = set().union(*(
                set(spec_of[n].labels) if n in spec_of else _rule_labels(n, rules, spec_of)
                for n in metric_names(query.expr)))
            grouping = grouping_labels(query.expr)
            assert grouping <= labels_in_expr | TARGET_LABELS, f"{query}: grouping by unknown {grouping}"


def _rule_labels(record: str, rules: dict[str, str], spec_of: dict[str, metrics.MetricSpec]) -> set[str]:
    """Labels a recorded series may carry: those of the families its expression reads (an upper bound)."""
    return {label for name in families_read(record, rules) if name in spec_of for label in spec_of[name].labels} | {
        "quantile"}


def test_every_query_parses(tmp_path: Path) -> None:
    """All queries, with the variables substituted as Grafana would, go through promtool's parser."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian package prometheus; `make setup` installs it)")
    rules = []
    variables = {"job": ["training", "training-analytics"], "instance": ["host.docker.internal:9945"],
                 "run_id": ["run-1"]}
    for dash in dashboards().values():
        for n, query in enumerate(queries(dash)):
            expr = query.expr
            if query.kind == "variable":
                expr = f"count({split_label_values(expr)[0]})"
            expr = substitute(expr, variables, interval_s=15, range_s=3600, rate_interval_s=60)
            assert "$" not in expr, expr
            rules.append({"record": f"check:{dash['uid'].replace('-', '_')}:q{n}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_name_extraction() -> None:
    """The extractor the checks above rely on."""
    expr = ('max without (gpu, UUID) (training_gpu_temperature_celsius{job=~"$job"}) '
            '/ on (run_id) group_left (state) training_state{state="a b", x=~"1e-10"} > 1e-12 '
            'or deriv(training_loss_ema{a="b"}[5m] offset 1h30m) * 900 and time() - run:x:rate5m{a="(b|c)"}')
    assert metric_names(expr) == {"training_gpu_temperature_celsius", "training_state", "training_loss_ema",
                                  "run:x:rate5m"}
    assert metric_names('label_values({__name__=~"a_b|c", job=~"$job"}, instance)') == {"a_b", "c"}
    assert grouping_labels(expr) == {"gpu", "UUID", "run_id", "state"}
    assert grafana_regex(["127.0.0.1:9945"]) == r"127\\.0\\.0\\.1:9945"
    assert grafana_regex(["a", "b"]) == "(a|b)"
    assert substitute('x{run_id=~"$run_id"}[$__rate_interval] $__range_s ${job}',
                      {"run_id": ["r"], "job": ["j"]}, interval_s=2, range_s=60, rate_interval_s=4) == \
        'x{run_id=~"r"}[4s] 60 j'


def test_alert_notifications_link_to_the_training_run_dashboard() -> None:
    template = (ROOT / "alertmanager" / "templates" / "training.tmpl").read_text()
    links = re.findall(r"/d/([\w-]+)\?var-(\w+)=", template)
    assert links, "no dashboard link in the Alertmanager template"
    dashes = dashboards()
    for uid, variable in links:
        assert uid in dashes, uid
        assert variable in {v["name"] for v in dashes[uid]["templating"]["list"]}


def test_scrape_interval_agrees_with_the_data_source() -> None:
    """Grafana's $__rate_interval is 4x the data source's timeInterval: it must be the real scrape interval."""
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prometheus_ds = next(ds for ds in provisioned["datasources"] if ds["type"] == "prometheus")
    scrape = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert prometheus_ds["jsonData"]["timeInterval"] == scrape
    assert prometheus_ds["access"] == "proxy" and prometheus_ds["isDefault"] is True
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "training.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
