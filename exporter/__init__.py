"""Prometheus-native observability for fine-tuning language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exporter.version import __version__

__all__ = ["ExporterConfig", "PrometheusCallback", "TrainingMonitor", "__version__"]

if TYPE_CHECKING:
    from exporter.callback import PrometheusCallback
    from exporter.config import ExporterConfig
    from exporter.core import TrainingMonitor


def __getattr__(name: str) -> Any:
    # Lazy so that `import exporter` stays cheap for the CLI and never drags
    # transformers in for a plain PyTorch loop.
    if name == "PrometheusCallback":
        from exporter.callback import PrometheusCallback

        return PrometheusCallback
    if name == "TrainingMonitor":
        from exporter.core import TrainingMonitor

        return TrainingMonitor
    if name == "ExporterConfig":
        from exporter.config import ExporterConfig

        return ExporterConfig
    raise AttributeError(name)
