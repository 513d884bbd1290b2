"""Every query of every dashboard, run against a real Prometheus scraping a real demo run.

demo training (`training-exporter demo`, a NaN loss injected mid-run, so that
an alert fires, checkpoints every SAVE_STEPS) and the checkpoint analytics
exporter (`training-exporter analytics` on those checkpoints) -> real
``prometheus`` (1 s scrape and rule evaluation, the project's
prometheus/rules/*.yml, the job names of prometheus/prometheus.yml) -> the
Prometheus HTTP API, queried the way
Grafana does: every variable (``label_values`` through the label values API),
every panel target (instant ones at a time inside the run, the others over
the whole run) and every annotation, with ``$job``, ``$instance``,
``$run_id``, ``$__range`` and friends substituted.

A query that errors fails the test, and so does an empty result, except for
the panels listed in ALLOWED_EMPTY below, and only while the metric families
named there have no series at all in this run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from support.e2e import ROOT, Process, free_port, project_rule_files, start_demo, start_prometheus, stop_all
from support.runif import run_if
from test_dashboards import (
    Query,
    dashboards,
    families_read,
    queries,
    recording_rules,
    split_label_values,
    substitute,
)

from exporter.config import ExporterConfig

pytestmark = run_if(prometheus=True)

RUN_ID = "dash-e2e"
# About 10 s of training at the demo's ~75 steps/s (more on a loaded 2-core
# machine), enough scrapes for every rate and deriv. The NaN step comes after
# many scrapes (TrainingLossNonFinite needs the counter seen at 0) and close
# to the end, so that the alert, which resolves a minute after the NaN step,
# still fires when the queries run (after the last step, evaluation and
# checkpoint analysis).
STEPS = 600
NAN_STEP = 500
SAVE_STEPS = 200
SCRAPE_S = 1
# Grafana's $__rate_interval: max(4 x scrape interval, $__interval + scrape interval).
RATE_INTERVAL_S = 4 * SCRAPE_S
DEADLINE_S = 150

GPU = ("training_gpu_temperature_celsius", "training_gpu_memory_used_bytes", "training_gpu_memory_total_bytes",
       "training_gpu_utilization_ratio", "training_gpu_power_watts", "training_gpu_power_limit_watts")
# PyTorch's CUDA caching allocator: read only from a process that has initialised CUDA.
CUDA = ("training_cuda_memory_allocated_bytes", "training_cuda_memory_reserved_bytes",
        "training_cuda_memory_peak_allocated_bytes", "training_cuda_memory_peak_reserved_bytes",
        "training_cuda_memory_reserved_unallocated_bytes", "training_cuda_memory_total_bytes",
        "training_cuda_alloc_retries_total", "training_cuda_ooms_total")
NO_CUDA = "no CUDA device on a CPU-only machine (the allocator exports nothing)"
# NVML health fields; each is absent where the board or driver lacks it too (ECC on a consumer board, NVLink on
# a PCIe card, retired pages on Ampere and later, XID events where NVML cannot register them).
NVML_HEALTH = "no GPU on a CPU-only machine (NVML absent); or a field this board or driver does not have"
# The fp16 GradScaler's families: the demo trains in fp32 (bf16 and fp32 need no scaler).
AMP = ("training_amp_loss_scale", "training_amp_skipped_steps_total")
# The demo's peak FLOP/s: the CPU is in no peak table, so it is given one; 1e11 FLOP/s is of the order of a
# few x86 cores' fp32 FMA peak, a figure for the demo (MFU has data), not a measurement.
DEMO_PEAK_FLOPS = "1e11"
# Panels that legitimately stay empty in this run, and the families whose
# complete absence excuses them: this machine has no GPU (NVML absent, the
# GPU collector exports nothing; no CUDA) and the demo does not train in fp16.
# On a GPU machine these families exist and the panels are checked like the
# others. A query is excused only when every listed family it reads has no
# series at all (so a panel's other queries still need data).
ALLOWED_EMPTY: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("training-run", "GPU temperature"): (GPU, "no GPU on a CPU-only machine"),
    ("training-hardware", "GPU temperature"): (GPU, "no GPU on a CPU-only machine"),
    ("training-hardware", "GPU memory"): (GPU, "no GPU on a CPU-only machine"),
    ("training-hardware", "GPU memory used"): (GPU, "no GPU on a CPU-only machine"),
    ("training-hardware", "GPU utilisation"): (GPU, "no GPU on a CPU-only machine"),
    ("training-hardware", "GPU power"): (GPU, "no GPU on a CPU-only machine"),
    # Its tokens/s query must have data all the same: only the GPU one is excused.
    ("training-hardware", "Tokens / s vs GPU memory"): (GPU, "no GPU on a CPU-only machine"),
    ("training-systems", "CUDA memory headroom"): (CUDA, NO_CUDA),
    ("training-systems", "CUDA memory fragmentation"): (CUDA, NO_CUDA),
    ("training-systems", "CUDA allocated vs reserved"): (CUDA, NO_CUDA),
    ("training-systems", "Allocator retries and OOMs"): (CUDA, NO_CUDA),
    ("training-systems", "GPU clocks"): (("training_gpu_sm_clock_hertz", "training_gpu_memory_clock_hertz"),
                                         NVML_HEALTH),
    ("training-systems", "Throttle reasons"): (("training_gpu_throttle_reason",), NVML_HEALTH),
    ("training-systems", "ECC errors"): (("training_gpu_ecc_errors_total",), NVML_HEALTH),
    ("training-systems", "XID errors"): (("training_gpu_xid_errors_total", "training_gpu_last_xid"), NVML_HEALTH),
    ("training-systems", "Memory repairs"): (("training_gpu_remapped_rows_pending", "training_gpu_remapped_rows_failed",
                                              "training_gpu_retired_pages_pending"), NVML_HEALTH),
    ("training-systems", "PCIe and NVLink errors"): (("training_gpu_pcie_replays_total",
                                                      "training_gpu_nvlink_errors_total"), NVML_HEALTH),
    ("training-systems", "Loss scale"): (AMP, "the demo trains in fp32: no fp16 GradScaler"),
    ("training-systems", "Skipped steps"): (AMP, "the demo trains in fp32: no fp16 GradScaler"),
}


@dataclass
class Outcome:
    query: Query
    expr: str
    error: str = ""
    series: int = 0
    result: Any = None


def _job_names() -> tuple[str, str]:
    """The training and analytics job names of the project's scrape configuration."""
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    names = [job["job_name"] for job in config["scrape_configs"]]
    training = next(name for name in names if "analytics" not in name)
    analytics = next(name for name in names if "analytics" in name)
    return training, analytics


