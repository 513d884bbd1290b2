"""The preview history: every scored preview in full, one JSON line per preview and one file per UTC day.

- :mod:`~exporter.previews.records`: a record's fields, their validation and its timestamps;
- :mod:`~exporter.previews.history`: :class:`PreviewHistory`, the store (append, rotation, retention);
- :mod:`~exporter.previews.query`: :class:`PreviewFilter` and the reader that pages through the day files;
- :mod:`~exporter.previews.layout`: the day files' names, shared by the store and the reader;
- :mod:`~exporter.previews.cli`: the ``training-exporter previews`` subcommand.
"""

from exporter.previews.history import PreviewHistory
from exporter.previews.query import PreviewFilter, QueryStats
from exporter.previews.records import (
    PREVIEW_FIELDS,
    InvalidPreviewRecord,
    PreviewHistoryError,
    format_ts,
    parse_time_bound,
    validate_record,
)

__all__ = [
    "PREVIEW_FIELDS",
    "InvalidPreviewRecord",
    "PreviewFilter",
    "PreviewHistory",
    "PreviewHistoryError",
    "QueryStats",
    "format_ts",
    "parse_time_bound",
    "validate_record",
]
