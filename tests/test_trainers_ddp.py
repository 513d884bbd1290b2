"""Per-rank loss under DDP: two gloo ranks on the CPU (torchrun), plain Trainer and TRL's SFTTrainer.

``tests/support/trl_ddp_train.py`` trains a tiny Llama on variable-length examples with ``ranks="all"`` and
gradient accumulation 2, and writes, per rank and step, the summed NLL and label-token count of the
micro-batches that rank saw plus the training_loss its exporter published (read in-process right
after the step). ``average_tokens_across_devices`` keeps its default (True): the Trainer then
normalises each rank's loss by the token count of *all* ranks and multiplies it by the world size,
so the loss the model returns is not the rank's own mean.

Each rank's exported training_loss must be that rank's own token-mean loss: its summed NLL over its
own label tokens. Tolerance 1e-3 relative: both sides add the same float32 per-token terms (the
truth in float64), within ~2e-5 (see tests/test_trainers.py); normalising by the global count
instead of the local one moves the value by several percent on this data, which the test checks.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.e2e import free_port_pair, kill_group, torchrun
from support.runif import run_if
from support.scrape import Samples, scrape

pytestmark = run_if(gloo=True)
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "support" / "trl_ddp_train.py"
MAX_STEPS = 4
ACCUMULATION = 2
LINGER_S = 60.0  # the test ends the run as soon as both ranks were read
TIMEOUT_S = 120.0
REL = 1e-3


def _scrape(port: int) -> Samples | None:
    try:
        return scrape(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except requests.ConnectionError:
        return None


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= lab]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


class Run:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, port: int, output_dir: Path) -> None:
        self.proc, self.log_path, self.port, self.output_dir = proc, log_path, port, output_dir

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_completed(self) -> dict[int, dict[Any, float]]:
        """Each rank's last scrape once it reports training_state{state="completed"} 1 (bounded wait)."""
        ports = {0: self.port, 1: self.port + 1}
        done: dict[int, dict[Any, float]] = {}
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            for rank, port in ports.items():
                if rank not in done:
                    samples = _scrape(port)
                    if samples is not None and _get(samples, "training_state", state="completed") == 1.0:
                        done[rank] = samples
            if len(done) == len(ports):
                return done
            if self.proc.poll() is not None:
                pytest.fail(f"torchrun exited with {self.proc.returncode} before ranks "
                            f"{sorted(set(ports) - set(done))} completed:\n{self.log_tail()}")
            time.sleep(0.25)
        missing = sorted(set(ports) - set(done))
        pytest.fail(f"ranks {missing} not completed within {TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def truth(self, rank: int) -> dict[str, Any]:
        return json.loads((self.output_dir / f"truth-rank{rank}.json").read_text())


@pytest.fixture(params=["plain", "sft"])
def ddp_run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Run]:
    trainer = request.param
    port = free_port_pair()
    output_dir = tmp_path / f"ddp-{trainer}"
    log_path = tmp_path / f"torchrun-{trainer}.log"
    proc = torchrun(SCRIPT, [
        "--trainer", trainer, "--port", str(port),
        "--max-steps", str(MAX_STEPS), "--accumulation", str(ACCUMULATION),
        "--linger", str(LINGER_S), "--output-dir", str(output_dir),
    ], log_path)  # fmt: skip
    try:
        yield Run(proc, log_path, port, output_dir)
    finally:
        kill_group(proc)


def test_each_rank_exports_its_own_token_mean_loss(ddp_run: Run) -> None:
    scrapes = ddp_run.wait_completed()
    truths = {rank: ddp_run.truth(rank) for rank in (0, 1)}
    for t in truths.values():
        assert t["world_size"] == 2 and t["average_tokens_across_devices"] is True
        assert [s["step"] for s in t["steps"]] == list(range(1, MAX_STEPS + 1))
        assert all(len(s["count"]) == ACCUMULATION for s in t["steps"])

    def local(step: dict[str, Any]) -> float:
        return sum(step["nll"]) / sum(step["count"])

    # Harness check: the ranks' token counts differ, so the global normalisation (local NLL * world size /
    # all ranks' tokens) is visibly not the local mean on some step.
    gaps = []
    for i in range(MAX_STEPS):
        steps = [truths[r]["steps"][i] for r in (0, 1)]
        total = sum(sum(s["count"]) for s in steps)
        gaps += [abs(sum(s["nll"]) * 2 / total - local(s)) / local(s) for s in steps]
    assert max(gaps) > 10 * REL, gaps

    bad = []
    for rank in (0, 1):
        for s in truths[rank]["steps"]:
            got, want = s["exported_loss"], local(s)
            if got is None or abs(got - want) > REL * abs(want):
                bad.append((rank, s["step"], got, want))
        # The endpoint serves the last step's value, with this rank's label.
        final = _get(scrapes[rank], "training_loss", rank=str(rank))
        want = local(truths[rank]["steps"][-1])
        if final is None or abs(final - want) > REL * abs(want):
            bad.append((rank, "scraped", final, want))
    assert not bad, f"(rank, step, exported training_loss, local token-mean truth): {bad}"
    for rank in (0, 1):
        errors = {dict(lab)["collector"]: v for (n, lab), v in scrapes[rank].items()
                  if n == "training_exporter_collector_errors_total" and v}
        assert errors == {}, (rank, errors)
