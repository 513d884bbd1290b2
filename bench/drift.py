"""Checkpoint analytics on a 0.6B model: streamed analysis vs loading both models whole.

Builds a random-weight base model and a perturbed ``checkpoint-1000`` with the
shapes of Qwen3-0.6B (28 layers, hidden 1024, intermediate 3072, 16 heads, 8
KV heads, head_dim 128, vocabulary 151936, tied embeddings; 596M parameters)
in bf16, both written with ``save_pretrained``, then times in fresh
subprocesses, so that their peaks do not mix:

  streamed  analytics_jobs.analysis.analyse: tensors streamed a row block at a
            time from the safetensors files, float32 accumulation, per-layer
            drift and stability figures;
  naive     both models loaded with AutoModelForCausalLM.from_pretrained(
            dtype=torch.bfloat16), then a loop over named_parameters computing
            the same figures (torch.norm of the float32 difference, |w| max,
            non-zero |w| min) the way a first script would.

Printed: wall time of each (from the first byte read to the last figure,
imports excluded), GB/s of weights read, peak RSS (the child's VmHWM,
imports included) and the ratios: speed-up and peak RSS / size of one bf16
model copy. The two results are compared layer by layer.

Usage (full size: ~2.4 GB of files in a temporary folder, a minute or two on
a 2-core CPU)::

    .venv/bin/python bench/drift.py
    .venv/bin/python bench/drift.py --layers 4        # quick try

With ``--adapter``, also a LoRA adapter of that model (rank 16 on every
linear layer, random A and B) is analysed twice in fresh subprocesses, for
the max / min |w| of ``W0 + scale * B @ A``: merged in float64 as the
analysis does (``analytics_jobs.maths.LowRank.merged_extremes``) and in
float32; it prints what the float64 extremes cost and how far float32 puts
the smallest |w|.

Timings on a shared machine are noisy; ``--repeat N`` runs both N times,
alternating the order, and reports the median. Both read files that were just
written, so from the page cache (no cold-disk I/O for either).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEP = 1000


def _rss_bytes() -> int:
    """Peak resident set of this process: VmHWM, which starts afresh at exec (ru_maxrss would carry the
    parent's peak over fork + exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


# --------------------------------------------------------------------------- building the pair


def build(workdir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=opts.vocab, hidden_size=opts.hidden, intermediate_size=opts.intermediate,
        num_hidden_layers=opts.layers, num_attention_heads=opts.heads, num_key_value_heads=opts.kv_heads,
        head_dim=opts.head_dim, tie_word_embeddings=True, max_position_embeddings=4096,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage; tie the head back
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)

    def fill(flat: torch.Tensor, scale: float, add: bool) -> None:
        # Random weights cheaply: slices of one random pool at random offsets.
        step = pool.numel() // 2
        for start in range(0, flat.numel(), step):
            n = min(step, flat.numel() - start)
            off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
            piece = pool[off:off + n]
            if add:
                flat[start:start + n].add_(piece, alpha=scale)
            else:
                flat[start:start + n].copy_(piece)

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights start at 1
            else:
                fill(p.view(-1), 1.0, add=False)
    base, ckpt = workdir / "Qwen3-0.6B-shapes", workdir / "run" / f"checkpoint-{STEP}"
    model.save_pretrained(base)
    # Training-like drift: more in the upper blocks, a little in the embeddings and norms.
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = re.search(r"\.layers\.(\d+)\.", name)
            scale = 0.05 * (1 + 2 * int(m.group(1)) / max(opts.layers - 1, 1)) if m else 0.02
            fill(p.view(-1), scale, add=True)
    model.save_pretrained(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": STEP}))
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    out = {"base": str(base), "checkpoint": str(ckpt), "params": params, "model_bytes": size}
    if opts.adapter:
        from peft import LoraConfig, get_peft_model

        adapter = workdir / "adapter-run" / f"checkpoint-{STEP}"
        lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        get_peft_model(model, lora).save_pretrained(adapter)
        (adapter / "trainer_state.json").write_text(json.dumps({"global_step": STEP}))
        out["adapter"] = str(adapter)
    return out


# --------------------------------------------------------------------------- the two sides (child processes)


def child_streamed(base: str, checkpoint: str) -> dict[str, Any]:
    from analytics_jobs import maths
    from analytics_jobs.analysis import BaseModel, analyse

    # The LoRA extremes from a float32 merge instead of the float64 one, for the comparison.
    if os.environ.get("DRIFT_BENCH_MERGE") == "float32":
        maths.LowRank.merged_extremes = (  # type: ignore[method-assign]
            lambda self, start, block: maths.extremes(self.merged32(start, block)))

    rss_import = _rss_bytes()
    started = time.perf_counter()
    result = analyse(BaseModel(base), checkpoint)
    seconds = time.perf_counter() - started
    layers = {row.layer: [row.relative_change, row.delta_norm, row.reference_norm, row.current_norm,
                          row.max_abs_weight, row.min_abs_weight] for row in result.layers}
    return {"seconds": seconds, "bytes": result.bytes_read, "maxrss": _rss_bytes(), "rss_import": rss_import,
            "layers": layers, "total": result.total_relative_change}


def child_naive(base: str, checkpoint: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from exporter.layers import layer_and_module

    hf_logging.disable_progress_bar()
    rss_import = _rss_bytes()
    started = time.perf_counter()
    ref_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    cur_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    ref = dict(ref_model.named_parameters())
    acc: dict[str, list[float]] = {}
    nbytes = 0
    with torch.no_grad():
        for name, p in cur_model.named_parameters():
            p0 = ref[name]
            nbytes += 2 * p.numel() * p.element_size()
            c, r = p.float(), p0.float()
            a = acc.setdefault(layer_and_module(name)[0], [0.0, 0.0, 0.0, 0.0, math.inf])
            a[0] += float(torch.norm(c - r)) ** 2
            a[1] += float(torch.norm(r)) ** 2
            a[2] += float(torch.norm(c)) ** 2
            absolute = c.abs()
            a[3] = max(a[3], float(absolute.max()))
            nonzero = absolute[absolute > 0]
            if nonzero.numel():
                a[4] = min(a[4], float(nonzero.min()))
    layers = {k: [math.sqrt(v[0] / v[1]), math.sqrt(v[0]), math.sqrt(v[1]), math.sqrt(v[2]), v[3],
                  0.0 if math.isinf(v[4]) else v[4]] for k, v in acc.items()}
    total = math.sqrt(sum(v[0] for v in acc.values()) / sum(v[1] for v in acc.values()))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": nbytes, "maxrss": _rss_bytes(), "rss_import": rss_import,
            "layers": layers, "total": total}


def run_child(kind: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args],
        capture_output=True, text=True, check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- report


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(pair: dict[str, Any], runs: dict[str, list[dict[str, Any]]], opts: argparse.Namespace) -> str:
    size = pair["model_bytes"]
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "bytes", "maxrss", "rss_import")}
           for k, v in runs.items()}
    lines = [
        f"model: Qwen3-0.6B shapes ({opts.layers} layers, hidden {opts.hidden}, intermediate {opts.intermediate}, "
        f"vocab {opts.vocab}), {pair['params']:,} parameters, bf16; one model copy = {_gb(size)}",
        f"runs: {opts.repeat} of each (median shown), torch threads {opts.threads or 'default'}; "
        "files in the page cache for both",
        "",
        f"{'':10} {'time':>9} {'read':>10} {'GB/s':>7} {'peak RSS':>10} {'RSS/copy':>9} {'(imports)':>10}",
    ]
    for kind in ("streamed", "naive"):
        m = med[kind]
        lines.append(f"{kind:10} {m['seconds']:8.2f}s {_gb(m['bytes']):>10} {m['bytes'] / m['seconds'] / 1e9:7.2f} "
                     f"{_gb(m['maxrss']):>10} {m['maxrss'] / size:8.2f}x {_gb(m['rss_import']):>10}")
    speedup = med["naive"]["seconds"] / med["streamed"]["seconds"]
    lines += [
        "",
        f"speed-up (naive time / streamed time): {speedup:.1f}x (target >= 3x)",
        f"streamed peak RSS / one model copy: {med['streamed']['maxrss'] / size:.2f} (target < 1); "
        f"naive: {med['naive']['maxrss'] / size:.2f}",
    ]
    if runs.get("adapter-float64"):
        t64 = statistics.median(r["seconds"] for r in runs["adapter-float64"])
        t32 = statistics.median(r["seconds"] for r in runs["adapter-float32"])
        exact, rounded = runs["adapter-float64"][0]["layers"], runs["adapter-float32"][0]["layers"]
        # Figures 4 and 5 of each layer: max and min |w|.
        worst_min = max(abs(exact[k][5] - rounded[k][5]) / max(abs(exact[k][5]), 1e-300) for k in exact)
        worst_max = max(abs(exact[k][4] - rounded[k][4]) / max(abs(exact[k][4]), 1e-300) for k in exact)
        lines += [
            "",
            "adapter (rank 16 on every linear layer), max / min |w| of W0 + scale * B @ A:",
            f"  float64 merge (the analysis) {t64:.2f} s, float32 merge {t32:.2f} s: cost {t64 / t32:.3f}x",
            f"  float32 vs float64, largest relative difference: min |w| {worst_min:.1e}, max |w| {worst_max:.1e}",
        ]
    a, b = runs["streamed"][0], runs["naive"][0]
    worst = 0.0
    for layer, values in a["layers"].items():
        for x, y in zip(values, b["layers"][layer], strict=True):
            if x != y:
                worst = max(worst, abs(x - y) / max(abs(y), 1e-30))
    lines.append(f"agreement: {len(a['layers'])} layers, largest relative difference of any figure {worst:.1e}; "
                 f"total relative change {a['total']:.6f} (streamed) vs {b['total']:.6f} (naive)")
    lines.append("  (differences come from the naive side: torch.norm of a flat float32 tensor of 100M+ elements "
                 "is off by ~1e-2 relative; the streamed sums are float64 across 4096-element float32 pieces)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=28, help="Transformer blocks.")
    p.add_argument("--hidden", type=int, default=1024, help="Hidden size.")
    p.add_argument("--intermediate", type=int, default=3072, help="MLP intermediate size.")
    p.add_argument("--heads", type=int, default=16, help="Attention heads.")
    p.add_argument("--kv-heads", type=int, default=8, help="Key/value heads.")
    p.add_argument("--head-dim", type=int, default=128, help="Head dimension.")
    p.add_argument("--vocab", type=int, default=151936, help="Vocabulary size.")
    p.add_argument("--repeat", type=int, default=1, help="Runs of each side (median reported).")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in both children (0: torch's default). 1 by default, as the analytics "
                        "daemon runs: on a shared 2-core box two OpenMP threads made either side 10x slower.")
    p.add_argument("--adapter", action="store_true",
                   help="Also time a LoRA adapter's analysis with float64 and float32 merged extremes.")
    p.add_argument("--workdir", default=None, help="Build the pair here and keep it (default: a temporary dir).")
    p.add_argument("--json", default=None, help="Also write the raw figures to this file.")
    opts = p.parse_args(argv)
    if min(opts.layers, opts.hidden, opts.intermediate, opts.heads, opts.kv_heads, opts.head_dim, opts.vocab,
           opts.repeat) < 1 or opts.threads < 0:
        p.error("sizes and --repeat must be >= 1, --threads >= 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind = sys.argv[2]
        if kind == "build":
            print(json.dumps(build(Path(sys.argv[3]), parse_args(sys.argv[4:]))))
            return 0
        threads = int(os.environ.get("DRIFT_BENCH_THREADS", "0"))
        if threads:
            import torch

            torch.set_num_threads(threads)
        base, checkpoint = sys.argv[3:5]
        result = child_naive(base, checkpoint) if kind == "naive" else child_streamed(base, checkpoint)
        print(json.dumps(result))
        return 0
    opts = parse_args(argv)
    if opts.threads:
        os.environ["DRIFT_BENCH_THREADS"] = str(opts.threads)
    workdir = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="drift-bench-"))
    try:
        started = time.perf_counter()
        # Built in a child too: this process stays small, so nothing of the build lingers in the measurements.
        pair = run_child("build", str(workdir), *(argv if argv is not None else sys.argv[1:]))
        print(f"built the pair in {time.perf_counter() - started:.1f} s under {workdir}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"streamed": [], "naive": []}
        for i in range(opts.repeat):
            for kind in (("streamed", "naive") if i % 2 == 0 else ("naive", "streamed")):
                runs[kind].append(run_child(kind, pair["base"], pair["checkpoint"]))
            if "adapter" in pair:
                modes = ("float64", "float32")
                for mode in (modes if i % 2 == 0 else modes[::-1]):
                    os.environ["DRIFT_BENCH_MERGE"] = mode
                    runs.setdefault(f"adapter-{mode}", []).append(run_child("streamed", pair["base"], pair["adapter"]))
                os.environ.pop("DRIFT_BENCH_MERGE", None)
        print(report(pair, runs, opts))
        if opts.json:
            Path(opts.json).write_text(json.dumps({"pair": pair, "runs": runs}, indent=2))
    finally:
        if not opts.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
