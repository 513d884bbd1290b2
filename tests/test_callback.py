"""PrometheusCallback on a real Trainer (tiny GPT-2 + LoRA from exporter.demo.run), read back from the registry
and from the live HTTP endpoint."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from support.runif import run_if
from transformers import TrainerCallback

from exporter import PrometheusCallback
from exporter.collectors.host import HostCollector
from exporter.config import ConfigError, ExporterConfig
from exporter.demo.run import build_trainer

MAX_STEPS = 16
BATCH = 8
NAN_STEP = 7


class Probe(TrainerCallback):
    """Scrapes the live endpoint at chosen steps, from inside the training loop."""

    def __init__(self, exporter: PrometheusCallback, steps: set[int]) -> None:
        self.exporter = exporter
        self.steps = steps
        self.pages: dict[int, str] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step in self.steps:
            assert self.exporter.monitor is not None
            port = self.exporter.monitor.port
            self.pages[state.global_step] = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def value(page: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{name}{labels} not in page")


class CountingCollator:
    """Independent count of the real tokens of each training batch, in order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.train_batches: list[int] = []

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        out = self.inner(batch)
        if out["input_ids"].shape[0] == BATCH:  # eval batches are 64 wide
            self.train_batches.append(int(out["attention_mask"].sum()))
        return out

    @property
    def tokens(self) -> int:
        # accelerate's loader prefetches one batch past the last step.
        return sum(self.train_batches[:MAX_STEPS])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("runs") / "nan-run"
    cb = PrometheusCallback(
        listen_address="127.0.0.1:0", layers_interval=2, update_ratio_interval=4, predictions_interval=4,
        min_sample_period_seconds=0,
        scrape_window_seconds=0,  # each probe reads the step it is taken at, never a shared earlier render
    )
    probe = Probe(cb, {NAN_STEP, MAX_STEPS})
    trainer = build_trainer(
        [cb, probe], output_dir=str(out), max_steps=MAX_STEPS, faults=[f"nan@{NAN_STEP}"],
        save_strategy="no", logging_steps=5, per_device_train_batch_size=BATCH, disable_tqdm=True,
        eval_steps=8,
    )
    assert trainer.args.logging_nan_inf_filter  # the default that hides NaN from logs
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    trainer.train()
    assert cb.monitor is not None
    return {"cb": cb, "mon": cb.monitor, "probe": probe, "trainer": trainer, "collator": collator}


def test_nan_reaches_metrics_despite_the_logging_filter(run: dict[str, Any]) -> None:
    page = run["probe"].pages[NAN_STEP]
    assert math.isnan(value(page, "training_loss", run_id="nan-run"))
    assert value(page, "training_nonfinite_loss_total") == 1.0
    logged = [h["loss"] for h in run["trainer"].state.log_history if "loss" in h]
    assert logged and all(math.isfinite(x) for x in logged)  # the Trainer's own logs never showed it
    final = run["probe"].pages[MAX_STEPS]
    assert math.isfinite(value(final, "training_loss"))  # update skipped, the run recovered
    assert value(final, "training_nonfinite_loss_total") == 1.0


def test_progress_throughput_and_optimisation_values(run: dict[str, Any]) -> None:
    mon, trainer, collator = run["mon"], run["trainer"], run["collator"]

    def s(name: str, **labels: str) -> float | None:
        return mon.registry.get_sample_value(name, {"run_id": "nan-run", **labels})

    assert s("training_step") == MAX_STEPS
    assert s("training_max_steps") == MAX_STEPS
    assert s("training_state", state="completed") == 1.0
    assert s("training_state", state="training") == 0.0
    assert s("training_samples_total") == MAX_STEPS * BATCH
    assert s("training_tokens_total") == collator.tokens
    assert s("training_tokens_total") < MAX_STEPS * BATCH * 11  # padding is not counted
    assert s("training_step_duration_seconds_count") == MAX_STEPS
    last_log = [h for h in trainer.state.log_history if "grad_norm" in h][-1]
    assert last_log["step"] == 15
    # lr and pre-clip norm as the Trainer itself logged them at its last logging step.
    assert s("training_grad_norm") == pytest.approx(last_log["grad_norm"], rel=1e-6)
    assert s("training_learning_rate") > 0
    assert s("training_epoch") == pytest.approx(trainer.state.epoch)
    assert s("training_eval_loss") == pytest.approx(
        [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h][-1]
    )
    assert s("training_evaluations_total") == 2.0
    page = run["probe"].pages[MAX_STEPS]
    assert value(page, "training_info", adapter="lora", model_type="gpt2", torch_version=torch.__version__) == 1.0


