"""Straggler ranks for real: two gloo ranks under torchrun, rank 1's data loader slowed.

``tests/support/ddp_phases_train.py`` trains a tiny Llama with the plain Trainer under DDP (``ranks="all"``);
rank 1's collator sleeps ``SLEEP`` seconds per batch. Under DDP both ranks' steps take as long (the gradient
all-reduce and the Trainer's token-count gather wait for the slow rank), so the judgement rests on each
rank's own work, data_loading + forward + optimizer seconds per step, which the exporter keeps free of those
waits (exporter/phases.py).

TrainingStragglerRank itself is then evaluated by promtool on the ranks' real numbers: each rank's final
exposition (its phase seconds, step count and step time) is replayed as counters growing at that rank's
average rate per second (its final values over its wall time, the sum of its phases, which tile the run),
one sample a minute for 20 minutes, as Prometheus would have scraped the same pace kept up that long
(instance = the rank's 127.0.0.1:port). The alert must fire for rank 1 and its instance only.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.e2e import free_port_pair, kill_group, torchrun
from support.runif import run_if

from exporter.metrics import PHASES

pytestmark = run_if(gloo=True, promtool=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "support" / "ddp_phases_train.py"
MAX_STEPS = 8
SLEEP = 0.15
TIMEOUT_S = 150.0
WORK = ("data_loading", "forward", "optimizer")
MINUTES = 20


def _final(path: Path) -> dict[str, float]:
    """Phase seconds by phase, plus the step histogram's count and sum, of one rank's exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            if s.name == "training_phase_seconds_total":
                out[s.labels["phase"]] = s.value
            elif s.name in ("training_step_duration_seconds_count", "training_step_duration_seconds_sum"):
                out[s.name] = s.value
    return out


def _run(tmp_path: Path) -> tuple[int, dict[int, dict[str, float]], dict[int, int]]:
    port = free_port_pair()
    out = tmp_path / "ddp-phases"
    log = tmp_path / "torchrun.log"
    proc = torchrun(SCRIPT, ["--port", str(port), "--max-steps", str(MAX_STEPS), "--slow-rank", "1",
                             "--sleep", str(SLEEP), "--output-dir", str(out)], log)
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish:\n" + log.read_text(errors="replace")[-4000:])
    finally:
        kill_group(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    finals = {r: _final(out / f"metrics-rank{r}.prom") for r in (0, 1)}
    batches = {r: int((out / f"batches-rank{r}.txt").read_text()) for r in (0, 1)}
    return port, finals, batches


def _annotations(port: int, ratio: float) -> dict[str, str]:
    """TrainingStragglerRank's annotations for rank 1 (promtool compares them too); ``ratio`` as the
    template's ``humanize`` prints it (``%.4g`` between 1 and 1000)."""
    rules = yaml.safe_load((ROOT / "prometheus" / "rules" / "throughput.alerts.yml").read_text())
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TrainingStragglerRank")
    out = {}
    for key, text in rule["annotations"].items():
        text = text.replace("{{ $labels.rank }}", "1").replace("{{ $labels.run_id }}", "ddp-phases")
        text = text.replace("{{ $labels.instance }}", f"127.0.0.1:{port + 1}")
        out[key] = text.replace("{{ $value | humanize }}", f"{ratio:.4g}")
    return out


def _promtool_case(port: int, finals: dict[int, dict[str, float]], ratio: float) -> dict[str, object]:
    series = []
    per_minute: dict[str, float] = {}
    for rank, final in finals.items():
        wall = sum(final.get(p, 0.0) for p in PHASES)  # the phases tile the run's time

        labels = f'job="training", instance="127.0.0.1:{port + rank}", run_id="ddp-phases", rank="{rank}"'
        for name, value in final.items():
            key = (f"{name}{{{labels}}}" if name.startswith("training_step_duration")
                   else f'training_phase_seconds_total{{{labels}, phase="{name}"}}')
            series.append((key, value))
            per_minute[key] = 60 * value / wall
        series.append((f'training_state{{{labels}, state="training"}}', None))
    input_series = [
        {"series": s, "values": f"1x{MINUTES}" if v is None
         else " ".join(repr(per_minute[s] * k) for k in range(MINUTES + 1))}
        for s, v in series
    ]
    return {
        "rule_files": [str(ROOT / "prometheus" / "rules" / "phases.rules.yml"),
                       str(ROOT / "prometheus" / "rules" / "throughput.alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": input_series,
            "alert_rule_test": [{
                "eval_time": f"{MINUTES}m",
                "alertname": "TrainingStragglerRank",
                # Only rank 1, by its rank and instance label.
                "exp_alerts": [{"exp_labels": {
                    "alertname": "TrainingStragglerRank", "severity": "warning", "component": "throughput",
                    "job": "training", "instance": f"127.0.0.1:{port + 1}", "run_id": "ddp-phases", "rank": "1",
                }, "exp_annotations": _annotations(port, ratio)}],
            }],
        }],
    }


def test_slowed_rank_is_named_straggler(tmp_path: Path) -> None:
    started = time.monotonic()
    port, finals, batches = _run(tmp_path)
    steps = {r: finals[r]["training_step_duration_seconds_count"] for r in (0, 1)}
    assert steps == {0: MAX_STEPS, 1: MAX_STEPS}
    # Rank 1's loader slept SLEEP per batch it made, all of it in its data_loading; rank 0 waited for rank 1
    # (in the token-count gather, the buffer broadcast, the all-reduce) but none of that is data_loading.
    assert batches[1] >= MAX_STEPS
    assert finals[1]["data_loading"] >= batches[1] * SLEEP
    assert finals[0]["data_loading"] < 0.25 * finals[1]["data_loading"], finals
    work = {r: sum(finals[r][p] for p in WORK) / steps[r] for r in (0, 1)}
    # Wall time per step: the phases tile the loop.
    step = {r: sum(finals[r].get(p, 0.0) for p in PHASES) / steps[r] for r in (0, 1)}
    median = (work[0] + work[1]) / 2  # quantile 0.5 of two values
    ratio = {r: work[r] / median for r in (0, 1)}
    # The judgement by hand (the alert's two conditions), then by promtool on the same numbers.
    assert ratio[1] > 1.2 and (work[1] - median) / step[1] > 0.1, (ratio, work, step)
    assert ratio[0] < 1.2, ratio
    case = tmp_path / "straggler.test.yml"
    case.write_text(yaml.safe_dump(_promtool_case(port, finals, ratio[1]), sort_keys=False))
    res = subprocess.run(["promtool", "test", "rules", str(case)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"work/step {work}, step {step}, ratio to median {ratio}, {time.monotonic() - started:.0f} s")
