"""``training-exporter demo``: a real Trainer run on the embedded synthetic task.

A randomly initialised tiny GPT-2 with a LoRA adapter learns "a+b=c" addition
on the CPU in about a minute, with the exporter serving /metrics and the
Trainer saving checkpoints (which the analytics exporter can watch). Faults can
be injected on purpose to see the alerts fire. A fixed evaluation
(`demo_task.make_eval_set`: 48 held-out sums by carry regime and operand
shape, plus 32 training examples) runs every ``eval.interval_steps`` (250)
steps, so exact match climbs from about 0 to above 0.9 over the default 5000
steps, and its answers go to ``OUTPUT_DIR/logs/preview/``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from exporter.callback import PrometheusCallback
from exporter.demo_task import (
    DIGITS_ONLY,
    ArithmeticDataset,
    CharTokenizer,
    DataCollator,
    FaultInjector,
    build_model,
    make_eval_set,
)
from exporter.demo_task import make_training_args as task_training_args

log = logging.getLogger("training_exporter")

TRAIN_EXAMPLES = 20_000
EVAL_EXAMPLES = 256


def build_trainer(
    callbacks: Sequence[TrainerCallback],
    *,
    output_dir: str,
    max_steps: int,
    save_steps: int = 100,
    faults: Sequence[str] = (),
    seed: int = 0,
    eval_steps: int | None = None,
    model_size: Mapping[str, int] | None = None,
    train_examples: int = TRAIN_EXAMPLES,
    **overrides: Any,
) -> Trainer:
    """The demo's Trainer, also used by the tests and the benchmarks.

    ``model_size`` (``n_layer``, ``n_embd``, ``n_head``) overrides the tiny default model.
    """
    tokenizer = CharTokenizer()
    size = dict(model_size or {})
    model = build_model(tokenizer, seed=seed, n_layer=size.get("n_layer", 2), n_embd=size.get("n_embd", 64),
                        n_head=size.get("n_head", 4))
    injector = FaultInjector(faults)
    # Registered before the exporter's own hook, so the exporter sees the injected loss.
    injector.attach(model)
    extra: dict[str, Any] = {"save_steps": save_steps, "seed": seed, **overrides}
    eval_dataset = None
    if eval_steps:
        extra.update(eval_strategy="steps", eval_steps=eval_steps, per_device_eval_batch_size=64)
        eval_dataset = ArithmeticDataset(EVAL_EXAMPLES, seed=seed + 1, tokenizer=tokenizer)
    args = task_training_args(output_dir, max_steps, **extra)
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
    faults: Sequence[str] = (),
    seed: int = 0,
    eval_steps: int | None = None,
    train_examples: int = TRAIN_EXAMPLES,
    learning_rate: float | None = None,
) -> None:
    extra: dict[str, Any] = {} if learning_rate is None else {"learning_rate": learning_rate}
    trainer = build_trainer(
        [callback],
        output_dir=output_dir,
        max_steps=max_steps,
        save_steps=save_steps,
        faults=faults,
        seed=seed,
        eval_steps=eval_steps or max(max_steps // 5, 1),
        logging_steps=logging_steps,
        train_examples=train_examples,
        **extra,
    )
    if not torch.cuda.is_available():
        # A model this small gains nothing from intra-op threads, and on a busy
        # 2-core machine their spinning made steps up to 40x slower.
        torch.set_num_threads(1)
    monitor = None
    if isinstance(callback, PrometheusCallback):
        callback.set_evaluation(make_eval_set(seed=seed), CharTokenizer(), contract=DIGITS_ONLY)
        # Start serving before the first step so a taken port fails fast.
        callback.setup(trainer.args, trainer.state, trainer.model)
        monitor = callback.monitor
    if monitor is not None:
        monitor.start()
        if monitor.port is not None:
            host = monitor.config.host_port[0]
            shown = "localhost" if host in ("0.0.0.0", "::") else host
            log.info("training-exporter: serving metrics on http://%s:%d/metrics (run_id=%s)",
                     shown, monitor.port, monitor.run_id)
    if faults:
        log.info("training-exporter: injecting %s", ", ".join(faults))
    trainer.train()