def test_layer_and_lora_module_series(run: dict[str, Any]) -> None:
    page = run["probe"].pages[MAX_STEPS]
    fams = {f.name: f for f in text_string_to_metric_families(page)}
    grad = {(x.labels["layer"], x.labels["module"]): x.value for x in fams["training_layer_grad_norm"].samples}
    # wte (tied to lm_head) and wpe train fully via peft's modules_to_save.
    expected = {("-1", "wte"), ("-1", "wpe")} | {
        (str(i), m) for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(grad) == expected
    assert all(v > 0 and math.isfinite(v) for v in grad.values())
    assert value(page, "training_dead_layers") == 0.0
    assert value(page, "training_trainable_groups") == len(expected)
    ratios = {(x.labels["layer"], x.labels["module"]): x.value for x in fams["training_layer_update_ratio"].samples}
    assert set(ratios) == expected and all(0 < v < 1 for v in ratios.values())
    assert 0 < value(page, "training_top1_confidence_ratio") <= value(page, "training_top5_confidence_ratio") <= 1
    assert 0 < value(page, "training_token_entropy_nats") < math.log(16)


def test_missing_nvml_is_counted_and_training_completed(run: dict[str, Any]) -> None:
    mon = run["mon"]
    errors = mon.registry.get_sample_value(
        "training_exporter_collector_errors_total", {"run_id": "nan-run", "collector": "gpu"}
    )
    if torch.cuda.is_available():  # pragma: no cover - GPU machines have NVML
        pytest.skip("NVML present")
    assert errors is not None and errors >= 1
    assert mon.registry.get_sample_value("training_gpu_temperature_celsius", {"run_id": "nan-run"}) is None
    assert mon.registry.get_sample_value("training_state", {"run_id": "nan-run", "state": "completed"}) == 1.0


@run_if(promtool=True)
def test_live_endpoint_passes_promtool(run: dict[str, Any]) -> None:
    for page in run["probe"].pages.values():
        proc = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip() == "" and proc.stderr.strip() == ""


def test_every_series_carries_run_id(run: dict[str, Any]) -> None:
    page = run["probe"].pages[MAX_STEPS]
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            assert s.labels.get("run_id") == "nan-run", s


def test_broken_collector_does_not_stop_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: HostCollector) -> Any:
        raise OSError("/proc unreadable")

    monkeypatch.setattr(HostCollector, "collect", broken)
    # Window 0: the probe at step 4 reads step 4, not a render shared with the probe at step 2.
    cb = PrometheusCallback(listen_address="127.0.0.1:0", run_id="broken", scrape_window_seconds=0)
    probe = Probe(cb, {2, 4})
    trainer = build_trainer([cb, probe], output_dir=str(tmp_path / "x"), max_steps=4, save_strategy="no",
                            per_device_train_batch_size=4, disable_tqdm=True)
    trainer.train()
    assert trainer.state.global_step == 4
    assert value(probe.pages[4], "training_exporter_collector_errors_total", collector="host") == 2.0
    assert value(probe.pages[4], "training_step") == 4.0


