"""Exporter settings: one table drives the dataclass, the YAML file, the flags and the environment.

Precedence, highest first: command-line flag (or the callback's keyword argument),
environment variable, YAML file (``--config.file`` or ``TRAINING_EXPORTER_CONFIG_FILE``),
built-in default. Every setting has all four spellings, derived from the
single :data:`OPTIONS` table so they cannot drift apart. The flag is the YAML
key with ``_`` as ``-`` (the dots kept, Go-exporter style); where an earlier
release spelled the flag differently, that spelling stays as an alias, and the
environment variable keeps the name it was given after it:

========================  ====================================================  ========================================
YAML (``--config.file``)  flag (alias)                                          environment
========================  ====================================================  ========================================
``web.listen_address``    ``--web.listen-address``                              ``TRAINING_EXPORTER_WEB_LISTEN_ADDRESS``
``web.linger_seconds``    ``--web.linger-seconds`` (``--linger``)               ``TRAINING_EXPORTER_LINGER``
``collectors.gpu``        ``--[no-]collectors.gpu`` (``--[no-]collector.gpu``)  ``TRAINING_EXPORTER_COLLECTOR_GPU``
========================  ====================================================  ========================================

Validation collects every problem and reports them in one :class:`ConfigError`
before anything starts. Only the value that wins is checked: a setting overridden
by a higher layer is not an error however bad it is in the lower one; an unknown
YAML key or keyword argument always is.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from exporter import files
from exporter.argtypes import MAX_SECONDS

# Not on the Prometheus default-port allocation list at the time of writing.
DEFAULT_PORT = 9945
ENV_PREFIX = "TRAINING_EXPORTER_"
CONFIG_FILE_ENV = ENV_PREFIX + "CONFIG_FILE"
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_LABELS = {
    "run_id", "rank", "layer", "module", "state", "collector", "gpu", "UUID", "name", "le",
    "regime", "source", "domain", "outcome", "pattern", "length_bucket", "window", "feature",
    "phase", "reason", "type",
}


class ConfigError(ValueError):
    """Invalid settings; ``str()`` is a single line naming every problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


