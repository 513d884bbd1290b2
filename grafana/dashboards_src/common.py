"""What every training-exporter dashboard shares: variables, selectors, links, annotations, panel factories.

Each dashboard has a ``datasource`` variable (type prometheus) that every
panel, query, variable and annotation uses, and the chained variables ``job``
-> ``instance`` -> ``run_id`` read with ``label_values`` from one anchor
selector per dashboard. Every series selector goes through :func:`sel`, so
that every panel honours the three variables (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

# The tag every dashboard carries; the dashboard links list the dashboards with it.
TAG = "training-exporter"
# The uid of the data source grafana/provisioning/datasources/prometheus.yml creates.
DATASOURCE_UID = "training-prometheus"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The scrape interval the provisioned data source declares (its timeInterval):
# Grafana derives $__rate_interval from it.
SCRAPE_INTERVAL = "15s"

# The Grafana release docker-compose.yml runs (the SDK's line). generate.py
# stamps it on every panel as pluginVersion, so that Grafana does not run its
# migrations for panels saved by older versions on them (an xychart without
# it is rewritten to manual mode with no series).
GRAFANA_VERSION = "11.6.1"

# Template variables every selector filters on; all three are multi-value, so
# they are matched with =~ (Grafana expands them to an escaped regex).
SELECTOR = 'job=~"$job", instance=~"$instance", run_id=~"$run_id"'

# Grafana unit ids, one place so that panels agree.
UNIT_NONE = "none"  # plain numbers shown as they are: steps, losses, norms
UNIT_SHORT = "short"  # counts and rates that benefit from K / M scaling
UNIT_SCI = "sci"  # learning rates, |w| near 1e-10
UNIT_RATIO = "percentunit"  # metrics with the _ratio suffix (0..1)
UNIT_SECONDS = "s"
UNIT_BYTES = "bytes"
UNIT_CELSIUS = "celsius"
UNIT_WATTS = "watt"
UNIT_NATS = "suffix: nats"
UNIT_FLOPS = "flops"  # FLOP/s, SI-prefixed (GFLOP/s, TFLOP/s)
UNIT_HERTZ = "hertz"

GREEN, YELLOW, RED, BLUE, GREY, ORANGE = "green", "yellow", "red", "blue", "text", "orange"


def sel(metric: str, *matchers: str) -> str:
    """``metric{job=~"$job", instance=~"$instance", run_id=~"$run_id", ...}``."""
    extra = "".join(f", {m}" for m in matchers)
    return f"{metric}{{{SELECTOR}{extra}}}"


def alerts_selector() -> str:
    """Firing alerts of the selected runs (ALERTS keeps the alert's labels; some alerts aggregate instance away)."""
    return 'ALERTS{alertstate="firing", run_id=~"$run_id"}'


# --------------------------------------------------------------------------- queries


def q(expr: str, legend: str = "", *, instant: bool = False, table_format: bool = False) -> prom.Dataquery:
    query = prom.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        query = query.legend_format(legend)
    if instant:
        query = query.instant()
    else:
        query = query.range()
    if table_format:
        query = query.format(pm.PromQueryFormat.TABLE)
    return query


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    """Absolute thresholds; the first step's value is None (the base colour)."""
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=value, color=color) for value, color in steps]
    )


def fixed_color(color: str) -> dm.DynamicConfigValue:
    return dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})


