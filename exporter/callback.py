"""``transformers.TrainerCallback`` adapter over :class:`exporter.core.TrainingMonitor`.

Usage::

    from exporter import PrometheusCallback
    trainer = Trainer(..., callbacks=[PrometheusCallback(listen_address=":9945")])

What it reads, and why from there:
  * the loss of every micro-batch from a forward hook on the model, because
    callback hooks receive no loss and ``logs["loss"]`` hides NaN/Inf under the
    default ``logging_nan_inf_filter=True``;
  * gradients in ``on_pre_optimizer_step`` (after clipping, before the update,
    once per optimizer step), the pre-clip global norm from ``logs["grad_norm"]``;
  * update ratios between ``on_pre_optimizer_step`` and ``on_optimizer_step``.

Multi-process runs (torchrun / accelerate): ``ranks="zero"`` (default) exports
from the world-process-zero only; ``ranks="all"`` exports from every rank on
``port + LOCAL_RANK`` with a ``rank`` label. Gradients are all-reduced before the
optimizer step under DDP, so per-layer gradient and update statistics are
exported by rank 0 only in both modes.

Fixed evaluation: ``PrometheusCallback(eval_set=[...], tokenizer=tok)`` (the
tokenizer defaults to the Trainer's ``processing_class``) generates answers
for the eval set every ``eval.interval_steps`` steps and at each Trainer
evaluation, on the world-process-zero only; see :mod:`exporter.evaluation`.
It is skipped under FSDP and DeepSpeed, where a forward pass on one rank
alone would wait forever for the others' shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from exporter.config import ConfigError, ExporterConfig, derive_run_id, resolve_settings
from exporter.core import PortInUseError, TrainingMonitor
from exporter.evaluation import Contract, EvalExample, load_eval_set
from exporter.files import dir_problem
from exporter.phases import mark_batches

log = logging.getLogger("training_exporter")


def _after_log(control: TrainerControl) -> str:
    """The step phase after a step's logging: the evaluation or save the Trainer runs next, else the data."""
    return "evaluation" if control.should_evaluate else "checkpointing" if control.should_save else "data_loading"