@dataclass(frozen=True)
class ExporterConfig:
    """Every exporter setting, with its default; one row of :data:`OPTIONS` per field.

    Each field is also a YAML key, a flag and an environment variable (in brackets:
    the YAML key; the flag is that key with ``_`` as ``-``). Building one directly
    checks nothing; :meth:`from_kwargs`, :meth:`replace`, :func:`resolve` and
    :func:`resolve_settings` validate, and :meth:`validate` checks one built directly.

    Args:
        listen_address: ``HOST:PORT``, ``:PORT`` (all interfaces) or ``[v6]:PORT`` to serve
            ``/metrics`` on; port 0 picks a free one [``web.listen_address``].
            Defaults to ``":9945"``.
        port_in_use: when the port is taken, ``"continue"`` (log one line, count the error,
            train without an endpoint) or ``"fail"`` (raise before training starts)
            [``web.port_in_use``]. Defaults to ``"continue"``.
        linger_seconds: seconds to block when training ends, still serving the last values
            [``web.linger_seconds``]. Defaults to ``0.0``.
        final_scrape_timeout_seconds: after training, keep serving in the background until
            each client that was scraping has read the final state, at most this long; the
            exit of the process waits for it, the return from training does not; 0 stops at
            once [``web.final_scrape_timeout_seconds``]. Defaults to ``120.0``.
        sigterm: on SIGTERM, set state ``terminated`` and keep it scrapeable before the
            previous handler runs [``signals.sigterm``]. Defaults to ``True``.
        sigterm_timeout_seconds: the most a SIGTERM waits for that scrape; keep it below the
            scheduler's grace period [``web.sigterm_timeout_seconds``]. Defaults to ``25.0``.
        web_config_file: the exporter-toolkit web configuration file (TLS, mutual TLS, basic
            auth; docs/security.md); empty serves plain HTTP with no auth [``web.config_file``,
            flag alias ``--web.config.file``]. Defaults to ``""``.
        scrape_window_seconds: scrapes that arrive within this many seconds of the start of the
            last render share it; 0 renders for every scrape [``web.scrape_window_seconds``].
            Defaults to ``1.0``.
        max_connections: connections open at once; one more is closed at once
            [``web.max_connections``]. Defaults to ``64``.
        max_requests_per_second: requests answered per second at most; one over the rate waits
            (0: no bound) [``web.max_requests_per_second``]. Defaults to ``50.0``.
        read_timeout_seconds: a request (TLS handshake and headers) must arrive, and its answer
            be written, within this many seconds [``web.read_timeout_seconds``]. Defaults to ``10.0``.
        idle_timeout_seconds: a kept-alive connection with no request for this long is closed
            [``web.idle_timeout_seconds``]. Defaults to ``60.0``.

        run_id: value of the ``run_id`` label; empty derives it from the Trainer's output
            dir [``run_id``]. Defaults to ``""``.
        labels: extra constant labels on every series; names the exporter uses itself
            (``rank``, ``layer``, ...) are refused [``labels``]. Defaults to none.
        ranks: ``"zero"`` exports from rank 0 only, ``"all"`` from every rank on
            port + ``LOCAL_RANK`` with a ``rank`` label [``ranks``]. Defaults to ``"zero"``.

        gpu, host, layers, update_ratio, predictions, evaluation, previews, drift: turn
            each collector on or off: NVML GPU metrics, host metrics (psutil), per-layer
            gradient norms, update ratios (one copy of the trainable weights on sampled
            steps), entropy and confidence, the fixed evaluation, the preview history and
            dataset drift [``collectors.gpu``, ..., ``collectors.eval``, ...].
            All default to ``True``.

        layers_interval, update_ratio_interval, predictions_interval: sample that collector
            every N optimizer steps [``intervals.layers_steps``, ...]. Default to
            ``10``, ``50`` and ``50``.
        min_sample_period_seconds: sample those collectors at most once per this many
            seconds; 0 samples every due step [``intervals.min_period_seconds``].
            Defaults to ``1.0``.

        ema_alpha: weight of the newest loss in the EMA, in (0, 1] [``loss.ema_alpha``].
            Defaults to ``0.1``.
        variance_window: recent finite losses the variance is taken over
            [``loss.variance_window``]. Defaults to ``50``.
        loss_window_seconds: seconds of steps ``training_loss_recent_max`` is taken over
            [``loss.window_seconds``]. Defaults to ``60.0``.

        eval_interval: run the fixed evaluation every N steps; 0 only at Trainer
            evaluations [``eval.interval_steps``]. Defaults to ``250``.
        eval_budget: examples asked per fixed evaluation [``eval.budget``]. Defaults to ``64``.
        eval_max_new_tokens: bound on generated tokens per answer; 0 is twice the longest
            golden answer asked [``eval.max_new_tokens``]. Defaults to ``0``.
        eval_batch_size: prompts generated together [``eval.batch_size``]. Defaults to ``32``.
        eval_failure_pool: training examples answered wrong that are asked again until
            right; 0 disables [``eval.failure_pool``]. Defaults to ``32``.

        history_dir: directory of the preview history; empty is ``OUTPUT_DIR/logs/preview``
            [``history.dir``]. Defaults to ``""``.
        history_compress_days, history_delete_days: gzip, then delete, preview history day
            files older than this many days [``history.compress_after_days``,
            ``history.delete_after_days``]. Default to ``7`` and ``30``.

        drift_sample_every: profile every N-th training batch [``drift.sample_every``].
            Defaults to ``10``.
        drift_window: recent profiled batches the current profile is taken over
            [``drift.window_batches``]. Defaults to ``100``.
        drift_reference_batches: first profiled batches that make the reference profile
            [``drift.reference_batches``]. Defaults to ``100``.
        drift_top_k: most frequent reference tokens compared one by one
            [``drift.top_k``]. Defaults to ``100``.
        drift_max_length: length at which a sequence counts as truncated; 0 when its last
            token is not end-of-sequence [``drift.max_length``]. Defaults to ``0``.

        cuda, flops, phases, amp, watchdog: the systems collectors: CUDA caching-allocator
            memory at scrape time, model and hardware FLOPs, the step-phase breakdown, the
            GradScaler's loss scale, and the hang watchdog thread [``collectors.cuda``, ...].
            All default to ``True``.
        peak_flops: peak FLOP/s of one device for MFU; 0 looks the device and dtype up in the
            built-in table [``mfu.peak_flops_per_second``]. Defaults to ``0.0``.
        watchdog_multiple: a hang is suspected after this many recent median step times
            without a step [``watchdog.multiple``]. Defaults to ``10.0``.
        watchdog_floor_seconds: but never sooner than this [``watchdog.floor_seconds``].
            Defaults to ``120.0``.

    Raises:
        ConfigError: from :meth:`from_kwargs`, :meth:`replace` and :meth:`validate`, listing
            every problem at once: a keyword that is no field; a listen address that is not
            ``HOST:PORT``; a boolean field that is not ``True`` / ``False``; a count below its
            minimum (1, or 0 where 0 has a meaning above); a negative or non-finite number of
            seconds (``loss_window_seconds`` must be above 0); ``ema_alpha`` outside (0, 1];
            ``ranks`` or ``port_in_use`` not one of its choices; a ``run_id`` over 128
            characters or of several lines; a ``history_dir`` of several lines; ``labels`` with
            an invalid or reserved name or a value that is not a string.

    Example::

        >>> from exporter import ExporterConfig
        >>> ExporterConfig().listen_address
        ':9945'
        >>> cfg = ExporterConfig.from_kwargs(ema_alpha=0.05, labels={"team": "nlp"})
        >>> cfg.replace(gpu=False).gpu
        False
        >>> cfg.replace(ranks="some")
        Traceback (most recent call last):
        ...
        exporter.config.ConfigError: invalid configuration: ranks: must be one of zero, all, got 'some'

        # From a YAML file that holds the keys nested at each dot, e.g. exporter.yml:
        #   loss:
        #     ema_alpha: 0.05
        #   collectors:
        #     gpu: false
        >>> from exporter.config import load_yaml
        >>> cfg = ExporterConfig.from_kwargs(**load_yaml("exporter.yml"))
        >>> (cfg.ema_alpha, cfg.gpu)
        (0.05, False)
    """

    listen_address: str = f":{DEFAULT_PORT}"
    run_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    gpu: bool = True
    host: bool = True
    layers: bool = True
    update_ratio: bool = True
    predictions: bool = True
    layers_interval: int = 10
    update_ratio_interval: int = 50
    predictions_interval: int = 50
    min_sample_period_seconds: float = 1.0
    ema_alpha: float = 0.1
    variance_window: int = 50
    loss_window_seconds: float = 60.0
    linger_seconds: float = 0.0
    final_scrape_timeout_seconds: float = 120.0
    sigterm: bool = True
    sigterm_timeout_seconds: float = 25.0
    web_config_file: str = ""
    scrape_window_seconds: float = 1.0
    max_connections: int = 64
    max_requests_per_second: float = 50.0
    read_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    ranks: str = "zero"
    port_in_use: str = "continue"
    evaluation: bool = True
    previews: bool = True
    drift: bool = True
    eval_interval: int = 250
    eval_budget: int = 64
    eval_max_new_tokens: int = 0
    eval_batch_size: int = 32
    eval_failure_pool: int = 32
    history_dir: str = ""
    history_compress_days: int = 7
    history_delete_days: int = 30
    drift_sample_every: int = 10
    drift_window: int = 100
    drift_reference_batches: int = 100
    drift_top_k: int = 100
    drift_max_length: int = 0
    cuda: bool = True
    flops: bool = True
    phases: bool = True
    amp: bool = True
    watchdog: bool = True
    peak_flops: float = 0.0
    watchdog_multiple: float = 10.0
    watchdog_floor_seconds: float = 120.0

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen_address(self.listen_address)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ExporterConfig:
        """Defaults with ``kwargs`` on top; the environment and the YAML file are not read."""
        return _merge(kwargs, environ={})

    def replace(self, **changes: Any) -> ExporterConfig:
        return _merge(changes, environ={}, defaults=self)

    def validate(self) -> None:
        problems = _check({o.attr: getattr(self, o.attr) for o in OPTIONS})
        if problems:
            raise ConfigError(problems)


