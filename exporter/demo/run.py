"""Building and running the demo's Trainer, alone or inside the local alerting chain.

`build_trainer` is the demo's Trainer (also used by the tests and the
benchmarks); `train_demo` runs it with the exporter serving /metrics. A fixed
evaluation (`exporter.demo.task.make_eval_set`: 48 held-out sums by carry
regime and operand shape, plus 32 training examples) runs every
``eval.interval_steps`` (250) steps, so exact match climbs from about 0 to
above 0.9 over the default 5000 steps, and its answers go to
``OUTPUT_DIR/logs/preview/``. `run_demo` is what ``training-exporter demo``
runs.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from exporter.argtypes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, fail
from exporter.callback import PrometheusCallback
from exporter.config import ExporterConfig
from exporter.core import PortInUseError
from exporter.demo.faults import FaultSpec
from exporter.demo.injector import FaultInjector
from exporter.demo.localstack.chain import LocalAlerting, check_prerequisites
from exporter.demo.localstack.errors import LocalStackError
from exporter.demo.localstack.processes import free_port
from exporter.demo.task import (
    DIGITS_ONLY,
    ArithmeticDataset,
    CharTokenizer,
    DataCollator,
    build_model,
    make_eval_set,
)
from exporter.demo.task import make_training_args as task_training_args

__all__ = ["EVAL_EXAMPLES", "TRAIN_EXAMPLES", "build_trainer", "demo_training_args", "run_demo", "train_demo"]

log = logging.getLogger("training_exporter")

TRAIN_EXAMPLES = 20_000
EVAL_EXAMPLES = 256


def demo_training_args(
    *,
    output_dir: str,
    max_steps: int,
    save_steps: int = 100,
    seed: int = 0,
    eval_steps: int | None = None,
    **overrides: Any,
) -> TrainingArguments:
    """The `TrainingArguments` that :func:`build_trainer` builds from the same keyword arguments."""
    extra: dict[str, Any] = {"save_steps": save_steps, "seed": seed, **overrides}
    if eval_steps:
        extra.update(eval_strategy="steps", eval_steps=eval_steps, per_device_eval_batch_size=64)
    return task_training_args(output_dir, max_steps, **extra)


def build_trainer(
    callbacks: Sequence[TrainerCallback],
    *,
    output_dir: str,
    max_steps: int,
    save_steps: int = 100,
    faults: Sequence[str | FaultSpec] = (),
    seed: int = 0,
    eval_steps: int | None = None,
    model_size: Mapping[str, int] | None = None,
    train_examples: int = TRAIN_EXAMPLES,
    training_args: TrainingArguments | None = None,
    **overrides: Any,
) -> Trainer:
    """The demo's Trainer, also used by the tests and the benchmarks.

    ``model_size`` (``n_layer``, ``n_embd``, ``n_head``) overrides the tiny default model. ``training_args``,
    when given, are :func:`demo_training_args` of the same keyword arguments, built already.
    """
    tokenizer = CharTokenizer()
    size = dict(model_size or {})
    model = build_model(tokenizer, seed=seed, n_layer=size.get("n_layer", 2), n_embd=size.get("n_embd", 64),
                        n_head=size.get("n_head", 4))
    injector = FaultInjector(faults)
    # Registered before the exporter's own hook, so the exporter sees the injected loss.
    injector.attach(model)
    eval_dataset = None
    if eval_steps:
        eval_dataset = ArithmeticDataset(EVAL_EXAMPLES, seed=seed + 1, tokenizer=tokenizer)
    args = training_args or demo_training_args(output_dir=output_dir, max_steps=max_steps, save_steps=save_steps,
                                               seed=seed, eval_steps=eval_steps, **overrides)
    return Trainer(
        model=model,
        args=args,
        train_dataset=ArithmeticDataset(train_examples, seed=seed, tokenizer=tokenizer),
        eval_dataset=eval_dataset,
        data_collator=DataCollator(tokenizer.pad_token_id),
        callbacks=[injector, *callbacks],
    )


def train_demo(
    callback: TrainerCallback,
    *,
    output_dir: str,
    max_steps: int,
    save_steps: int = 500,
    logging_steps: int = 50,
    faults: Sequence[str | FaultSpec] = (),
    seed: int = 0,
    eval_steps: int | None = None,
    train_examples: int = TRAIN_EXAMPLES,
    learning_rate: float | None = None,
    reserved: socket.socket | None = None,
) -> None:
    """Build the demo's Trainer and train it, serving /metrics from before the model is built.

    ``reserved``: a socket holding the listen address since the command line was checked (see
    ``exporter.demo.cli``); closed just before the exporter binds the address for good.

    Raises:
        PortInUseError: the listen address is taken and ``web.port_in_use`` is ``"fail"``; before the model is
            built.
    """
    extra: dict[str, Any] = {} if learning_rate is None else {"learning_rate": learning_rate}
    eval_steps = eval_steps or max(max_steps // 5, 1)
    args = demo_training_args(output_dir=output_dir, max_steps=max_steps, save_steps=save_steps, seed=seed,
                              eval_steps=eval_steps, logging_steps=logging_steps, **extra)
    monitor = None
    if isinstance(callback, PrometheusCallback):
        callback.set_evaluation(make_eval_set(seed=seed), CharTokenizer(), contract=DIGITS_ONLY)
        # Serve before the model and the data are built: a taken port fails fast, and the build is scrapeable.
        callback.setup(args, TrainerState(), None)
        monitor = callback.monitor
    if reserved is not None:
        reserved.close()
    if monitor is not None:
        monitor.start()
        if monitor.port is not None:
            host = monitor.config.host_port[0]
            shown = "localhost" if host in ("0.0.0.0", "::") else host
            log.info("training-exporter: serving metrics on http://%s:%d/metrics (run_id=%s)",
                     shown, monitor.port, monitor.run_id)
    trainer = build_trainer(
        [callback],
        output_dir=output_dir,
        max_steps=max_steps,
        faults=faults,
        seed=seed,
        eval_steps=eval_steps,
        train_examples=train_examples,
        training_args=args,
    )
    if not torch.cuda.is_available():
        # A model this small gains nothing from intra-op threads, and on a busy
        # 2-core machine their spinning made steps up to 40x slower.
        torch.set_num_threads(1)
    if faults:
        log.info("training-exporter: injecting %s", ", ".join(map(str, faults)))
    trainer.train()


def run_demo(config: ExporterConfig, *, local_alerting: bool = False, **training: Any) -> int:
    """Train the demo with the exporter configured by ``config``; the exit code.

    ``training`` are `train_demo`'s keyword arguments. With ``local_alerting``
    the run happens inside the local alerting chain, which is started first and
    stopped after. A taken port, or a missing prerequisite of the chain, ends
    through :func:`exporter.argtypes.fail` before training starts.
    """
    if local_alerting:
        return _run_with_local_alerting(config, training)
    return _serve_and_train(config, training)


def _serve_and_train(config: ExporterConfig, training: Mapping[str, Any]) -> int:
    # On the command line a taken port is bad input: say so before training starts.
    config = config.replace(port_in_use="fail")
    callback = PrometheusCallback(config)
    try:
        train_demo(callback, **training)
    except PortInUseError as exc:
        fail(str(exc).removeprefix("training-exporter: "))
    return EXIT_OK


# --------------------------------------------------------------------------- with the local alerting chain


def _scrape_target(config: ExporterConfig) -> tuple[ExporterConfig, str]:
    """The exporter's address as Prometheus on loopback scrapes it; port 0 is replaced by a free port first."""
    host, port = config.host_port
    if port == 0:
        port = free_port()
        config = config.replace(listen_address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return config, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _say(line: str) -> None:
    """One line on stdout, above the Trainer's progress bar (which is on stderr)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - transformers depends on tqdm
        print(line, flush=True)
        return
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals(handler: Callable[[int, FrameType | None], None] | int) -> Iterator[None]:
    """Install ``handler`` for SIGINT, SIGTERM and SIGHUP for the block (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM and SIGHUP end the demo like Ctrl-C, so that the `finally` stopping the children runs.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_with_local_alerting(config: ExporterConfig, training: Mapping[str, Any]) -> int:
    # What can be checked before anything starts ends as one line with exit code 2.
    try:
        check_prerequisites()
    except LocalStackError as exc:
        fail(f"--local-alerting: {exc}")
    config, target = _scrape_target(config)
    # aiosmtpd warns on every connection that AUTH without TLS is unsafe: intended, loopback only.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS", category=UserWarning)

    workdir = Path(tempfile.mkdtemp(prefix="training-exporter-alerting-"))
    stack = LocalAlerting([target], workdir, on_event=lambda event: _say(event.line()))
    keep_workdir = False
    with _signals(_interrupt):
        try:
            try:
                stack.start()
            except LocalStackError as exc:
                fail(f"--local-alerting: {exc}")
            except (RuntimeError, TimeoutError, OSError) as exc:
                keep_workdir = True
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                sys.stderr.write(f"training-exporter: error: --local-alerting: {first} (logs in {workdir})\n")
                return EXIT_FAILED
            prom, am = stack.prometheus, stack.alertmanager
            _say(f"local alerting: Prometheus {stack.prometheus_url} (pid {prom.pid if prom else '?'}) "
                 f"scraping {target}, Alertmanager {stack.alertmanager_url} (pid {am.pid if am else '?'}); "
                 "notifications to the Slack and email stand-ins are printed here")
            return _serve_and_train(config, training)
        except KeyboardInterrupt:
            _say("local alerting: interrupted")
            return EXIT_INTERRUPTED
        finally:
            # A second Ctrl-C must not leave a child running: stop them all first.
            with _signals(signal.SIG_IGN):
                started = stack.prometheus is not None
                try:
                    stack.stop()
                finally:
                    if started:
                        _say(f"local alerting: {stack.summary()}; prometheus and alertmanager stopped")
                    if not keep_workdir:
                        shutil.rmtree(workdir, ignore_errors=True)