def _common(panel: Any, title: str, description: str, unit: str, targets: Sequence[prom.Dataquery],
            w: int, h: int) -> Any:
    panel = panel.title(title).description(description).datasource(DATASOURCE).unit(unit).span(w).height(h)
    for ref, target in zip("ABCDEFGHIJ", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prom.Dataquery],
    *,
    w: int = 12,
    h: int = 8,
    log: bool = False,
    min_value: float | None = None,
    max_value: float | None = None,
    limits: Sequence[tuple[float | None, str]] = (),
    points: bool = False,
) -> timeseries.Panel:
    """A time series; ``limits`` are drawn as dashed threshold lines (an alert's level)."""
    panel = _common(timeseries.Panel(), title, description, unit, targets, w, h)
    panel = panel.line_width(1).fill_opacity(5).span_nulls(False).legend(legend_list()).tooltip(tooltip_all())
    if points:
        # Sparse series (one value per evaluation or checkpoint) would be invisible as lines.
        panel = panel.show_points(cm.VisibilityMode.ALWAYS).point_size(5)
    if log:
        panel = panel.scale_distribution(log_scale())
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    if limits:
        panel = panel.thresholds(thresholds(*limits)).thresholds_style(dashed_thresholds())
    else:
        panel = panel.thresholds(thresholds((None, GREEN)))
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prom.Dataquery],
    *,
    w: int = 4,
    h: int = 4,
    steps: Sequence[tuple[float | None, str]] = ((None, BLUE),),
    background: bool = False,
    show_name: bool = False,
    no_value: str = "",
) -> stat.Panel:
    """A single value; ``background`` colours the whole box by ``steps`` (a health light)."""
    panel = _common(stat.Panel(), title, description, unit, targets, w, h)
    panel = (panel.thresholds(thresholds(*steps))
             .color_mode(cm.BigValueColorMode.BACKGROUND if background else cm.BigValueColorMode.VALUE)
             .graph_mode(cm.BigValueGraphMode.NONE)
             .text_mode(cm.BigValueTextMode.NAME if show_name else cm.BigValueTextMode.AUTO)
             .reduce_options(last_value()))
    if no_value:
        panel = panel.no_value(no_value)
    return panel


def bargauge_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prom.Dataquery],
    *,
    steps: Sequence[tuple[float | None, str]],
    w: int = 12,
    h: int = 8,
    vertical: bool = True,
    min_value: float | None = None,
    max_value: float | None = None,
) -> bargauge.Panel:
    """One bar per series, coloured by ``steps`` (e.g. drift < 20% / 20-35% / > 35%)."""
    panel = _common(bargauge.Panel(), title, description, unit, targets, w, h)
    panel = (panel.thresholds(thresholds(*steps))
             .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
             .display_mode(cm.BarGaugeDisplayMode.BASIC)
             .orientation(cm.VizOrientation.VERTICAL if vertical else cm.VizOrientation.HORIZONTAL)
             .show_unfilled(True)
             .reduce_options(last_value()))
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    return panel


def table_panel(
    title: str,
    description: str,
    unit: str,
    targets: Sequence[prom.Dataquery],
    *,
    w: int = 12,
    h: int = 8,
    hide: Sequence[str] = ("Time", "Value", "__name__"),
    rename: dict[str, str] | None = None,
) -> table.Panel:
    """An instant table; ``hide`` drops columns, ``rename`` renames them (the ``organize`` transformation)."""
    panel = _common(table.Panel(), title, description, unit, targets, w, h)
    return panel.thresholds(thresholds((None, GREEN))).with_transformation(dm.DataTransformerConfig(
        id_val="organize",
        options={"excludeByName": dict.fromkeys(hide, True), "renameByName": dict(rename or {})},
    ))


# --------------------------------------------------------------------------- values in descriptions
# Thresholds come from exporter/thresholds.py; a panel's description writes
# them with these, so that the text follows the value.


def number(value: float) -> str:
    """``100``, ``0.3``, ``1e-10``."""
    return f"{value:g}"


def percent(ratio: float) -> str:
    """``0.35`` -> ``35%``."""
    return f"{ratio:.0%}"


def in_words(seconds: float) -> str:
    """A duration as a sentence says it: ``an hour``, ``15 minutes``, ``6 hours``, ``90 s``."""
    for size, one, many in ((3600, "an hour", "hours"), (60, "a minute", "minutes")):
        if seconds == size:
            return one
        if seconds > size and seconds % size == 0:
            return f"{seconds / size:g} {many}"
    return f"{seconds:g} s"


# --------------------------------------------------------------------------- small option builders


def last_value() -> cb.ReduceDataOptions:
    return cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("")


def legend_list() -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True))


def tooltip_all() -> cb.VizTooltipOptions:
    return cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)


def log_scale() -> cb.ScaleDistributionConfig:
    return cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10)


