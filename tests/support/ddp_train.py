"""Tiny DDP run of the demo task for tests/test_multiprocess.py.

Run under ``torchrun --nproc_per_node 2`` on the CPU (gloo)::

    torchrun --nproc_per_node 2 tests/support/ddp_train.py --ranks all --port 9945 --output-dir /tmp/ddp-run

Every rank builds the demo Trainer with a :class:`PrometheusCallback`; the
linger time keeps each endpoint up after training so the final values can be
scraped.
"""

from __future__ import annotations

import argparse
import os
import sys

# Importable from the source tree without installing the package (this file is ROOT/tests/support/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from exporter.callback import PrometheusCallback
from exporter.demo.run import build_trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", choices=("zero", "all"), default="zero")
    parser.add_argument("--port", type=int, required=True, help="base port; rank r serves on port + LOCAL_RANK")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="per-device train batch size")
    parser.add_argument("--linger", type=float, default=30.0, help="seconds to keep serving after training")
    parser.add_argument("--layers-interval", type=int, default=2)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)

    callback = PrometheusCallback(
        ranks=args.ranks,
        listen_address=f"127.0.0.1:{args.port}",
        linger_seconds=args.linger,
        layers_interval=args.layers_interval,
        min_sample_period_seconds=0,
        port_in_use="fail",
        gpu=False,
        host=False,
    )
    trainer = build_trainer(
        [callback],
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        save_steps=10**6,
        save_strategy="no",
        logging_steps=2,
        per_device_train_batch_size=args.batch_size,
        disable_tqdm=True,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    trainer.train()

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