class PrometheusCallback(TrainerCallback):
    """Publishes a Trainer run on a Prometheus /metrics endpoint.

    Settings come as on the command line, highest first: keyword arguments
    (``PrometheusCallback(listen_address=":9945", ema_alpha=0.05)``), the
    ``TRAINING_EXPORTER_*`` environment variables, the YAML file named by
    ``TRAINING_EXPORTER_CONFIG_FILE``, the defaults. A whole
    :class:`ExporterConfig` is taken as explicit: it is used as it is (keyword
    arguments still override its fields) and neither the environment nor the
    file is read, so nothing overrides what the caller built. Everything is
    validated here, before training starts.

    Args:
        config: every setting at once; when given, the environment and the
            config file are not read.
        eval_set: the fixed evaluation set: :class:`~exporter.evaluation.EvalExample`
            objects or mappings with its fields (``prompt`` and ``golden``
            required; ``example_id``, ``regime``, ``source``, ``domain``,
            ``pattern``, ``dataset_id``), checked by
            :func:`~exporter.evaluation.load_eval_set`. Its answers are generated
            every ``eval.interval_steps`` steps and at each Trainer evaluation
            (docs/metrics.md, "Fixed evaluation and dataset drift").
        tokenizer: encodes the eval prompts and decodes the answers; defaults
            to the Trainer's ``processing_class``. Any object with
            ``encode(text)``, ``decode(ids)`` and ``eos_token_id`` will do.
        eval_contract: checks of an answer's form, ``answer -> {check: passed}``
            (e.g. :func:`~exporter.evaluation.regex_contract`), for every example
            that has no contract of its own.
        drift_reference: batches of the reference data (mappings with
            ``input_ids`` and optionally ``attention_mask`` / ``position_ids``)
            that the dataset drift of the training batches is measured
            against; without it the first ``drift.reference_batches`` training
            batches are the reference.
        **settings: any :class:`ExporterConfig` field by name (``listen_address``,
            ``run_id``, ``ranks``, ``ema_alpha``...).

    Raises:
        ConfigError: an unknown setting, or a bad value from any source; every
            bad one is listed in the one error. A ``history.dir`` that is a file, or
            has one in its path, is one too.
        ValueError: a malformed ``eval_set`` (every problem named in one error).
        PortInUseError: at ``on_train_begin``, when the listen address is taken
            and ``web.port_in_use`` is ``"fail"`` (the default, ``"continue"``,
            logs one line, counts the error and trains on without serving).

    Example::

        from transformers import Trainer
        from exporter import PrometheusCallback

        callback = PrometheusCallback(
            listen_address=":9945",
            run_id="sft-qwen-0.5b",
            eval_set=[{"example_id": "q1", "prompt": "2+2=", "golden": "4"}],
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.train()
    """

    def __init__(
        self,
        config: ExporterConfig | None = None,
        *,
        eval_set: Iterable[EvalExample | Mapping[str, Any]] | None = None,
        tokenizer: Any = None,
        eval_contract: Contract | None = None,
        drift_reference: Iterable[Any] | None = None,
        **settings: Any,
    ) -> None:
        self.config = config.replace(**settings) if config is not None else resolve_settings(settings)
        # A history.dir that a file is in the way of would fail only at the first evaluation: say so now.
        # (The default, under the Trainer's output dir, is only known when training begins.)
        if self.config.previews and self.config.history_dir:
            if problem := dir_problem(self.config.history_dir):
                raise ConfigError([f"history.dir: {problem}"])
        self.monitor: TrainingMonitor | None = None
        self._active = True
        self._eval_set: list[EvalExample] | None = None
        self._tokenizer = tokenizer
        self._eval_contract = eval_contract
        self._drift_reference = drift_reference
        if eval_set is not None:
            self.set_evaluation(eval_set, tokenizer, contract=eval_contract)

    def set_evaluation(
        self,
        eval_set: Iterable[EvalExample | Mapping[str, Any]],
        tokenizer: Any = None,
        *,
        contract: Contract | None = None,
    ) -> None:
        """Give the fixed eval set (before training starts); raises ValueError for a malformed one."""
        self._eval_set = load_eval_set(eval_set)
        self._tokenizer = tokenizer if tokenizer is not None else self._tokenizer
        self._eval_contract = contract if contract is not None else self._eval_contract

    # Every hook is guarded: the training loop never sees an exception from here.
    def _guard(self, what: str, call: Callable[[TrainingMonitor], object]) -> None:
        """Run ``call(monitor)`` if this process exports; count and log any failure under ``what``."""
        mon = self.monitor
        if mon is None or not self._active:
            return
        try:
            call(mon)
        except PortInUseError:
            raise
        except Exception as exc:
            mon.errors.record(what, exc)

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any = None) -> None:
        """Create the monitor once (lazy and idempotent, like the transformers integrations)."""
        if self.monitor is not None:
            return
        if self.config.ranks == "zero" and not state.is_world_process_zero:
            self._active = False
            return
        run_id = self.config.run_id or derive_run_id(args.output_dir)
        self.monitor = TrainingMonitor(
            self.config,
            run_id=run_id,
            output_dir=args.output_dir,
            rank=args.process_index,
            local_rank=max(args.local_process_index, 0),
        )
        self.monitor.export_layers = state.is_world_process_zero
        # The Trainer's own pre-clip norm arrives with the logs.
        self.monitor.compute_global_grad_norm = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        self.setup(args, state, model)
        mon = self.monitor
        if mon is None or not self._active:
            return
        self._guard("http_server", lambda m: m.start())
        # With average_tokens_across_devices the model divides by every rank's token count.
        mon.items_are_local = not (args.average_tokens_across_devices and args.world_size > 1)
        # The autocast dtype the matmuls run in under the Trainer's mixed precision (the peak FLOP/s's key).
        mon.autocast_dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else None
        if model is not None:
            self._guard("hook", lambda m: m.describe_model(model))
            self._guard("hook", lambda m: m.watch(model))
            if (reference := self._drift_reference) is not None:
                self._guard("drift", lambda m: m.set_drift_reference(reference))
        if (eval_set := self._eval_set) is not None and state.is_world_process_zero and mon.evaluator is None:
            if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
                log.warning("training-exporter: fixed evaluation skipped: not supported under FSDP / DeepSpeed")
            else:
                tokenizer = self._tokenizer if self._tokenizer is not None else kw.get("processing_class")
                self._guard("eval", lambda m: m.set_evaluation(eval_set, tokenizer, contract=self._eval_contract))
        if (loader := kw.get("train_dataloader")) is not None and mon.config.phases:
            # Fetching a batch is data loading; the cross-rank gather that follows it is not (exporter/phases.py).
            self._guard("phases", lambda m: mark_batches(loader, m.mark_phase))
        # fp16: accelerate's optimizer holds the GradScaler (None on the CPU and under bf16 / fp32).
        if (scaler := getattr(kw.get("optimizer"), "scaler", None)) is not None:
            self._guard("amp", lambda m: m.watch_scaler(scaler))
        self._guard("step", lambda m: m.begin(state.max_steps, state.global_step))
        if args.eval_on_start:
            self._guard("phases", lambda m: m.mark_phase("evaluation"))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._guard("step", lambda m: m.step_begin())

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kw: Any
    ) -> None:
        self._guard("gradients", lambda m: m.before_optimizer_step(optimizer))

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._guard("update_ratio", lambda m: m.after_optimizer_step())

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # The next micro-batch's preparation, up to its forward (all were fetched before on_step_begin).
        self._guard("phases", lambda m: m.mark_phase("other"))


    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        # DefaultFlowCallback ran first: control says whether the Trainer logs, evaluates or saves next.
        phase = "other" if control.should_log else _after_log(control)
        self._guard("step", lambda m: m.step_end(state.global_step, state.epoch, next_phase=phase))
        if model is not None:
            self._guard("eval", lambda m: m.maybe_evaluate(model, state.global_step))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        if logs and isinstance(grad_norm := logs.get("grad_norm"), (int, float)):
            self._guard("step", lambda m: m.observe_grad_norm(grad_norm))
        mon = self.monitor
        if mon is not None and mon.phase_timer.current == "other":
            # The step's logging is done (its loss gather and .item()); an evaluation's log changes nothing.
            self._guard("phases", lambda m: m.mark_phase(_after_log(control)))
        self._guard("flush", lambda m: m.flush())

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        model: Any = None,
        **kw: Any,
    ) -> None:
        if metrics:
            self._guard("evaluation", lambda m: m.observe_evaluation(metrics, state.global_step))
        if model is not None:
            self._guard("eval", lambda m: m.maybe_evaluate(model, state.global_step, force=True))
        # The save that follows the evaluation, if any (the handler cleared should_evaluate).
        self._guard("phases", lambda m: m.mark_phase("checkpointing" if control.should_save else "data_loading"))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # An epoch-strategy log, evaluation or save follows (DefaultFlowCallback's on_epoch_end ran first).
        if control.should_log or control.should_evaluate or control.should_save:
            phase = "other" if control.should_log else _after_log(control)
            self._guard("phases", lambda m: m.mark_phase(phase))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        path = os.path.join(args.output_dir or ".", f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

        self._guard("step", lambda m: m.observe_checkpoint(state.global_step, path))


    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._guard("step", lambda m: m.end("completed"))