def dashed_thresholds() -> cb.GraphThresholdsStyleConfig:
    return cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)


# --------------------------------------------------------------------------- variables, links, annotations


def variables(anchor: str) -> list[cogbuilder.Builder[dm.VariableModel]]:
    """``datasource`` and the chained ``job`` -> ``instance`` -> ``run_id`` variables.

    ``anchor`` is a series selector without braces' closing part, e.g.
    ``training_step`` or ``{__name__=~"a|b"}``: the series whose labels list
    the jobs, instances and runs this dashboard can show.
    """

    def scoped(*matchers: str) -> str:
        if not matchers:
            return anchor
        if anchor.endswith("}"):
            return anchor[:-1] + "".join(f", {m}" for m in matchers) + "}"
        return anchor + "{" + ", ".join(matchers) + "}"

    def query_var(name: str, label: str, query: str, *, include_all: bool, sort: dm.VariableSort) -> Any:
        return (db.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
                .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(include_all)
                .sort(sort))

    by_job = scoped('job=~"$job"')
    by_instance = scoped('job=~"$job"', 'instance=~"$instance"')
    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus")
        .current(dm.VariableOption(selected=True, text="Prometheus", value=DATASOURCE_UID)),
        query_var("job", "Job", f"label_values({scoped()}, job)", include_all=True,
                  sort=dm.VariableSort.ALPHABETICAL_ASC),
        query_var("instance", "Instance", f"label_values({by_job}, instance)", include_all=True,
                  sort=dm.VariableSort.ALPHABETICAL_ASC),
        # Newest first for the usual run ids (dates, sequence numbers: natural
        # order puts run-10 after run-9); the first option is the default.
        query_var("run_id", "Run", f"label_values({by_instance}, run_id)",
                  include_all=False, sort=dm.VariableSort.NATURAL_DESC),
    ]


def links() -> list[cogbuilder.Builder[dm.DashboardLink]]:
    """The other training dashboards, keeping the time range and the selected job, instance and run."""
    return [
        db.DashboardLink("Training dashboards").type(dm.DashboardLinkType.DASHBOARDS).tags([TAG])
        .as_dropdown(False).include_vars(True).keep_time(True).target_blank(False).icon("dashboard").tooltip("")
    ]


class _PrometheusAnnotation(dm.AnnotationQuery):
    """A Prometheus annotation with the query options the SDK's generic model leaves out."""

    def __init__(self, name: str, expr: str, title_format: str, text_format: str, tag_keys: str, step: str,
                 icon_color: str) -> None:
        super().__init__(name=name, datasource=DATASOURCE, enable=True, hide=False, icon_color=icon_color,
                         expr=expr)
        self.title_format = title_format
        self.text_format = text_format
        self.tag_keys = tag_keys
        self.step = step

    def to_json(self) -> dict[str, object]:
        payload = super().to_json()
        payload.update(titleFormat=self.title_format, textFormat=self.text_format, tagKeys=self.tag_keys,
                       step=self.step, useValueForTime=False)
        return payload


class AlertAnnotation(cogbuilder.Builder[dm.AnnotationQuery]):
    """Firing alerts of the selected runs as annotation regions, from Prometheus's ALERTS series."""

    def build(self) -> dm.AnnotationQuery:
        return _PrometheusAnnotation(
            name="Alerts",
            expr=alerts_selector(),
            title_format="{{alertname}}",
            text_format="{{severity}} ({{component}}): run {{run_id}}",
            tag_keys="severity,component",
            # Short enough to show a one-minute alert (a NaN loss) as a region.
            step=SCRAPE_INTERVAL,
            icon_color="red",
        )


def new_dashboard(uid: str, title: str, description: str, anchor: str, extra_tags: Sequence[str] = ()) -> Any:
    dash = (db.Dashboard(title).uid(uid).description(description).tags([TAG, *extra_tags])
            .editable().tooltip(dm.DashboardCursorSync.CROSSHAIR).time("now-1h", "now").refresh("30s")
            .timezone("browser").variables(variables(anchor)).links(links()).annotation(AlertAnnotation()))
    return dash


def row(title: str) -> db.Row:
    return db.Row(title)
