"""Framework-agnostic core: a plain PyTorch loop (or the Trainer callback) feeds it events.

Design for the hot path:
  * values that live on the accelerator (loss, token counts, gradient and
    update norms, logit statistics) are kept as device tensors and read in one
    batch at export time: on every scrape, at each logging step and when the
    run ends. No per-step GPU->host synchronisation is added;
  * per-layer statistics use fused ``torch._foreach_norm`` and a scatter-add,
    never a Python loop of ``.item()`` calls;
  * every entry point is guarded: a failure is counted in
    ``training_exporter_collector_errors_total`` and logged once, never raised.

Plain loop usage (settings from ``TRAINING_EXPORTER_*`` variables and the file
they name, as for the callback; the fixed evaluation is optional, see
:meth:`TrainingMonitor.set_evaluation`)::

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from exporter import TrainingMonitor

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (20, 4, 16))]

    monitor = TrainingMonitor(run_id="my-run", output_dir="runs/my-run")
    monitor.start()                     # serve /metrics (default :9945)
    monitor.describe_model(model)       # training_info: model type, adapter
    monitor.watch(model)                # forward hook: loss, tokens, logits (and drift)
    monitor.begin(max_steps=len(batches))
    for batch in batches:
        monitor.step_begin()
        loss = model(**batch).loss
        loss.backward()
        monitor.observe_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        monitor.before_optimizer_step(optimizer)
        optimizer.step()
        monitor.after_optimizer_step()
        optimizer.zero_grad()
        monitor.step_end()
    monitor.end()
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import lifecycle, stats
from exporter import metrics as m
from exporter.amp import ScalerWatch
from exporter.config import ExporterConfig
from exporter.drift import DriftProfiler, padding_free_real
from exporter.errors import ErrorTracker
from exporter.evaluation import Contract, EvalExport, FixedEvaluator
from exporter.flops import FlopMeter, backbone_of, device_peak, output_embedding
from exporter.layers import ParamGroups
from exporter.phases import CheckpointLog, PhaseTimer, checkpoint_duration
from exporter.server import MetricsServer, ServerHooks, SharedExposition
from exporter.version import __version__
from exporter.watchdog import HangWatchdog

log = logging.getLogger("training_exporter")

# Read the device-side buffers in the training thread once this many steps are
# pending without a scrape, so memory stays bounded when nobody is scraping.
MAX_PENDING_STEPS = 512
MAX_EVAL_NAMES = 50
# The statistics of training_statistic_unavailable{statistic}.
_PREDICTION_SERIES = ("token_entropy", "top1_confidence", "top5_confidence")


class PortInUseError(OSError):
    pass


class _ScrapeCollector(Collector):
    """Runs the scrape-time work, times each part and isolates its failures.

    Registered first so that the device-side buffers are flushed into the
    ordinary metrics before the registry reads them.
    """

    def __init__(self, parts: list[tuple[str, Callable[[], Iterable[Metric]]]], monitor: TrainingMonitor) -> None:
        self._parts = parts
        self._monitor = monitor

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        mon = self._monitor
        durations = GaugeMetricFamily(
            m.COLLECTOR_DURATION.name, m.COLLECTOR_DURATION.help,
            labels=[*mon.const_labels, "collector"],
        )
        for name, part in self._parts:
            start = time.perf_counter()
            families: list[Metric] = []
            with mon.errors.guard(name):
                families = list(part())
            durations.add_metric([*mon.const_labels.values(), name], time.perf_counter() - start)
            yield from families
        yield durations


class TrainingMonitor:
    """Owns the registry, the metrics and the HTTP endpoint of one training process.

    A plain PyTorch loop calls its methods at the points named in this
    module's docstring; :class:`~exporter.PrometheusCallback` calls them from
    the Trainer's hooks. Every method past the constructor counts and logs a
    failure instead of raising it (``training_exporter_collector_errors_total``).

    Args:
        config: every setting; None reads them as the callback does: the
            ``TRAINING_EXPORTER_*`` environment variables, then the YAML file
            named by ``TRAINING_EXPORTER_CONFIG_FILE``, then the defaults.
        run_id: the ``run_id`` label of every series, unless ``config.run_id`` is set.
        output_dir: the run's output directory: the disk whose free space the host
            collector reports, and the parent of the preview history
            (``logs/preview``) unless ``history.dir`` is set (default: the
            working directory).
        rank: this process's global rank (default: ``$RANK`` or 0).
        local_rank: its rank on this machine (default: ``$LOCAL_RANK`` or 0);
            with ``ranks="all"`` the endpoint listens on ``port + local_rank``.
        registry: the registry to fill; a fresh ``CollectorRegistry`` when None,
            so that two monitors in one process never collide.

    Raises:
        ConfigError: ``config`` is None and the environment or the config file
            holds a bad value (all of them listed in one error).
        PortInUseError: from :meth:`start`, when the listen address is taken and
            ``web.port_in_use`` is ``"fail"``.

    Example::

        from prometheus_client import CollectorRegistry
        from exporter import ExporterConfig, TrainingMonitor

        registry = CollectorRegistry()
        with TrainingMonitor(ExporterConfig(listen_address="127.0.0.1:0"), run_id="r1",
                             registry=registry) as monitor:  # leaving it ends the run
            monitor.start()  # serve /metrics
            monitor.watch(model)
            monitor.begin(max_steps=100)
            ...  # step_begin / before_optimizer_step / after_optimizer_step / step_end per step
        registry.get_sample_value("training_loss", {"run_id": "r1"})
    """

    def __init__(
        self,
        config: ExporterConfig | None = None,
        *,
        run_id: str = "run",
        output_dir: str | os.PathLike[str] | None = None,
        rank: int | None = None,
        local_rank: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if config is None:
            from exporter.config import resolve_settings

            # The same sources as the callback: environment, then the file it names, then defaults.
            config = resolve_settings({})
        self.config = config
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        self.run_id = self.config.run_id or run_id
        self.output_dir = str(output_dir) if output_dir is not None else "."
        const: dict[str, str] = {"run_id": self.run_id, **self.config.labels}
        if self.config.ranks == "all":
            const["rank"] = str(self.rank)
        self.const_labels = const
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)

        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        for spec in (m.HTTP_REQUESTS, m.HTTP_REFUSED, m.EXPOSITION_RENDERS):
            self._metrics[spec.name] = self._make(spec)
        self.exposition = SharedExposition(self.registry, self.config.scrape_window_seconds,
                                           on_render=self.child(m.EXPOSITION_RENDERS).inc)
        self._scrape = _ScrapeCollector(self._scrape_parts(), self)
        self.registry.register(self._scrape)
        for spec in m.ALL:
            if spec.source == "core":
                self._metrics[spec.name] = self._make(spec)
        self.errors = ErrorTracker(self._make(m.COLLECTOR_ERRORS), const)  # type: ignore[arg-type]
        for name in ("hook", "step", "gradients", "update_ratio", "predictions", "flush", "http_server"):
            self.errors.touch(name)
        # Counters exist at 0 from the start so increase() sees their first step.
        for spec in (m.NONFINITE_LOSS, m.NONFINITE_GRADIENTS, m.TOKENS, m.SAMPLES, m.EVALUATIONS):
            self.child(spec)
        # Fixed evaluation (see set_evaluation) and dataset drift, both exported at scrape time.
        self.eval_export = EvalExport(const)
        self.evaluator: FixedEvaluator | None = None
        self.drift: DriftProfiler | None = None
        if self.config.drift:
            cfg = self.config
            self.drift = DriftProfiler(
                const, self.errors, window=cfg.drift_window, reference_batches=cfg.drift_reference_batches,
                top_k=cfg.drift_top_k, max_length=cfg.drift_max_length, sample_every=cfg.drift_sample_every,
            )
            self.errors.touch("drift")

        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending_losses: list[torch.Tensor] = []
        self._pending_loss_times: list[float] = []
        self._pending_tokens: list[torch.Tensor] = []
        self._pending_token_count = 0
        self._pending_samples = 0
        self._pending_grads: torch.Tensor | None = None
        self._pending_grad_norm: torch.Tensor | float | None = None
        self._pending_updates: torch.Tensor | None = None
        self._pending_predictions: torch.Tensor | None = None

        # Per micro-batch of the current step: (loss as the model returned it, what its loss-token count is
        # taken from, num_items_in_batch or None); see stats.step_loss for how they make the step loss.
        self._micro: list[stats.MicroBatch] = []
        # Whether a num_items_in_batch the model sees counts this process's tokens only; False under DDP
        # with the Trainer's average_tokens_across_devices, where it counts every rank's (set by the callback).
        self.items_are_local = True
        self._pending_nonfinite_grads: torch.Tensor | None = None
        self._pending_sample_tensors: list[torch.Tensor] = []
        self._nonfinite_grad_warned = False
        self._loss_stats = stats.LossStats(self.config.ema_alpha, self.config.variance_window,
                                           self.config.loss_window_seconds)

        self._groups: ParamGroups | None = None
        self._hook: Any = None
        self._pre_hook: Any = None
        # A fused LM head returns no logits: the backbone's last hidden state of a sampled forward pass.
        self._backbone_hook: Any = None
        self._hidden: torch.Tensor | None = None
        self._unavailable_seen: set[str] = set()
        self._step = 0
        self._step_started: float | None = None
        self._sample_layers = False
        self._sample_updates = False
        self._sample_predictions = False
        # perf_counter() of the last sampled step per statistic (min_sample_period_seconds).
        self._last_sample = {"layers": -math.inf, "updates": -math.inf, "predictions": -math.inf}
        # Statistics owed a sample: the first step of every process (a resumed run included) and, for
        # update ratios, the first step whose learning rate is not 0 (warmup from 0 updates nothing).
        self._owed = {"layers": True, "updates": True, "predictions": True}
        self._snapshot: list[torch.Tensor] | None = None
        self.export_layers = True  # False on ranks whose gradients duplicate rank 0's
        self.compute_global_grad_norm = True

        self._state = "idle"
        self._set_state("idle")
        self._httpd: Any = None
        self._gpu: Any = None
        self._cuda: Any = None
        # CUDA indices of the watched model's parameters: the scrape thread cannot ask for the current device.
        self.cuda_devices: frozenset[int] = frozenset()
        self._host: Any = None
        self._ended = False
        self._atexit_registered = False
        # (perf_counter(), step) of the last step_end, one tuple store: all the hang watchdog reads of the
        # training thread (exporter/watchdog.py).
        self.step_progress: tuple[float, int] | None = None
        self.amp: ScalerWatch | None = None  # see watch_scaler
        # Model / hardware FLOPs of the watched model (exporter/flops.py); the Trainer's bf16 / fp16 autocast
        # dtype, set by the callback before watch(), picks the peak FLOP/s.
        self.flops: FlopMeter | None = None
        self.autocast_dtype: str | None = None
        if self.config.flops:
            self.errors.touch("flops")
            self.child(m.MODEL_FLOPS)
            self.child(m.HARDWARE_FLOPS)
        # Step phases (exporter/phases.py): always kept (the watchdog reads phase_timer.current), exported
        # with collectors.phases.
        self.phase_timer = PhaseTimer(enabled=self.config.phases)
        self.checkpoints = CheckpointLog()
        if self.config.phases:
            self.errors.touch("phases")
            for phase in m.PHASES:
                self.child(m.PHASE_SECONDS, phase)
        self.child(m.CHECKPOINTS)
        self.watchdog: HangWatchdog | None = None
        if self.config.watchdog:
            self.errors.touch("watchdog")
            self.watchdog = HangWatchdog(self, self.config.watchdog_multiple, self.config.watchdog_floor_seconds)

    # ------------------------------------------------------------------ setup

    def _make(self, spec: m.MetricSpec) -> Counter | Gauge | Histogram:
        labelnames = [*self.const_labels, *spec.labels]
        if spec.kind == "counter":
            return Counter(spec.name, spec.help, labelnames, registry=self.registry)
        if spec.kind == "histogram":
            return Histogram(spec.name, spec.help, labelnames, registry=self.registry, buckets=spec.buckets)
        return Gauge(spec.name, spec.help, labelnames, registry=self.registry)

    def child(self, spec: m.MetricSpec, *values: str) -> Any:
        key = (spec.name, values)
        c = self._children.get(key)
        if c is None:
            c = self._metrics[spec.name].labels(*self.const_labels.values(), *values)
            self._children[key] = c
        return c

    def _scrape_parts(self) -> list[tuple[str, Callable[[], Iterable[Metric]]]]:
        def flush() -> Iterable[Metric]:
            self.flush()
            return ()

        parts: list[tuple[str, Callable[[], Iterable[Metric]]]] = [("flush", flush)]
        if self.config.gpu:
            parts.append(("gpu", lambda: self._gpu.collect() if self._gpu is not None else ()))
        if self.config.cuda:  # after "gpu", whose UUID -> NVML index map it labels with
            parts.append(("cuda", lambda: self._cuda.collect() if self._cuda is not None else ()))
        if self.config.host:
            parts.append(("host", lambda: self._host.collect() if self._host is not None else ()))
        parts.append(("eval", lambda: self.eval_export.collect()))
        if self.config.drift:
            parts.append(("drift", lambda: self.drift.collect() if self.drift is not None else ()))
        return parts

    def start_collectors(self) -> None:
        if self.config.gpu and self._gpu is None:
            with self.errors.guard("gpu"):
                from exporter.collectors.gpu import GpuCollector

                self._gpu = GpuCollector(self.const_labels, self.errors)
        if self.config.cuda and self._cuda is None:
            self.errors.touch("cuda")
            with self.errors.guard("cuda"):
                from exporter.collectors.cuda import CudaCollector

                self._cuda = CudaCollector(
                    self.const_labels, self.errors, devices=lambda: self.cuda_devices,
                    nvml_index=lambda uuid: self._gpu.index_of(uuid) if self._gpu is not None else None,
                )
        if self.config.host and self._host is None:
            with self.errors.guard("host"):
                from exporter.collectors.host import HostCollector

                self._host = HostCollector(self.const_labels, self.errors, disk_path=self.output_dir)

    @property
    def port(self) -> int | None:
        """The port actually bound (useful with port 0), or None when not serving."""
        return int(self._httpd.server_address[1]) if self._httpd is not None else None

    def start(self) -> None:
        """Serve /metrics. A taken port (or a web config file that no longer loads) is logged in one line and
        counted, or raised if configured (``web.port_in_use: fail``); never served without its TLS or auth."""
        self.start_collectors()
        with self.errors.guard("http_server"):
            lifecycle.keep_serving(self)
        if self._httpd is not None:
            return
        host, port = self.config.host_port
        if self.config.ranks == "all" and port != 0:
            port += self.local_rank
        try:
            self._httpd = self.serve(host, port)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError):
                message = f"training-exporter: cannot listen on {host}:{port}: {exc.strerror or exc}"
            else:
                message = f"training-exporter: {exc}"
            if self.config.port_in_use == "fail":
                raise PortInUseError(message) from None
            log.error("%s; training continues without a /metrics endpoint", message)
            self.errors.record("http_server", exc, logged=True)
            return
        with self.errors.guard("http_server"):
            lifecycle.watch_scrapes(self, self._httpd)

    def serve(self, host: str, port: int) -> MetricsServer:
        """A started :class:`~exporter.server.MetricsServer` of this monitor's exposition on ``host:port``.

        Raises:
            OSError: the address cannot be bound.
            WebConfigError: ``web.config_file`` cannot be used (a ``ValueError``).
        """
        cfg = self.config
        web = None
        if cfg.web_config_file:
            from exporter.web import WebConfigSource

            web = WebConfigSource(cfg.web_config_file,
                                  on_error=lambda exc: self.errors.record("http_server", exc))
        hooks = ServerHooks(
            on_request=lambda code: self.child(m.HTTP_REQUESTS, str(code)).inc(),
            on_refused=lambda reason: self.child(m.HTTP_REFUSED, reason).inc(),
            on_error=lambda exc: self.errors.record("http_server", exc),
        )
        return MetricsServer(host, port, self.exposition, web=web, max_connections=cfg.max_connections,
                             read_timeout=cfg.read_timeout_seconds, idle_timeout=cfg.idle_timeout_seconds,
                             max_requests_per_second=cfg.max_requests_per_second, hooks=hooks).start()

    def stop(self) -> None:
        """Stop serving now (:meth:`end` does it once the final state has been scraped)."""
        # Taken first: the final-scrape closer and the training thread may both stop it.
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            with self.errors.guard("http_server"):
                lifecycle.stopped(self)
            httpd.shutdown()
            httpd.server_close()
        if self._gpu is not None:
            with self.errors.guard("gpu"):
                self._gpu.close()
        if self.watchdog is not None:
            with self.errors.guard("watchdog"):
                self.watchdog.stop()

    def set_info(self, model: str = "", model_type: str = "", adapter: str = "none") -> None:
        import importlib.metadata as md

        try:
            tf_version = md.version("transformers")
        except md.PackageNotFoundError:
            tf_version = ""
        self.child(m.INFO, model, model_type, adapter, __version__, torch.__version__, tf_version).set(1)

    def describe_model(self, model: torch.nn.Module) -> None:
        """Fill training_info from a model's (transformers-style) config and peft adapter, where present."""
        config = getattr(model, "config", None)
        name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
        model_type = str(getattr(config, "model_type", "") or "")
        adapter = "none"
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict) and peft_config:
            first = next(iter(peft_config.values()))
            adapter = str(getattr(getattr(first, "peft_type", None), "value", "") or "peft").lower()
        self.set_info(model=name[-128:], model_type=model_type, adapter=adapter)

    def watch(self, model: torch.nn.Module) -> None:
        """Hook the model's forward to see loss, token counts and logits of every micro-batch."""
        with self.errors.guard("hook"):
            if self._hook is not None:
                self._hook.remove()
            self._groups = ParamGroups.from_named(model.named_parameters())
            self.cuda_devices = frozenset(
                p.device.index for p in model.parameters() if p.device.type == "cuda" and p.device.index is not None)
            self.child(m.TRAINABLE_GROUPS).set(len(self._groups))
            self._hook = model.register_forward_hook(self._forward_hook, with_kwargs=True)
            if self._pre_hook is not None:
                self._pre_hook.remove()
            self._pre_hook = model.register_forward_pre_hook(self._forward_pre_hook)
            cuda = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
            self.phase_timer.use_device(cuda)
            backbone = backbone_of(model)
            if backbone is not None and self.config.predictions:
                self._backbone_hook = backbone.register_forward_hook(self._backbone_forward_hook)
        if self.drift is not None:
            with self.errors.guard("drift"):
                self.drift.attach(model)
        if self.config.flops:
            with self.errors.guard("flops"):
                self._watch_flops(model)

    def _watch_flops(self, model: torch.nn.Module) -> None:
        if self.flops is not None:
            self.flops.close()
            model_flops, hardware_flops = self.flops.take()  # the previous model's, not yet exported
            self.child(m.MODEL_FLOPS).inc(model_flops)
            self.child(m.HARDWARE_FLOPS).inc(hardware_flops)
        self.flops = FlopMeter(model, on_error=lambda exc: self.errors.record("flops", exc))
        cfg_peak = self.config.peak_flops
        peak = cfg_peak if cfg_peak > 0 else device_peak(model, self.autocast_dtype)
        if peak:
            self.child(m.PEAK_FLOPS).set(peak)

    def unwatch(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        if self._backbone_hook is not None:
            self._backbone_hook.remove()
            self._backbone_hook = None
        self._hidden = None
        if self.flops is not None:
            self.flops.close()  # only the first step's observation hooks; the counts stay

    def watch_scaler(self, scaler: Any) -> None:
        """Export the loss scale and skipped steps of an fp16 ``torch.amp.GradScaler`` (``collectors.amp``).

        Call :meth:`step_end` after ``scaler.update()``: a step counts as skipped when it lowered the
        scale, compared on the device; the scale is read at export (see :mod:`exporter.amp`).
        """
        if not self.config.amp or scaler is None:
            return
        with self.errors.guard("amp"):
            self.errors.touch("amp")
            self.amp = ScalerWatch(scaler)
            self.child(m.AMP_SKIPPED_STEPS)

    def begin(self, max_steps: int | None = None, start_step: int = 0) -> None:
        with self.errors.guard("step"):
            self._step = start_step
            self._ended = False
            self.child(m.STEP).set(start_step)
            if max_steps is not None:
                self.child(m.MAX_STEPS).set(max_steps)
            self.child(m.START_TIME).set(time.time())
            self._set_state("training")
            self.phase_timer.start("data_loading")
            self._install_crash_handlers()
        if self.watchdog is not None:
            self.step_progress = None  # armed again from the first step of this run
            with self.errors.guard("watchdog"):
                self.watchdog.start()

    # -------------------------------------------------------------- hot path

    def _backbone_forward_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # Only on a sampled step, and only a reference (the tensor is alive in the graph anyway).
        if self._sample_predictions and module.training:
            hidden = _field(output, "last_hidden_state", 0)
            if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
                self._hidden = hidden.detach()

    def _forward_pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        if module.training:
            self.mark_phase("forward")

    def _forward_hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not module.training:
            return
        try:
            self._observe_forward(module, args, kwargs, output)
        finally:
            self.mark_phase("backward")

    def _observe_forward(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        try:
            loss = _field(output, "loss", 0)
            if isinstance(loss, torch.Tensor):
                count = stats.label_source(module, output, kwargs)
                # Under average_tokens_across_devices the Trainer scales the returned loss in place afterwards
                # (loss *= world size), which a detached view would follow: a copy then.
                kept = loss.detach() if self.items_are_local else loss.detach().clone()
                self._micro.append((kept, count, kwargs.get("num_items_in_batch")))
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            mask = mask if isinstance(mask, torch.Tensor) else None
            positions = kwargs.get("position_ids")
            positions = positions if isinstance(positions, torch.Tensor) else None
            if isinstance(input_ids, torch.Tensor):
                if self.flops is not None:
                    self.flops.observe(input_ids, kwargs, output)
                self._observe_samples(input_ids, mask, positions, kwargs.get("cu_seq_lens_q"))
                self.observe_tokens(mask.sum() if mask is not None else input_ids.numel())
                if self.drift is not None:
                    self.drift.observe_forward(input_ids, mask, position_ids=positions)
            if self._sample_predictions:
                self._sample_predictions = False
                with self.errors.guard("predictions"):
                    self._observe_predictions(module, output, kwargs.get("labels"), mask)
                self._hidden = None
        except Exception as exc:
            self.errors.record("hook", exc)

    def _observe_samples(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cu_seq_lens: Any
    ) -> None:
        """Count the sequences of a batch, packed ones included, without a device->host sync.

        A padding-free (packed) batch is one row of several sequences: the
        batch says where they start, by ``cu_seq_lens_q`` (its length is known
        on the host) or by ``position_ids`` restarting at 0 (counted on the
        device; padding slots, where a mask marks them, are not starts). A
        padded batch is one sequence per row, which the position ids agree with.
        """
        if isinstance(cu_seq_lens, torch.Tensor) and cu_seq_lens.dim() == 1 and cu_seq_lens.numel() > 1:
            with self._pending_lock:
                self._pending_samples += cu_seq_lens.numel() - 1
            return
        if positions is not None and positions.shape == input_ids.shape and positions.dim() == 2:
            starts = positions == 0
            if mask is not None and mask.shape == starts.shape:
                starts = starts & (mask != 0)
            else:
                # Padding slots of a padding-free row also carry position id 0: not sequences.
                index = torch.arange(positions.shape[1], device=positions.device)
                starts = starts & padding_free_real(positions, index)
            with self._pending_lock:
                self._pending_sample_tensors.append(starts.sum())
            return
        with self._pending_lock:
            self._pending_samples += input_ids.shape[0] if input_ids.dim() > 1 else 1

    def observe_tokens(self, tokens: torch.Tensor | int) -> None:
        """Add non-padding tokens; a device tensor is accumulated on the device and read at export."""
        with self._pending_lock:
            if isinstance(tokens, torch.Tensor):
                # Summed at export in one op: cheaper in the loop than a running add.
                self._pending_tokens.append(tokens.detach())
            else:
                self._pending_token_count += int(tokens)

    def observe_loss(self, loss: torch.Tensor | float, tokens: torch.Tensor | int | None = None) -> None:
        """Record a loss of the current step directly (for loops whose model returns no ``.loss``).

        Call it once per micro-batch; ``tokens``, the micro-batch's count of
        loss tokens, weights the step loss by tokens as the trainers do
        (without it the micro-batch losses are averaged).
        """
        t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._micro.append((t, None if tokens is None else ("count", tokens), None))

    def observe_grad_norm(self, norm: torch.Tensor | float) -> None:
        """Global pre-clip gradient norm; a tensor (e.g. clip_grad_norm_'s result) is read at export."""
        with self._pending_lock:
            self._pending_grad_norm = norm.detach() if isinstance(norm, torch.Tensor) else float(norm)

    def _observe_predictions(self, module: torch.nn.Module, output: Any, labels: Any, mask: Any) -> None:
        """Entropy and confidence from the output's logits, or, where a fused LM head returns none (TRL's
        ``fused_lm_head=True``: per-token log-probabilities instead), from the backbone's last hidden state
        projected through the output embedding at the same bounded sample of labelled positions."""
        logits = _field(output, "logits", 1)
        if isinstance(logits, torch.Tensor):
            self._observe_logits(logits, labels, mask)
            return
        head = output_embedding(module)
        if self._hidden is None or head is None:
            self._predictions_unavailable("no_logits", "the model's output has neither logits nor a hidden state")
            return
        self._observe_logits(self._hidden, labels, mask, head=head)

    def _predictions_unavailable(self, reason: str, why: str) -> None:
        if reason not in self._unavailable_seen:
            self._unavailable_seen.add(reason)
            log.warning("training-exporter: entropy and confidence not exported: %s", why)
            for name in _PREDICTION_SERIES:
                self.child(m.STATISTIC_UNAVAILABLE, name, reason).set(1)

    def _observe_logits(
        self, logits: torch.Tensor, labels: Any, mask: Any, head: torch.nn.Module | None = None
    ) -> None:
        """Entropy and top-1 / top-5 confidence over a bounded number of labelled positions.

        Fixed-size on purpose: a boolean-mask selection would need a device->host
        sync to learn its size, and a softmax over every position of a large
        vocabulary would double the logits' memory. Positions are drawn with
        topk over "labelled + random tie-break" scores, which prefers labelled
        ones and has a static shape; unlabelled picks get weight 0.
        """
        sums = stats.logit_statistics(logits, labels, mask, head)
        with self._pending_lock:
            self._pending_predictions = sums

    def mark_phase(self, phase: str) -> None:
        """Close the open step phase and open ``phase`` (one of ``metrics.PHASES``; see exporter/phases.py)."""
        try:
            self.phase_timer.mark(phase)
        except Exception as exc:
            self.errors.record("phases", exc)

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Count the block as ``phase`` (e.g. a plain loop's own evaluation), then reopen the phase before it."""
        before = self.phase_timer.current
        self.mark_phase(phase)
        try:
            yield
        finally:
            self.mark_phase(before)

    @contextlib.contextmanager
    def checkpointing(self, step: int | None = None, path: str | os.PathLike[str] | None = None) -> Iterator[None]:
        """Time the save in the block as a checkpoint of ``step`` written to the directory ``path`` (whose
        size a worker thread measures); then reopen the phase before it."""
        before = self.phase_timer.current
        self.mark_phase("checkpointing")
        try:
            yield
        finally:
            self.observe_checkpoint(step, path, next_phase=before)

    def step_begin(self) -> None:
        # Up to the watched model's forward: input preparation and DDP's pre-forward buffer broadcast, which
        # waits for every rank: "other", not forward (exporter/phases.py).
        self.mark_phase("other")

        try:
            self._step_started = time.perf_counter()
            n = self._step + 1
            cfg = self.config
            owed = self._owed
            self._sample_layers = self._sample_due(
                "layers", cfg.layers and self.export_layers and (owed["layers"] or n % cfg.layers_interval == 0))
            self._sample_updates = self._sample_due(
                "updates", cfg.update_ratio and self.export_layers
                and (owed["updates"] or n % cfg.update_ratio_interval == 0))
            self._sample_predictions = self._sample_due(
                "predictions", cfg.predictions and (owed["predictions"] or n % cfg.predictions_interval == 0))
            if self._sample_layers:
                owed["layers"] = False
            if self._sample_predictions:
                owed["predictions"] = False
        except Exception as exc:
            self.errors.record("step", exc)

    def _sample_due(self, what: str, due: bool) -> bool:
        """Whether a due sample is taken: at most one per ``min_sample_period_seconds``.

        Samples are gauges that the next one overwrites, and a scrape reads only
        the newest, so on fast steps (a 10 ms step, a 15 s scrape interval) all
        but a few samples per interval would be computed for nothing; the
        exported value is at most one period older than the newest step.
        """
        if not due:
            return False
        now = self._step_started if self._step_started is not None else time.perf_counter()
        if now - self._last_sample[what] < self.config.min_sample_period_seconds:
            return False
        self._last_sample[what] = now
        return True

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after backward (and clipping), before ``optimizer.step()``."""
        self.mark_phase("optimizer")
        lr_zero = False
        if optimizer is not None:
            with self.errors.guard("step"):
                lr = optimizer.param_groups[0]["lr"]
                self.child(m.LEARNING_RATE).set(float(lr))
                # A host value (a tensor lr would be read on the host here, so only plain numbers count).
                lr_zero = all(isinstance(g.get("lr"), (int, float)) and g["lr"] == 0 for g in optimizer.param_groups)
        if self._sample_updates:
            if lr_zero:
                # Warmup from 0: this update is nothing, a sample of it would show 0 until the next one.
                self._sample_updates = False
                self._owed["updates"] = True
                self._last_sample["updates"] = -math.inf  # nothing was sampled: no period to wait
            else:
                self._owed["updates"] = False
        groups = self._groups
        if groups is None or len(groups) == 0:
            return
        if self._sample_layers:
            with self.errors.guard("gradients"):
                norms = groups.grouped_norms([p.grad for p in groups.params])
                # Every sampled step counts, not only the newest before a read: summed on the device.
                bad = (~torch.isfinite(norms)).any().long()
                with self._pending_lock:
                    self._pending_grads = norms
                    prev = self._pending_nonfinite_grads
                    self._pending_nonfinite_grads = bad if prev is None else prev + bad.to(prev.device)
                    # Without a norm from the loop (clip_grad_norm_'s result or the
                    # Trainer's logs) the sampled per-group norms give the global one.
                    if self.compute_global_grad_norm and self._pending_grad_norm is None:
                        self._pending_grad_norm = norms.square().sum().sqrt()
        if self._sample_updates:
            with self.errors.guard("update_ratio"):
                with torch.no_grad():
                    # Allocated per sampled step, not kept: a full fine-tune's copy is large.
                    self._snapshot = [p.clone() for p in groups.params]

    def after_optimizer_step(self) -> None:
        """Call right after ``optimizer.step()``; completes a sampled update-ratio measurement."""
        self.mark_phase("other")
        snap, self._snapshot = self._snapshot, None
        groups = self._groups
        if snap is None or groups is None:
            return
        with self.errors.guard("update_ratio"):
            with torch.no_grad():
                # In place: the snapshot becomes W_before - W_after (the sign does not
                # matter for a norm), and the ratio is taken to the updated weights.
                current: list[torch.Tensor] = list(groups.params)
                torch._foreach_sub_(snap, current)
                delta_norm, weight_norm = groups.grouped_norms(snap, current)
                ratio = delta_norm / weight_norm.clamp_min(1e-30)
            with self._pending_lock:
                self._pending_updates = ratio

    def step_end(
        self, step: int | None = None, epoch: float | None = None, *, next_phase: str = "data_loading"
    ) -> None:
        """An optimizer step ended; ``next_phase`` is what the loop does next (exporter/phases.py)."""
        self.mark_phase(next_phase)
        try:
            now = time.perf_counter()
            if self._step_started is not None:
                self.child(m.STEP_DURATION).observe(now - self._step_started)
                self._step_started = None
            self._step = self._step + 1 if step is None else step
            self.child(m.STEP).set(self._step)
            self.step_progress = (now, self._step)
            if self.flops is not None:
                self.flops.settle()  # the first step's backward is done: its cost is known
            if self.amp is not None:
                with self.errors.guard("amp"):
                    self.amp.step_end()
            if epoch is not None:
                self.child(m.EPOCH).set(epoch)
            self.child(m.LAST_STEP_TIME).set(time.time())
            micro, self._micro = self._micro, []
            if micro:
                step_loss = stats.step_loss(micro, self.items_are_local)
                with self._pending_lock:
                    self._pending_losses.append(step_loss)
                    self._pending_loss_times.append(time.monotonic())
                    backlog = len(self._pending_losses)
                if backlog >= MAX_PENDING_STEPS or len(self._pending_tokens) >= 4 * MAX_PENDING_STEPS:
                    self.flush()
        except Exception as exc:
            self.errors.record("step", exc)

    # ----------------------------------------------------------------- export

    def flush(self) -> None:
        """Read the device-side buffers (one batched transfer each) into the metrics."""
        with self._flush_lock:
            with self._pending_lock:
                losses, self._pending_losses = self._pending_losses, []
                loss_times, self._pending_loss_times = self._pending_loss_times, []
                tokens, self._pending_tokens = self._pending_tokens, []
                token_count, self._pending_token_count = self._pending_token_count, 0
                samples, self._pending_samples = self._pending_samples, 0
                grads, self._pending_grads = self._pending_grads, None
                gnorm, self._pending_grad_norm = self._pending_grad_norm, None
                updates, self._pending_updates = self._pending_updates, None
                preds, self._pending_predictions = self._pending_predictions, None
                nonfinite, self._pending_nonfinite_grads = self._pending_nonfinite_grads, None
                sample_counts, self._pending_sample_tensors = self._pending_sample_tensors, []
            try:
                losses_finite = True
                if losses:
                    loss_values = torch.stack([t.reshape(()).to(losses[0].device) for t in losses]).double().tolist()
                    losses_finite = all(math.isfinite(v) for v in loss_values)
                    self._export_losses(loss_values, loss_times)
                self._export_recent_max()
                if tokens:
                    token_count += int(torch.stack([t.reshape(()).to(tokens[0].device) for t in tokens]).sum())
                if token_count:
                    self.child(m.TOKENS).inc(token_count)
                if self.flops is not None:
                    model_flops, hardware_flops = self.flops.take()
                    if model_flops:
                        self.child(m.MODEL_FLOPS).inc(model_flops)
                        self.child(m.HARDWARE_FLOPS).inc(hardware_flops)
                if sample_counts:
                    samples += int(torch.stack([t.reshape(()).to(sample_counts[0].device)
                                                for t in sample_counts]).sum())
                if samples:
                    self.child(m.SAMPLES).inc(samples)
                if gnorm is not None:
                    self.child(m.GRAD_NORM).set(float(gnorm))
                if grads is not None and self._groups is not None:
                    values = grads.tolist()
                    for (layer, module), v in zip(self._groups.labels, values, strict=True):
                        self.child(m.LAYER_GRAD_NORM, layer, module).set(v)
                    self.child(m.DEAD_LAYERS).set(sum(1 for v in values if v == 0.0))
                if nonfinite is not None:
                    bad = int(nonfinite)
                    if bad:
                        self.child(m.NONFINITE_GRADIENTS).inc(bad)
                        self._warn_nonfinite_gradients(losses_finite)
                if updates is not None and self._groups is not None:
                    for (layer, module), v in zip(self._groups.labels, updates.tolist(), strict=True):
                        self.child(m.UPDATE_RATIO, layer, module).set(v)
                if preds is not None and (means := stats.predictions(preds.tolist())) is not None:
                    self.child(m.TOKEN_ENTROPY).set(means.entropy)
                    self.child(m.TOP1_CONFIDENCE).set(means.top1)
                    self.child(m.TOP5_CONFIDENCE).set(means.top5)
            except Exception as exc:
                self.errors.record("flush", exc)
            if self.config.phases:
                with self.errors.guard("phases"):
                    for phase, seconds in self.phase_timer.take().items():
                        if seconds > 0:
                            self.child(m.PHASE_SECONDS, phase).inc(seconds)
            if self.amp is not None:
                with self.errors.guard("amp"):
                    scale, skipped = self.amp.read()
                    if scale is not None:
                        self.child(m.AMP_LOSS_SCALE).set(scale)
                    if skipped:
                        self.child(m.AMP_SKIPPED_STEPS).inc(skipped)

    def _warn_nonfinite_gradients(self, losses_finite: bool) -> None:
        if self._nonfinite_grad_warned or not losses_finite:
            return
        self._nonfinite_grad_warned = True
        # The loss metrics are the model's own loss (its forward's output); a loss computed or changed after
        # the forward (a subclassed compute_loss, compute_loss_func) is not seen by them.
        log.warning("training-exporter: non-finite gradients while the model's loss was finite: the loss that "
                    "was backpropagated is not the model's output (custom compute_loss?); counted in "
                    "training_nonfinite_gradients_total, the loss metrics show the model's loss")

    def _export_losses(self, values: list[float], times: list[float]) -> None:
        hist = self.child(m.STEP_LOSS)
        for v, t in zip(values, times, strict=True):
            if self._loss_stats.observe(v, t):
                hist.observe(v)
            else:
                # Histogram.observe(NaN) would poison _sum forever: count instead.
                self.child(m.NONFINITE_LOSS).inc()
        # The raw gauge shows the newest value as it is, NaN included, so rules see it.
        self.child(m.LOSS).set(values[-1])
        if self._loss_stats.ema is not None:
            self.child(m.LOSS_EMA).set(self._loss_stats.ema)
        if (variance := self._loss_stats.variance()) is not None:
            self.child(m.LOSS_VARIANCE).set(variance)

    def _export_recent_max(self) -> None:
        recent = self._loss_stats.recent_max(time.monotonic())
        if recent is not None:
            self.child(m.LOSS_RECENT_MAX).set(recent[0])
            self.child(m.LOSS_SPIKE_RATIO).set(recent[1])

    def observe_evaluation(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Export an evaluation's numbers, run at ``step`` (default: the last optimizer step)."""
        with self.errors.guard("evaluation"):
            self.child(m.EVALUATIONS).inc()
            # Set before the loss: a scrape landing in between pairs the new step
            # with the previous loss, which the next scrape corrects, never the reverse.
            self.child(m.EVAL_STEP).set(self._step if step is None else step)
            names = 0
            for key, value in metrics.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = value.item()
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if key in ("eval_loss", "loss"):
                    self.child(m.EVAL_LOSS).set(value)
                    self.eval_export.observe_loss(float(value), self._step if step is None else step)
                    continue
                if key == "epoch" or names >= MAX_EVAL_NAMES:
                    continue
                name = re.sub(r"[^a-zA-Z0-9_]", "_", key.removeprefix("eval_"))[:64]
                self.child(m.EVAL_METRIC, name).set(value)
                names += 1

    def observe_checkpoint(
        self, step: int | None = None, path: str | os.PathLike[str] | None = None, *,
        next_phase: str = "data_loading",
    ) -> None:
        """A checkpoint of ``step`` (default: the last optimizer step) was saved, to the directory ``path``
        if given (its size is measured by a worker thread); the loop goes on with ``next_phase``. Its
        duration runs from the mark that opened ``checkpointing`` (see :meth:`checkpointing`)."""
        with self.errors.guard("step"):
            self.child(m.CHECKPOINT_STEP).set(self._step if step is None else step)
        with self.errors.guard("phases"):
            duration = checkpoint_duration(self.phase_timer, time.perf_counter())
            self.mark_phase(next_phase)
            self.child(m.CHECKPOINTS).inc()
            self.child(m.CHECKPOINT_DURATION).set(duration)
            self.child(m.CHECKPOINT_TIME).set(time.time())
            interval = self.checkpoints.ended(time.monotonic())
            if interval is not None:
                self.child(m.CHECKPOINT_INTERVAL).set(interval)
            if path is not None:
                self.checkpoints.measure(
                    os.fspath(path), lambda size: self.child(m.CHECKPOINT_SIZE).set(size),
                    lambda exc: self.errors.record("phases", exc))

    def set_evaluation(
        self, eval_set: Iterable[Any], tokenizer: Any, *, contract: Contract | None = None
    ) -> FixedEvaluator:
        """Attach a fixed eval set (see :mod:`exporter.evaluation`); run it with :meth:`maybe_evaluate`.

        Raises ``ValueError`` for a malformed eval set or a tokenizer without an
        end-of-sequence id: bad input, found before training starts.
        """
        cfg = self.config
        history = None
        if cfg.previews:
            history = cfg.history_dir or os.path.join(self.output_dir, "logs", "preview")
        self.evaluator = FixedEvaluator(
            eval_set, tokenizer, self.eval_export, self.errors,
            budget=cfg.eval_budget, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
            failure_pool=cfg.eval_failure_pool, contract=contract, history_dir=history,
            compress_after_days=cfg.history_compress_days, delete_after_days=cfg.history_delete_days,
        )
        self.errors.touch("eval")
        if history is not None:
            self.errors.touch("previews")
        return self.evaluator

    def maybe_evaluate(self, model: torch.nn.Module, step: int | None = None, *, force: bool = False) -> bool:
        """Run the fixed evaluation on ``model`` when it is due: every ``eval.interval_steps`` steps, or now
        with ``force`` (at a Trainer evaluation); at most once per step. Call it after :meth:`step_end`.

        Holds the training thread for the generation and one teacher-forced
        pass; scoring and the history are written by a worker thread.
        """
        evaluator = self.evaluator
        if evaluator is None or not self.config.evaluation:
            return False
        step = self._step if step is None else step
        if not (force or evaluator.due(step, self.config.eval_interval)):
            return False
        with self.errors.guard("eval"), self.phase("evaluation"):
            return evaluator.run(model, step)
        return False

    def set_drift_reference(self, batches: Iterable[Any]) -> int:
        """Profile these batches (up to ``drift.reference_batches``) as the drift reference instead of the
        first training batches; returns how many were used. Call after :meth:`watch`."""
        if self.drift is None:
            return 0
        with self.errors.guard("drift"):
            return self.drift.set_reference(batches)
        return 0

    # ------------------------------------------------------------- lifecycle

    @property
    def state(self) -> str:
        return self._state

    def _set_state(self, state: str) -> None:
        self._state = state
        for s in m.STATES:
            self.child(m.STATE, s).set(1 if s == state else 0)
        # A scrape after a change of state never gets a render from before it.
        self.exposition.invalidate()

    def end(self, state: str = "completed", linger: bool = True) -> None:
        """Mark the run finished, export what is pending, optionally linger (``web.linger_seconds``, blocking),
        then return while the endpoint serves on in the background until the final state has been scraped
        (``web.final_scrape_timeout_seconds`` at most; see :mod:`exporter.lifecycle`)."""
        if self._ended:
            return
        self._ended = True
        if self.watchdog is not None:
            with self.errors.guard("watchdog"):
                self.watchdog.stop()
        if self.evaluator is not None:
            with self.errors.guard("eval"):
                # The last evaluation's scores and history lines are written before the final values.
                self.evaluator.close()
        with self.errors.guard("phases"):
            self.phase_timer.stop()
            self.checkpoints.join(10.0)  # the last checkpoint's size, for the final values
        with self.errors.guard("step"):
            self.flush()
            self._set_state(state)

            self.unwatch()
        with self.errors.guard("http_server"):
            lifecycle.final_state_set(self)
        if linger and self.config.linger_seconds > 0 and self._httpd is not None:
            log.info("training-exporter: serving final values for %.0f s", self.config.linger_seconds)
            time.sleep(self.config.linger_seconds)
        try:
            lifecycle.close_when_read(self, self.config.final_scrape_timeout_seconds)
        except Exception as exc:
            self.errors.record("http_server", exc)
            self.stop()

    def _install_crash_handlers(self) -> None:
        # A crash must be visible: the state turns to "crashed" before the
        # process exits (and stays scrapeable until it is scraped). So must a
        # scheduler's SIGTERM: state "terminated" (exporter.lifecycle).
        with self.errors.guard("step"):
            lifecycle.handle_sigterm(self)
        if self._atexit_registered:
            return
        self._atexit_registered = True
        ref = weakref.ref(self)

        def at_exit() -> None:
            mon = ref()
            if mon is not None and not mon._ended and mon.state in ("training", "paused", "crashed"):
                mon.end("crashed")

        atexit.register(at_exit)
        prev = sys.excepthook

        def excepthook(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            mon = ref()
            if mon is not None and mon.state in ("training", "paused"):
                with mon.errors.guard("step"):
                    mon.flush()
                    mon._set_state("crashed")
            prev(tp, value, tb)

        sys.excepthook = excepthook

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, tp: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.end("crashed" if tp is not None else "completed")


def _field(output: Any, name: str, index: int) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    value = getattr(output, name, None)
    if value is None and isinstance(output, tuple) and len(output) > index:
        value = output[index]
        # A tuple output only starts with the loss when labels were given.
        if name == "loss" and not (isinstance(value, torch.Tensor) and value.dim() == 0):
            return None
    return value
