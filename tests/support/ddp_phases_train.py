"""Two-rank DDP run for tests/test_stragglers.py: one rank's data loader is slowed.

Run under ``torchrun --nproc_per_node 2`` on the CPU (gloo)::

    torchrun --nproc_per_node 2 tests/support/ddp_phases_train.py --port 9945 --slow-rank 1 --sleep 0.15 \
        --output-dir /tmp/ddp-phases

Every rank trains a tiny Llama with the plain Trainer and a :class:`PrometheusCallback` with ``ranks="all"``
(rank r serves on port + r); the collator of ``--slow-rank`` sleeps ``--sleep`` seconds per batch. After
training each rank writes its final exposition to ``metrics-rank<r>.prom`` in the output dir, and the
number of training batches its collator made to ``batches-rank<r>.txt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

# Importable from the source tree without installing the package (this file is ROOT/tests/support/).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from transformers import Trainer  # noqa: E402

from exporter.callback import PrometheusCallback  # noqa: E402
from exporter.config import ExporterConfig  # noqa: E402
from support.trl_support import PadCollator, TokenizedList, make_tokenizer, tiny_llama, training_args  # noqa: E402


class SleepyCollator(PadCollator):
    def __init__(self, pad_id: int, sleep: float) -> None:
        super().__init__(pad_id)
        self.sleep = sleep
        self.calls = 0

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        self.calls += 1
        time.sleep(self.sleep)
        return super().__call__(examples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="base port; rank r serves on port + LOCAL_RANK")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--slow-rank", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.15)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))

    config = ExporterConfig(listen_address=f"127.0.0.1:{args.port}", run_id="ddp-phases", ranks="all",
                            gpu=False, host=False, port_in_use="fail", final_scrape_timeout_seconds=0.0)
    callback = PrometheusCallback(config)
    tok = make_tokenizer()
    collator = SleepyCollator(tok.pad_token_id, args.sleep if rank == args.slow_rank else 0.0)
    extra: dict[str, Any] = {"ddp_backend": "gloo", "ddp_find_unused_parameters": False}
    trainer = Trainer(
        model=tiny_llama(tok), args=training_args(args.output_dir, args.max_steps, **extra),
        train_dataset=TokenizedList(tok), data_collator=collator, callbacks=[callback],
    )
    trainer.train()
    assert callback.monitor is not None
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"metrics-rank{rank}.prom"), "wb") as f:
        f.write(generate_latest(callback.monitor.registry))
    with open(os.path.join(args.output_dir, f"batches-rank{rank}.txt"), "w") as f:
        f.write(str(collator.calls))

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
