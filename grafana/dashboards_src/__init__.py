"""The training-exporter Grafana dashboards as code (grafana-foundation-sdk); see grafana/generate.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import evaluation, hardware, layers, systems, training_run

# File name (without .json) -> builder of the dashboard, in the order the links list them.
DASHBOARDS: dict[str, Callable[[], Any]] = {
    "training-run": training_run.build,
    "training-layers": layers.build,
    "training-evaluation": evaluation.build,
    "training-hardware": hardware.build,
    "training-systems": systems.build,
}