def test_taken_port_training_goes_on(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        cb = PrometheusCallback(listen_address=f"127.0.0.1:{port}", run_id="busy")
        trainer = build_trainer([cb], output_dir=str(tmp_path / "y"), max_steps=3, save_strategy="no",
                                per_device_train_batch_size=4, disable_tqdm=True)
        trainer.train()
    assert trainer.state.global_step == 3
    assert cb.monitor is not None and cb.monitor.port is None
    reg = cb.monitor.registry
    assert reg.get_sample_value("training_exporter_collector_errors_total",
                                {"run_id": "busy", "collector": "http_server"}) == 1.0
    assert reg.get_sample_value("training_step", {"run_id": "busy"}) == 3.0


@pytest.mark.parametrize("accumulation", [1, 3])
def test_step_loss_matches_the_trainers_own_loss(tmp_path: Path, accumulation: int) -> None:
    cb = PrometheusCallback(listen_address="127.0.0.1:0", run_id="ga", gpu=False, host=False)
    losses: list[float] = []

    class Every(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                assert cb.monitor is not None
                got = cb.monitor.registry.get_sample_value("training_loss", {"run_id": "ga"})
                losses.append(got - logs["loss"])  # type: ignore[operator]

    trainer = build_trainer([cb, Every()], output_dir=str(tmp_path / "ga"), max_steps=3, save_strategy="no",
                            per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                            logging_steps=1, disable_tqdm=True)
    trainer.train()
    assert len(losses) == 3
    # Trainer logs round to 4 significant digits in 5.x; the exporter keeps full precision.
    assert all(abs(d) < 1e-3 for d in losses), losses


def test_environment_applies_to_the_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINING_EXPORTER_LOSS_EMA_ALPHA", "0.25")
    monkeypatch.setenv("TRAINING_EXPORTER_COLLECTOR_GPU", "false")
    monkeypatch.setenv("TRAINING_EXPORTER_LABEL", "team=nlp,zone=b")
    monkeypatch.setenv("TRAINING_EXPORTER_WEB_PORT_IN_USE", "fail")
    cfg = PrometheusCallback().config
    assert (cfg.ema_alpha, cfg.gpu, cfg.labels, cfg.port_in_use) == (0.25, False, {"team": "nlp", "zone": "b"}, "fail")
    assert cfg.host and cfg.layers_interval == 10


def test_config_file_named_by_the_environment_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "exporter.yml"
    f.write_text("collectors:\n  update_ratio: false\nintervals:\n  layers_steps: 20\nlabels:\n  team: nlp\n")
    monkeypatch.setenv("TRAINING_EXPORTER_CONFIG_FILE", str(f))
    cfg = PrometheusCallback().config
    assert (cfg.update_ratio, cfg.layers_interval, cfg.labels) == (False, 20, {"team": "nlp"})
    assert cfg.predictions and cfg.ema_alpha == 0.1


def test_explicit_beats_environment_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "exporter.yml"
    f.write_text("loss:\n  ema_alpha: 0.3\nintervals:\n  layers_steps: 7\nrun_id: from-file\n"
                 "labels:\n  team: file\n")
    monkeypatch.setenv("TRAINING_EXPORTER_CONFIG_FILE", str(f))

    def got() -> tuple[Any, ...]:
        c = cb.config
        return c.ema_alpha, c.layers_interval, c.run_id, c.labels, c.variance_window

    cb = PrometheusCallback()
    assert got() == (0.3, 7, "from-file", {"team": "file"}, 50)
    monkeypatch.setenv("TRAINING_EXPORTER_LOSS_EMA_ALPHA", "0.2")
    monkeypatch.setenv("TRAINING_EXPORTER_LAYERS_INTERVAL_STEPS", "5")
    monkeypatch.setenv("TRAINING_EXPORTER_LABEL", "team=env")
    cb = PrometheusCallback()
    assert got() == (0.2, 5, "from-file", {"team": "env"}, 50)
    cb = PrometheusCallback(ema_alpha=0.5, labels={"team": "kwarg", "zone": "a"})
    # Each setting from its highest layer: argument, environment, file, default.
    assert got() == (0.5, 5, "from-file", {"team": "kwarg", "zone": "a"}, 50)


def test_bad_values_from_every_source_in_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "exporter.yml"
    f.write_text("collectors:\n  gpu: maybe\n  nvme: true\n")
    monkeypatch.setenv("TRAINING_EXPORTER_CONFIG_FILE", str(f))
    monkeypatch.setenv("TRAINING_EXPORTER_LOSS_VARIANCE_WINDOW", "many")
    monkeypatch.setenv("TRAINING_EXPORTER_RANKS", "some")
    # Overridden by the argument below, so not an error.
    monkeypatch.setenv("TRAINING_EXPORTER_LOSS_EMA_ALPHA", "lots")
    with pytest.raises(ConfigError) as err:
        PrometheusCallback(ema_alpha=0.5, layers_interval=0, emma_alpha=0.1)
    assert err.value.problems == [
        "unknown setting 'emma_alpha'",
        "unknown key 'collectors.nvme'",
        "TRAINING_EXPORTER_LOSS_VARIANCE_WINDOW: invalid literal for int() with base 10: 'many'",
        "TRAINING_EXPORTER_RANKS: must be one of zero, all, got 'some'",
        "collectors.gpu: must be true or false, got 'maybe'",
        "intervals.layers_steps: must be an integer >= 1, got 0",
    ]
    text = str(err.value)
    assert "\n" not in text and text.startswith("invalid configuration: unknown setting 'emma_alpha'; ")


def test_config_object_is_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "exporter.yml"
    f.write_text("intervals:\n  layers_steps: 7\n")
    monkeypatch.setenv("TRAINING_EXPORTER_CONFIG_FILE", str(f))
    monkeypatch.setenv("TRAINING_EXPORTER_LOSS_EMA_ALPHA", "0.2")
    monkeypatch.setenv("TRAINING_EXPORTER_RUN_ID", "from-env")
    built = ExporterConfig(ema_alpha=0.05, gpu=False)
    assert PrometheusCallback(built).config == built  # neither the environment nor the file is read
    assert PrometheusCallback(config=built, run_id="mine").config == ExporterConfig(ema_alpha=0.05, gpu=False,
                                                                                     run_id="mine")
    with pytest.raises(ConfigError) as err:
        PrometheusCallback(ExporterConfig(ema_alpha=5.0), emma_alpha=0.1)
    assert err.value.problems == ["unknown setting 'emma_alpha'", "loss.ema_alpha: must be a number in (0, 1], got 5.0"]


def test_settings_from_the_environment_reach_the_live_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINING_EXPORTER_RUN_ID", "env-run")
    monkeypatch.setenv("TRAINING_EXPORTER_LABEL", "team=nlp")
    monkeypatch.setenv("TRAINING_EXPORTER_WEB_LISTEN_ADDRESS", "127.0.0.1:0")
    monkeypatch.setenv("TRAINING_EXPORTER_LOSS_EMA_ALPHA", "1")
    cb = PrometheusCallback(gpu=False, host=False)
    probe = Probe(cb, {2})
    trainer = build_trainer([cb, probe], output_dir=str(tmp_path / "out"), max_steps=4, save_strategy="no",
                            per_device_train_batch_size=4, disable_tqdm=True)
    trainer.train()
    # Served on the free port the environment's address asked for.
    assert value(probe.pages[2], "training_step", run_id="env-run", team="nlp") == 2.0
    assert cb.monitor is not None
    reg = cb.monitor.registry
    labels = {"run_id": "env-run", "team": "nlp"}
    assert reg.get_sample_value("training_step", labels) == 4.0
    assert reg.get_sample_value("training_step", {"run_id": "out"}) is None  # not derived from the output dir
    # With alpha 1 the EMA is the newest loss; the default 0.1 would lag behind it.
    loss = reg.get_sample_value("training_loss", labels)
    assert loss is not None and reg.get_sample_value("training_loss_ema", labels) == loss