def _write_prometheus_config(workdir: Path, jobs: dict[str, str]) -> Path:
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s",
                   "scrape_timeout": f"{SCRAPE_S}s"},
        "rule_files": [str(path) for path in project_rule_files()],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in jobs.items()],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start_analytics(workdir: Path, port: int) -> Process:
    """The checkpoint analytics exporter on the demo's checkpoints, against the demo's base model.

    The demo builds its model from seed 0; the same model without the adapter,
    saved here, is the base the checkpoints drifted from.
    """
    from exporter.demo.task import CharTokenizer, build_model

    base = workdir / "base"
    model: Any = build_model(CharTokenizer(), lora=False, seed=0)  # a PreTrainedModel, typed as nn.Module
    model.save_pretrained(base)
    argv = [
        sys.executable, "-m", "exporter.cli", "analytics",
        "--base", str(base),
        "--checkpoint-dir", str(workdir / RUN_ID),
        "--run-id", RUN_ID,
        "--status-dir", str(workdir / "status"),
        "--interval", "1",
        "--web.listen-address", f"127.0.0.1:{port}",
    ]
    return Process("analytics", argv, workdir, cwd=ROOT)


class PrometheusAPI:
    """GET on the Prometheus HTTP API; an error answer raises with Prometheus's message."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.url}{path}", params=params, timeout=10)
        payload = response.json()
        if payload.get("status") != "success":
            raise RuntimeError(f"{payload.get('errorType')}: {payload.get('error')}")
        return payload["data"]


def _run_queries(api: PrometheusAPI, start: float, end: float) -> tuple[list[Outcome], dict[str, dict[str, list[str]]]]:
    """Every query of every dashboard, variables first (their values feed the panels' queries)."""
    outcomes: list[Outcome] = []
    chosen: dict[str, dict[str, list[str]]] = {}
    for uid, dash in dashboards().items():
        values: dict[str, list[str]] = {}
        all_queries = list(queries(dash))
        for query in (q for q in all_queries if q.kind == "variable"):
            name = query.panel.lstrip("$")
            selector, label = split_label_values(query.expr)
            expr = substitute(selector, values, interval_s=SCRAPE_S, range_s=end - start,
                              rate_interval_s=RATE_INTERVAL_S)
            outcome = Outcome(query, expr)
            try:
                found = api.get(f"/api/v1/label/{label}/values", **{"match[]": expr, "start": start, "end": end})
                outcome.series, outcome.result = len(found), found
            except (RuntimeError, requests.RequestException, ValueError) as exc:
                outcome.error = str(exc)
                found = []
            outcomes.append(outcome)
            # Job and instance: "All" (every value); run: the demo's run, as the alert links select it.
            values[name] = [RUN_ID] if name == "run_id" else list(found) or ["no-values"]
        chosen[uid] = values
        for query in (q for q in all_queries if q.kind != "variable"):
            expr = substitute(query.expr, values, interval_s=SCRAPE_S, range_s=end - start,
                              rate_interval_s=RATE_INTERVAL_S)
            outcome = Outcome(query, expr)
            try:
                if query.instant:
                    data = api.get("/api/v1/query", query=expr, time=end)
                else:
                    data = api.get("/api/v1/query_range", query=expr, start=start, end=end, step=SCRAPE_S)
                outcome.result = data["result"]
                outcome.series = len(data["result"])
            except (RuntimeError, requests.RequestException, ValueError) as exc:
                outcome.error = str(exc)
            outcomes.append(outcome)
    return outcomes, chosen


def test_every_dashboard_query_runs_and_shows_data(tmp_path: Path) -> None:
    training_job, analytics_job = _job_names()
    demo_port, analytics_port, prom_port = free_port(), free_port(), free_port()
    processes: list[Process] = []
    try:
        processes.append(_start_analytics(tmp_path, analytics_port))
        jobs = {training_job: f"127.0.0.1:{demo_port}", analytics_job: f"127.0.0.1:{analytics_port}"}
        processes.append(start_prometheus(_write_prometheus_config(tmp_path, jobs), tmp_path, prom_port))
        start = time.time()
        api = PrometheusAPI(f"http://127.0.0.1:{prom_port}")
        processes.append(start_demo(
            tmp_path, RUN_ID, demo_port, STEPS, [f"nan@{NAN_STEP}"],
            # Outlives the test; stopped by PID at the end.
            linger=DEADLINE_S + 30, save_steps=SAVE_STEPS,
            # Every batch profiled, so that the drift reference and window fill within the run; a peak
            # FLOP/s for the CPU, so that MFU and HFU have data.
            extra_args=["--drift.sample-every", "1", "--mfu.peak-flops-per-second", DEMO_PEAK_FLOPS]))

        deadline = time.monotonic() + DEADLINE_S
        # The run completed and the analytics exporter published its last checkpoint.
        completed = (f'training_state{{run_id="{RUN_ID}", state="completed"}} == 1 and on (run_id) '
                     f'training_analytics_checkpoint_step{{run_id="{RUN_ID}"}} == {STEPS}')
        while True:
            for proc in processes:
                if not proc.running():
                    raise AssertionError(f"{proc.name} exited early ({proc.popen.returncode}):\n{proc.log_tail()}")
            if api.get("/api/v1/query", query=completed)["result"]:
                break
            assert time.monotonic() < deadline, f"the demo and its analysis did not complete in {DEADLINE_S} s"
            time.sleep(0.5)
        # A few more scrapes and rule evaluations after the last step.
        time.sleep(3 * SCRAPE_S)
        end = time.time()
        outcomes, chosen = _run_queries(api, start, end)
        present = {name for name in api.get("/api/v1/label/__name__/values", start=start, end=end)}
    finally:
        stop_all(sorted(processes, key=lambda proc: proc.name != "prometheus"))

    errors = [f"{o.query.dashboard} / {o.query.panel} {o.query.ref}: {o.error}\n    {o.expr}"
              for o in outcomes if o.error]

    rules = recording_rules()
    unexpected, excused = [], []
    for o in outcomes:
        if o.series or o.error:
            continue
        entry = ALLOWED_EMPTY.get((o.query.dashboard, o.query.panel))
        # The listed families this query reads; it is excused when none of them has a series.
        listed = set(entry[0]) & families_read(o.query.expr, rules) if entry else set()
        if entry and listed and not listed & present:
            excused.append(f"{o.query.dashboard} / {o.query.panel} {o.query.ref}: {entry[1]}")
        else:
            unexpected.append(f"{o.query.dashboard} / {o.query.panel} {o.query.ref or o.query.kind}: {o.expr}")
    print("\nempty, as allowed:\n  " + "\n  ".join(excused or ["(none)"]))
    assert not errors and not unexpected, (
        "queries failed:\n" + "\n".join(errors or ["(none)"]) + "\nempty results:\n" + "\n".join(unexpected))

    # The variables found the run, its job and its instance on every dashboard.
    for uid, values in chosen.items():
        assert training_job in values["job"], (uid, values)
        assert f"127.0.0.1:{demo_port}" in values["instance"], (uid, values)
    for o in outcomes:
        if o.query.kind == "variable" and o.query.panel == "$run_id":
            assert RUN_ID in o.result, o

    # And the values are the run's: finished, every step, one NaN step, the NaN alert firing.
    def instant(uid: str, title: str, ref: str = "A") -> list[dict[str, Any]]:
        return next(o.result for o in outcomes
                    if (o.query.dashboard, o.query.panel, o.query.ref) == (uid, title, ref))

    assert [r["metric"]["state"] for r in instant("training-run", "State")] == ["completed"]
    assert float(instant("training-run", "Step")[0]["value"][1]) == STEPS
    assert float(instant("training-run", "Step", "B")[0]["value"][1]) == STEPS
    assert float(instant("training-run", "Progress")[0]["value"][1]) == 1.0
    assert float(instant("training-run", "Non-finite loss steps")[0]["value"][1]) == 1
    assert "TrainingLossNonFinite" in {r["metric"]["alertname"] for r in instant("training-run", "Active alerts")}
    annotation = next(o for o in outcomes if o.query.kind == "annotation" and o.query.dashboard == "training-run")
    assert "TrainingLossNonFinite" in {r["metric"]["alertname"] for r in annotation.result}
    eta = float(instant("training-run", "ETA")[0]["value"][1])
    assert eta == 0.0, eta
    # The analytics side describes the last checkpoint, embeddings (layer -1) included.
    assert float(instant("training-layers", "Analysed checkpoint")[0]["value"][1]) == STEPS
    assert [r["metric"]["pattern"] for r in instant("training-layers", "Drift pattern")] in (
        ["uniform"], ["top_heavy"], ["bottom_heavy"])
    assert "-1" in {r["metric"]["layer"] for r in instant("training-layers", "Drift per layer")}
    # A Trainer evaluation every fifth of the run.
    assert float(instant("training-evaluation", "Evaluations")[0]["value"][1]) >= 1

    # Systems: MFU is the model FLOP/s over the demo's peak; without gradient checkpointing HFU is MFU.
    def last(uid: str, title: str, ref: str = "A") -> list[float]:
        """The last value of each series of a range query."""
        return [float(series["values"][-1][1]) for series in instant(uid, title, ref)]

    assert last("training-systems", "Achieved FLOP/s", "C") == [float(DEMO_PEAK_FLOPS)]
    [mfu], [hfu], [model_rate] = (last("training-systems", "MFU and HFU"), last("training-systems", "MFU and HFU", "B"),
                                  last("training-systems", "Achieved FLOP/s"))
    assert mfu > 0 and hfu == mfu, (mfu, hfu)
    assert abs(mfu - model_rate / float(DEMO_PEAK_FLOPS)) <= 1e-9 * mfu, (mfu, model_rate)
    # One rank: its own median.
    assert last("training-systems", "Ranks against their median") == [1.0]
    # The phases tile the loop's time: their shares add up to 1.
    phase_shares = {r["metric"]["phase"]: float(r["values"][-1][1])
                    for r in instant("training-systems", "Step phase breakdown")}
    assert {"forward", "backward", "optimizer"} <= set(phase_shares), phase_shares
    assert abs(sum(phase_shares.values()) - 1) <= 1e-9, phase_shares
    # Checkpoints every SAVE_STEPS steps: sizes and save times are measured, the last save is in the past.
    assert all(size > 0 for size in last("training-systems", "Checkpoint size")), "no checkpoint size"
    assert all(duration > 0 for duration in last("training-systems", "Checkpoint duration"))
    assert all(age > 0 for age in last("training-systems", "Time since the last checkpoint"))
    # The run completed without a hang; its steps are far faster than the floor, so the threshold is the floor.
    assert [float(r["value"][1]) for r in instant("training-systems", "Hang suspected")] == [0.0]
    assert last("training-systems", "Time without a step", "B") == [ExporterConfig().watchdog_floor_seconds]
