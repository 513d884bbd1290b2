"""Tiny 2-rank DDP run (torchrun, gloo on the CPU) of the plain Trainer or TRL's SFTTrainer, for
tests/test_trainers_ddp.py::

    torchrun --nproc_per_node 2 tests/support/trl_ddp_train.py --trainer sft --port 9945 --output-dir /tmp/run

Every rank trains a tiny Llama on variable-length examples with a PrometheusCallback (ranks="all",
so rank r serves on port + r) followed by a tests/support/trl_support.Recorder. After every optimizer step
the rank writes OUTPUT_DIR/truth-rank<R>.json: per step, the summed NLL and label-token count of
the micro-batches this rank saw, and the training_loss its exporter published for that step. The
linger time keeps each endpoint up after training so the test can scrape the final values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Importable from the source tree without installing the package (this file is ROOT/tests/support/), and
# support.trl_support as the test modules import it: torchrun puts only this file's folder on sys.path.
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from exporter.callback import PrometheusCallback  # noqa: E402
from exporter.config import ExporterConfig  # noqa: E402
from support.trl_support import (  # noqa: E402
    PadCollator,
    Recorder,
    TokenizedList,
    lora_config,
    make_tokenizer,
    sft_config,
    text_dataset,
    tiny_llama,
    training_args,
)


class TruthWriter(TrainerCallback):
    """After the recorder's on_step_end: this rank's steps so far, written atomically as JSON."""

    def __init__(self, recorder: Recorder, path: str, meta: dict[str, Any]) -> None:
        self.recorder = recorder
        self.path = path
        self.meta = meta

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        steps = [
            {
                "step": s.step,
                "nll": [m.nll for m in s.micro],
                "count": [m.count for m in s.micro],
                "num_items_in_batch": [m.num_items_in_batch for m in s.micro],
                "kwargs": sorted({k for m in s.micro for k in m.kwarg_names}),
                "exported_loss": s.exported.get("training_loss"),
            }
            for s in self.recorder.steps
        ]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**self.meta, "steps": steps}, f)
        os.replace(tmp, self.path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=("plain", "sft"), required=True)
    parser.add_argument("--port", type=int, required=True, help="base port; rank r serves on port + LOCAL_RANK")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="per-device train batch size")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--linger", type=float, default=30.0, help="seconds to keep serving after training")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(args.output_dir, exist_ok=True)

    callback = PrometheusCallback(ExporterConfig(
        ranks="all", listen_address=f"127.0.0.1:{args.port}", linger_seconds=args.linger, port_in_use="fail",
        gpu=False, host=False,
    ))  # fmt: skip
    recorder = Recorder(callback, metrics=("training_loss",))
    common = {"ddp_backend": "gloo", "ddp_find_unused_parameters": False,
              "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": args.accumulation}
    tok = make_tokenizer()
    # Same seed on both ranks (DDP broadcasts rank 0's weights anyway); each rank gets its own shard.
    model = tiny_llama(tok)
    if args.trainer == "sft":
        from trl import SFTTrainer

        trainer: Trainer = SFTTrainer(
            model=model, args=sft_config(args.output_dir, args.max_steps, **common), train_dataset=text_dataset(),
            processing_class=tok, peft_config=lora_config(),
        )  # fmt: skip
    else:
        trainer = Trainer(
            model=model, args=training_args(args.output_dir, args.max_steps, **common),
            train_dataset=TokenizedList(tok), data_collator=PadCollator(tok.pad_token_id),
        )  # fmt: skip
    meta = {
        "rank": rank, "world_size": trainer.args.world_size, "trainer": args.trainer,
        "average_tokens_across_devices": trainer.args.average_tokens_across_devices,
    }  # fmt: skip
    writer = TruthWriter(recorder, os.path.join(args.output_dir, f"truth-rank{rank}.json"), meta)
    # Order matters: the exporter's on_step_end, then the recorder reads it, then the writer.
    for cb in (callback, recorder, writer):
        trainer.add_callback(cb)
    trainer.train()

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
