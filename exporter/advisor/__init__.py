"""The advisor: should this run continue, stop, or which checkpoint should be used? (``docs/advisor.md``)

* :mod:`~exporter.advisor.client` reads a run from Prometheus over its HTTP API
  (:func:`advise` fetches and judges in one call);
* :mod:`~exporter.advisor.analysis` judges it: pure functions of the series;
* :mod:`~exporter.advisor.render` writes the report as text or JSON;
* :mod:`~exporter.advisor.cli` is the ``training-exporter advise`` subcommand.
"""

from __future__ import annotations

from exporter.advisor.analysis import Report, Waiting
from exporter.advisor.client import AdvisorError, Prometheus, advise

__all__ = ["AdvisorError", "Prometheus", "Report", "Waiting", "advise"]
