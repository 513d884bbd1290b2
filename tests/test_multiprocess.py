"""A real 2-process DDP run (torchrun, gloo on the CPU) scraped over HTTP.

``tests/support/ddp_train.py`` trains the demo task for a few steps on two ranks with a
:class:`PrometheusCallback`; its linger time keeps the endpoints up after
training, and these tests read the final values from them.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from support.e2e import free_port_pair, kill_group, torchrun
from support.runif import run_if
from support.scrape import scrape

pytestmark = run_if(gloo=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "support" / "ddp_train.py"
MAX_STEPS = 6
BATCH = 4
LINGER_S = 40.0
TIMEOUT_S = 120.0

Sample = tuple[str, dict[str, str], float]


def _scrape(port: int) -> list[Sample] | None:
    """Samples of http://127.0.0.1:PORT/metrics, or None while nothing answers."""
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except requests.ConnectionError:
        return None
    return [(name, dict(labels), value) for (name, labels), value in samples.items()]


def _values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    return [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    found = _values(samples, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, got {found}"
    return found[0]


def _completed(samples: list[Sample] | None) -> bool:
    return samples is not None and _values(samples, "training_state", state="completed") == [1.0]


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


class DdpRun:
    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, port: int, output_dir: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.port = port
        self.output_dir = output_dir

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def wait_completed(self, ports: list[int]) -> dict[int, list[Sample]]:
        """Poll every port until it reports training_state{state="completed"} 1; return the last scrapes."""
        deadline = time.monotonic() + TIMEOUT_S
        done: dict[int, list[Sample]] = {}
        while time.monotonic() < deadline:
            for port in ports:
                if port not in done:
                    samples = _scrape(port)
                    if samples is not None and _completed(samples):
                        done[port] = samples
            if len(done) == len(ports):
                return done
            if self.proc.poll() is not None:
                pytest.fail(
                    f"torchrun exited with {self.proc.returncode} before ports {sorted(set(ports) - set(done))} "
                    f"reported completion:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        pytest.fail(
            f"no completed state on ports {sorted(set(ports) - set(done))} within {TIMEOUT_S:.0f} s:\n{self.log_tail()}"
        )


def _launch(tmp_path: Path, ranks: str) -> Iterator[DdpRun]:
    port = free_port_pair()
    output_dir = tmp_path / f"ddp-{ranks}"
    log_path = tmp_path / f"torchrun-{ranks}.log"
    proc = torchrun(SCRIPT, [
        "--ranks", ranks, "--port", str(port),
        "--max-steps", str(MAX_STEPS), "--batch-size", str(BATCH),
        "--linger", str(LINGER_S), "--output-dir", str(output_dir),
    ], log_path)  # fmt: skip
    try:
        yield DdpRun(proc, log_path, port, output_dir)
    finally:
        kill_group(proc)


@pytest.fixture
def ddp_all(tmp_path: Path) -> Iterator[DdpRun]:
    yield from _launch(tmp_path, "all")


@pytest.fixture
def ddp_zero(tmp_path: Path) -> Iterator[DdpRun]:
    yield from _launch(tmp_path, "zero")


def test_ranks_all_every_rank_serves_its_own_values(ddp_all: DdpRun) -> None:
    base = ddp_all.port
    scrapes = ddp_all.wait_completed([base, base + 1])
    run_id = ddp_all.output_dir.name

    for rank, port in ((0, base), (1, base + 1)):
        samples = scrapes[port]
        # Every series carries this rank's label and the run id.
        assert samples
        for name, labels, _ in samples:
            assert labels.get("rank") == str(rank), (port, name, labels)
            assert labels.get("run_id") == run_id, (port, name, labels)
        assert _value(samples, "training_step") == MAX_STEPS
        assert _value(samples, "training_max_steps") == MAX_STEPS
        # Per-rank counters: each rank consumed its own shard.
        assert _value(samples, "training_samples_total") == BATCH * MAX_STEPS
        assert _value(samples, "training_tokens_total") > BATCH * MAX_STEPS
        assert _value(samples, "training_step_duration_seconds_count") == MAX_STEPS
        loss = _value(samples, "training_loss")
        assert 0.0 < loss < 10.0
        assert _value(samples, "training_step_loss_count") == MAX_STEPS
        assert _value(samples, "training_nonfinite_loss_total") == 0
        assert _value(samples, "training_state", state="training") == 0
        # No hook or flush failed silently.
        errors = {lab["collector"]: v for n, lab, v in samples if n == "training_exporter_collector_errors_total"}
        assert errors and not any(errors.values()), errors

    # Gradients are all-reduced: per-layer norms come from rank 0 only.
    layer_norms = [(lab, v) for n, lab, v in scrapes[base] if n == "training_layer_grad_norm"]
    assert layer_norms, "rank 0 exports no training_layer_grad_norm"
    assert all(v >= 0.0 for _, v in layer_norms)
    assert any(v > 0.0 for _, v in layer_norms)
    assert {lab["rank"] for lab, _ in layer_norms} == {"0"}
    assert not _values(scrapes[base + 1], "training_layer_grad_norm")
    assert not _values(scrapes[base + 1], "training_layer_update_ratio")

    # Each rank's loss is its own micro-batch loss, not a shared value.
    assert _value(scrapes[base], "training_loss") != _value(scrapes[base + 1], "training_loss")


def test_ranks_zero_only_world_process_zero_serves(ddp_zero: DdpRun) -> None:
    base = ddp_zero.port
    samples = ddp_zero.wait_completed([base])[base]
    run_id = ddp_zero.output_dir.name

    for name, labels, _ in samples:
        assert "rank" not in labels, (name, labels)
        assert labels.get("run_id") == run_id, (name, labels)
    assert _value(samples, "training_step") == MAX_STEPS
    assert _value(samples, "training_samples_total") == BATCH * MAX_STEPS
    assert _values(samples, "training_layer_grad_norm")
    errors = {lab["collector"]: v for n, lab, v in samples if n == "training_exporter_collector_errors_total"}
    assert errors and not any(errors.values()), errors
    # Rank 1 never opened base + 1 (rank 0 is still lingering, so the run is not over).
    assert ddp_zero.proc.poll() is None
    assert _refuses(base + 1)