def derive_run_id(output_dir: str | None) -> str:
    """The ``run_id`` of a run that names none: the name of its output directory (``"run"`` when there is none).

    Both exporters use it, so that a training run's series and those of its checkpoint analytics share
    ``run_id``.

    Example:
        >>> derive_run_id("out/llama-full-2/"), derive_run_id("/"), derive_run_id(None)
        ('llama-full-2', 'run', 'run')
    """
    if not output_dir:
        return "run"
    name = os.path.basename(os.path.normpath(output_dir))
    return name or "run"


def parse_listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[v6]:PORT``; port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _check_listen(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string HOST:PORT"
    try:
        parse_listen_address(v)
    except ValueError as exc:
        return str(exc)
    return None


def _check_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


# Far above any real count, below what a C size (a deque's maxlen, a thread count) overflows at.
MAX_INT = 2**31 - 1


def _positive_int(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f"must be an integer >= 1, got {v!r}"
    return _at_most_max_int(v)


def _non_negative_int(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return f"must be an integer >= 0, got {v!r}"
    return _at_most_max_int(v)


def _at_most_max_int(v: int) -> str | None:
    return f"must be at most {MAX_INT}, got {str(v)[:40]}" if v > MAX_INT else None


def _check_dir(v: Any) -> str | None:
    if not isinstance(v, str) or "\n" in v or "\0" in v:
        return "must be a single-line path (empty: the default)"
    return None


def _check_web_config(v: Any) -> str | None:
    if not isinstance(v, str) or "\n" in v or "\0" in v:
        return "must be a single-line path (empty: plain HTTP, no auth)"
    if not v:
        return None
    from exporter.web import WebConfigError, load_web_config

    try:
        load_web_config(v)
    except WebConfigError as exc:
        return str(exc)
    return None


def _check_alpha(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        return f"must be a number in (0, 1], got {v!r}"
    return None


def _check_linger(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return f"must be a number of seconds >= 0, got {v!r}"
    return _at_most_a_year(v)


def _check_window(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return f"must be a number of seconds > 0, got {v!r}"
    return _at_most_a_year(v)


def _check_rate(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return f"must be a number >= 0, got {v!r}"
    return None


def _at_most_a_year(v: float) -> str | None:
    # time.sleep() and timer arithmetic overflow far above this; no setting means more than a year.
    return f"must be at most {MAX_SECONDS:.0f} seconds (a year), got {v!r}" if v > MAX_SECONDS else None


def _check_multiple(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 1:
        return f"must be a number > 1, got {v!r}"
    return None


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}, got {v!r}"

    return check


def _check_run_id(v: Any) -> str | None:
    if not isinstance(v, str) or len(v) > 128 or "\n" in v:
        return "must be a single-line string of at most 128 characters"
    return None


def _check_labels(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "must be a mapping of label name to value"
    bad = [k for k in v if not isinstance(k, str) or not LABEL_NAME.match(k) or k.startswith("__")]
    if bad:
        return f"invalid label name(s) {bad}"
    reserved = sorted(k for k in v if k in RESERVED_LABELS)
    if reserved:
        return f"label name(s) {reserved} are used by the exporter itself"
    if any(not isinstance(x, str) for x in v.values()):
        return "label values must be strings"
    return None


@dataclass(frozen=True)
class Option:
    """One setting: its :class:`ExporterConfig` field, YAML key, flag and environment variable.

    Args:
        attr: the :class:`ExporterConfig` field.
        yaml: the dotted path in the YAML file; the flag is derived from it.
        help: the ``--help`` text.
        check: returns the problem with a value, or ``None`` when it is valid.
        kind: how a flag or environment string is parsed: ``str``, ``int``, ``float``,
            ``bool`` (``--no-`` negates the flag) or ``labels`` (repeatable ``KEY=VALUE``).
        aliases: earlier flag spellings, without the leading ``--``; still accepted.
    """

    attr: str
    yaml: str
    help: str
    check: Callable[[Any], str | None]
    kind: str = "str"
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The flag without the leading ``--``: the YAML key with ``_`` as ``-``, dots kept."""
        return self.yaml.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        """Every accepted spelling without the leading ``--``, the derived one first."""
        return (self.flag, *self.aliases)

    @property
    def env(self) -> str:
        # Environment variables were named after the flag spelling that is now the first alias;
        # deployments set them, so they keep that name.
        named_after = self.aliases[0] if self.aliases else self.flag
        return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", named_after.upper())


OPTIONS: tuple[Option, ...] = (
    Option("listen_address", "web.listen_address",
           "Address to serve /metrics on; port 0 picks a free port.", _check_listen),
    Option("port_in_use", "web.port_in_use",
           "When the port is taken: 'continue' (log one line, count the error, train without "
           "an endpoint) or 'fail' (raise before training starts).", _choice("continue", "fail")),
    Option("linger_seconds", "web.linger_seconds",
           "Block this many seconds when training ends, serving the last values (the end of training waits "
           "for it; web.final_scrape_timeout_seconds does not).", _check_linger, "float", aliases=("linger",)),
    Option("final_scrape_timeout_seconds", "web.final_scrape_timeout_seconds",
           "After training ends, keep serving in the background until each client that was scraping has "
           "read the final state (it is expected back within twice its scrape interval plus 1 s), at most "
           "this many seconds; the return from training does not wait, the exit of the process does. "
           "0: stop serving at once.", _check_linger, "float", aliases=("web.final-scrape-timeout",)),
    Option("sigterm", "signals.sigterm",
           "On SIGTERM (handler installed from the main thread): state terminated, kept scrapeable for "
           "web.sigterm_timeout_seconds, then the handler installed before runs (by default the process "
           "dies of the signal).", _check_bool, "bool"),
    Option("sigterm_timeout_seconds", "web.sigterm_timeout_seconds",
           "On SIGTERM, keep the process at most this many seconds for a scrape to read state terminated; "
           "keep it below the scheduler's grace period (Kubernetes and Slurm: 30 s). 0: no wait.",
           _check_linger, "float", aliases=("web.sigterm-timeout",)),
    Option("web_config_file", "web.config_file",
           "The exporter-toolkit web configuration file: TLS, mutual TLS and basic auth (docs/security.md); "
           "empty: plain HTTP, no auth.", _check_web_config, aliases=("web.config.file",)),
    Option("scrape_window_seconds", "web.scrape_window_seconds",
           "Scrapes arriving within this many seconds of the start of the last render share it (N scrapers "
           "cost one render); 0: a render for every scrape.", _check_linger, "float"),
    Option("max_connections", "web.max_connections",
           "Connections open at once; one more is closed at once and counted.", _positive_int, "int"),
    Option("max_requests_per_second", "web.max_requests_per_second",
           "Requests answered per second at most, whatever the clients; one over the rate waits, at no CPU "
           "cost. 0: no bound.", _check_rate, "float"),
    Option("read_timeout_seconds", "web.read_timeout_seconds",
           "A request (TLS handshake and headers) must arrive, and its answer be written, within this many "
           "seconds.", _check_window, "float"),
    Option("idle_timeout_seconds", "web.idle_timeout_seconds",
           "Close a kept-alive connection that sends no request for this many seconds.", _check_window, "float"),
    Option("run_id", "run_id",
           "Value of the run_id label; empty derives it from the Trainer's output dir.", _check_run_id),
    Option("labels", "labels",
           "Extra constant label KEY=VALUE on every series (repeatable).", _check_labels, "labels",
           aliases=("label",)),
    Option("ranks", "ranks",
           "Multi-process runs: 'zero' exports from rank 0 only; 'all' exports from every rank "
           "on port + LOCAL_RANK with a rank label.", _choice("zero", "all")),
    Option("gpu", "collectors.gpu", "GPU metrics from NVML at scrape time.", _check_bool, "bool",
           aliases=("collector.gpu",)),
    Option("host", "collectors.host", "Host CPU, memory, swap and disk (psutil).",
           _check_bool, "bool", aliases=("collector.host",)),
    Option("layers", "collectors.layers",
           "Per-layer / per-module gradient norms and dead-layer count.", _check_bool, "bool",
           aliases=("collector.layers",)),
    Option("update_ratio", "collectors.update_ratio",
           "Per-module ||dW||/||W|| of trainable weights (costs one copy of them on sampled steps).",
           _check_bool, "bool", aliases=("collector.update-ratio",)),
    Option("predictions", "collectors.predictions",
           "Token entropy and top-1 / top-5 confidence from the training logits.", _check_bool, "bool",
           aliases=("collector.predictions",)),
    Option("layers_interval", "intervals.layers_steps",
           "Sample per-layer gradient norms every N optimizer steps.", _positive_int, "int",
           aliases=("layers.interval-steps",)),
    Option("update_ratio_interval", "intervals.update_ratio_steps",
           "Sample update ratios every N optimizer steps.", _positive_int, "int",
           aliases=("update-ratio.interval-steps",)),
    Option("predictions_interval", "intervals.predictions_steps",
           "Sample entropy / confidence every N optimizer steps.", _positive_int, "int",
           aliases=("predictions.interval-steps",)),
    Option("min_sample_period_seconds", "intervals.min_period_seconds",
           "Sample layers, update ratios and predictions at most once per this many seconds (0: every due "
           "step); a scrape reads only the newest sample, so faster ones would be overwritten unread.",
           _check_linger, "float"),
    Option("ema_alpha", "loss.ema_alpha",
           "Weight of the newest loss in the EMA (0 < alpha <= 1).", _check_alpha, "float"),
    Option("variance_window", "loss.variance_window",
           "Number of recent finite losses the variance is taken over.", _positive_int, "int"),
    Option("loss_window_seconds", "loss.window_seconds",
           "Seconds of steps training_loss_recent_max is taken over; longer than the scrape interval, so a "
           "one-step spike is scraped.", _check_window, "float"),
    Option("evaluation", "collectors.eval",
           "Fixed evaluation (generation on the eval set given to the callback) every eval.interval_steps "
           "steps and at each Trainer evaluation.", _check_bool, "bool", aliases=("collector.eval",)),
    Option("previews", "collectors.previews",
           "Append every fixed-evaluation answer to the preview history (JSONL, see history.dir).",
           _check_bool, "bool", aliases=("collector.previews",)),
    Option("drift", "collectors.drift",
           "Dataset drift: JS divergence of recent training batches from the reference batches.",
           _check_bool, "bool", aliases=("collector.drift",)),
    Option("eval_interval", "eval.interval_steps",
           "Run the fixed evaluation every N optimizer steps (0: only at Trainer evaluations).",
           _non_negative_int, "int"),
    Option("eval_budget", "eval.budget",
           "Examples asked per fixed evaluation: the fixed ones first, then earlier failures and training "
           "examples in rotation.", _positive_int, "int"),
    Option("eval_max_new_tokens", "eval.max_new_tokens",
           "Bound on generated tokens per answer (0: twice the longest golden answer asked).",
           _non_negative_int, "int"),
    Option("eval_batch_size", "eval.batch_size",
           "Prompts generated (and scored) together in one batch; memory grows with it (KV cache, logits).",
           _positive_int, "int"),
    Option("eval_failure_pool", "eval.failure_pool",
           "Training examples answered wrong that are asked again (source failures) until right; 0 disables.",
           _non_negative_int, "int"),
    Option("history_dir", "history.dir",
           "Directory of the preview history (empty: OUTPUT_DIR/logs/preview).", _check_dir),
    Option("history_compress_days", "history.compress_after_days",
           "Gzip preview history day files older than this many days.", _positive_int, "int"),
    Option("history_delete_days", "history.delete_after_days",
           "Delete preview history day files older than this many days.", _positive_int, "int"),
    Option("drift_sample_every", "drift.sample_every",
           "Profile every N-th training batch (forward pass); 1 profiles every batch.", _positive_int, "int"),
    Option("drift_window", "drift.window_batches",
           "Recent profiled training batches the current data profile is taken over.",
           _positive_int, "int"),
    Option("drift_reference_batches", "drift.reference_batches",
           "First profiled training batches that make the reference profile (unless the callback is given one).",
           _positive_int, "int"),
    Option("drift_top_k", "drift.top_k",
           "Most frequent reference tokens compared one by one; the rest share an 'other' bucket.",
           _positive_int, "int"),
    Option("drift_max_length", "drift.max_length",
           "Length at which a sequence counts as truncated (0: when its last token is not end-of-sequence).",
           _non_negative_int, "int"),
    Option("cuda", "collectors.cuda",
           "CUDA caching-allocator memory (torch.cuda.memory_stats) at scrape time, once the process has "
           "initialised CUDA.", _check_bool, "bool"),
    Option("flops", "collectors.flops",
           "Model and hardware FLOPs of the training steps, counted from the model's shapes (MFU with a peak).",
           _check_bool, "bool"),
    Option("phases", "collectors.phases",
           "Seconds per step phase: data loading, forward, backward, optimizer, evaluation, checkpointing.",
           _check_bool, "bool"),
    Option("amp", "collectors.amp",
           "Loss scale and skipped steps of the fp16 GradScaler.", _check_bool, "bool"),
    Option("watchdog", "collectors.watchdog",
           "Hang watchdog thread: flags a step that takes far longer than usual and dumps every thread's "
           "stack to the output dir once.", _check_bool, "bool"),
    Option("peak_flops", "mfu.peak_flops_per_second",
           "Peak FLOP/s of one device for MFU (0: look the device name and training dtype up in the table).",
           _check_rate, "float"),
    Option("watchdog_multiple", "watchdog.multiple",
           "Suspect a hang after this many recent median step times without a step.", _check_multiple, "float"),
    Option("watchdog_floor_seconds", "watchdog.floor_seconds",
           "Never suspect a hang sooner than this many seconds without a step.", _check_window, "float"),
)
_BY_YAML = {o.yaml: o for o in OPTIONS}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        # `labels` is a mapping value, not a section.
        if isinstance(value, Mapping) and path not in _BY_YAML:
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into ``{field: value}`` with :class:`ExporterConfig` field names.

    The file holds the YAML keys of :data:`OPTIONS` nested at each dot (``loss.ema_alpha``
    is ``ema_alpha`` under ``loss``); the values are not checked here.

    Args:
        path: the file.

    Raises:
        ConfigError: the file cannot be read (not a regular file, over 1 MiB, not UTF-8), is not
            YAML or not a mapping, its aliases expand too far, or it has unknown keys (each one listed,
            up to 20, then their number).

    Example::

        >>> ExporterConfig.from_kwargs(**load_yaml("exporter.yml")).ema_alpha
        0.05
    """
    values, problems = _read_yaml(path)
    if problems:
        raise ConfigError(problems)
    return values


def _read_yaml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    # A regular file of at most files.MAX_CONFIG_BYTES, strict UTF-8, parsed by libyaml where present: /dev/zero,
    # a FIFO, a 50 MB file or another encoding is one line, at once. Aliases are bounded too: a recursive one
    # overflowed the stack in _flatten, and ten nested ones in a 1 KiB file expanded to 10^9 values.
    name = f"config file {str(path)!r}"
    try:
        data = files.load_yaml(path, "config file")
        files.check_expansion(data, name)
    except files.FileProblem as exc:
        raise ConfigError([str(exc)]) from None
    if data is None:
        return {}, []
    if not isinstance(data, Mapping):
        raise ConfigError([f"{name} must hold a mapping at the top level"])
    flat = _flatten(data)
    unknown = [f"unknown key {k!r}" for k in sorted(flat) if k not in _BY_YAML]
    # Every unknown key is listed, up to a line a terminal can still show.
    listed = 20
    problems = unknown[:listed] + ([f"and {len(unknown) - listed} more unknown keys"] if len(unknown) > listed else [])
    return {_BY_YAML[k].attr: v for k, v in flat.items() if k in _BY_YAML}, problems


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_labels(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def _convert(opt: Option, raw: Any) -> Any:
    """Turn a flag or environment string into the option's type."""
    if opt.kind == "bool":
        return raw if isinstance(raw, bool) else _parse_bool(str(raw))
    if opt.kind == "int":
        return int(raw)
    if opt.kind == "float":
        return float(raw)
    if opt.kind == "labels":
        items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s]
        return _parse_labels(items)
    return raw


def add_arguments(parser: argparse.ArgumentParser, defaults: ExporterConfig | None = None) -> None:
    """Add ``--config.file`` and every option as a Go-exporter style flag showing its default.

    Each flag is spelled as its YAML key with ``_`` as ``-`` (``--web.linger-seconds``);
    an earlier spelling is accepted too (``--linger``) and ``--help`` lists both. A boolean
    is negated with ``--no-`` before either spelling. The values land in the namespace
    under the :class:`ExporterConfig` field names, ``None`` where not given, for
    :func:`resolve`.

    Args:
        parser: the parser (or subcommand parser) to add the ``exporter`` group to.
        defaults: the defaults ``--help`` shows. Defaults to ``ExporterConfig()``.
    """
    base = defaults or ExporterConfig()
    group = parser.add_argument_group("exporter")
    group.add_argument("--config.file", dest="config_file", metavar="FILE", default=None,
                       help=f"YAML file with the settings below (env {CONFIG_FILE_ENV}).")
    for opt in OPTIONS:
        default = getattr(base, opt.attr)
        shown = "" if default in ("", {}) else f" (default: {default}; env {opt.env})"
        if not shown:
            shown = f" (env {opt.env})"
        spellings = [f"--{flag}" for flag in opt.flags]
        if opt.kind == "bool":
            group.add_argument(*spellings, dest=opt.attr, action="store_true", default=None,
                               help=opt.help + shown)
            group.add_argument(*(f"--no-{flag}" for flag in opt.flags), dest=opt.attr, action="store_false",
                               default=None, help=argparse.SUPPRESS)
        elif opt.kind == "labels":
            group.add_argument(*spellings, dest=opt.attr, action="append", default=None,
                               metavar="KEY=VALUE", help=opt.help + shown)
        else:
            group.add_argument(*spellings, dest=opt.attr, default=None, metavar=opt.attr.upper(),
                               help=opt.help + shown)


def resolve(
    namespace: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    defaults: ExporterConfig | None = None,
) -> ExporterConfig:
    """The settings from a namespace filled by :func:`add_arguments`, validated.

    Merges, lowest first: ``defaults``, the YAML file (``--config.file``, else the file
    named by ``TRAINING_EXPORTER_CONFIG_FILE``), the environment, the flags.

    Args:
        namespace: the parsed command line.
        environ: the environment to read. Defaults to ``os.environ``.
        defaults: the lowest layer. Defaults to ``ExporterConfig()``.

    Raises:
        ConfigError: listing every problem at once: an unreadable or invalid YAML file, an
            unknown YAML key, a flag or variable that does not parse (named by the flag's
            YAML-derived spelling or the variable), a winning value that fails its check
            (named by its variable or YAML key).

    Example::

        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> resolve(parser.parse_args(["--linger", "30"]), environ={}).linger_seconds
        30.0
    """
    flags = {o.attr: raw for o in OPTIONS if (raw := getattr(namespace, o.attr, None)) is not None}
    return _merge(flags, environ, defaults, getattr(namespace, "config_file", None), parse_explicit=True)


def resolve_settings(
    explicit: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    defaults: ExporterConfig | None = None,
) -> ExporterConfig:
    """The settings from keyword arguments, treated like flags, validated.

    Merges, lowest first: ``defaults``, the YAML file named by ``TRAINING_EXPORTER_CONFIG_FILE``,
    the environment, ``explicit``.

    Args:
        explicit: ``{field: value}`` with :class:`ExporterConfig` field names; the values are
            used as given, not parsed.
        environ: the environment to read. Defaults to ``os.environ``.
        defaults: the lowest layer. Defaults to ``ExporterConfig()``.

    Raises:
        ConfigError: listing every problem at once: an unknown field name, an unreadable or
            invalid YAML file, an unknown YAML key, a variable that does not parse, a winning
            value that fails its check; each is named by where it came from.

    Example::

        >>> resolve_settings({"ema_alpha": 0.05}, environ={"TRAINING_EXPORTER_COLLECTOR_GPU": "false"}).gpu
        False
    """
    return _merge(explicit, environ, defaults)


def _merge(
    explicit: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    defaults: ExporterConfig | None = None,
    config_file: str | None = None,
    *,
    parse_explicit: bool = False,
) -> ExporterConfig:
    """defaults < YAML file < environment < ``explicit``; explicit values are strings to parse (flags) when
    ``parse_explicit``, else used as given (keyword arguments)."""
    env = os.environ if environ is None else environ
    base = defaults or ExporterConfig()
    values: dict[str, Any] = {o.attr: getattr(base, o.attr) for o in OPTIONS}
    problems = [f"unknown setting {k!r}" for k in sorted(set(explicit) - set(values))]
    config_file = config_file or env.get(CONFIG_FILE_ENV)
    if config_file:
        try:
            from_file, file_problems = _read_yaml(config_file)
        except ConfigError as exc:
            # An unreadable file must not hide the other problems.
            from_file, file_problems = {}, exc.problems
        values.update(from_file)
        problems += file_problems
    names: dict[str, str] = {}
    # A setting whose winning value could not be parsed is reported once, not again for the layer below it.
    unparsed: set[str] = set()
    for opt in OPTIONS:
        if opt.attr in explicit:
            # An explicit value shadows the environment entirely, so a bad variable under it is no error,
            # just as a bad YAML value under a variable never was.
            # A flag is named by its derived spelling, whichever spelling was typed.
            source, raw, parse = f"--{opt.flag}", explicit[opt.attr], parse_explicit
        elif opt.env in env:
            source, raw, parse = opt.env, env[opt.env], True
            names[opt.attr] = opt.env
        else:
            continue
        if not parse:
            values[opt.attr] = raw
            continue
        try:
            values[opt.attr] = _convert(opt, raw)
        except (TypeError, ValueError) as exc:
            problems.append(f"{source}: {exc}")
            unparsed.add(opt.attr)
    problems += _check(values, names, skip=unparsed)
    if problems:
        raise ConfigError(problems)
    return ExporterConfig(**values)


def _check(
    values: Mapping[str, Any], names: Mapping[str, str] | None = None, skip: Set[str] = frozenset()
) -> list[str]:
    """One problem per bad value, named by its source in ``names`` or else by its YAML key."""
    names = names or {}
    return [
        f"{names.get(o.attr, o.yaml)}: {err}"
        for o in OPTIONS
        if o.attr not in skip and (err := o.check(values[o.attr])) is not None
    ]
