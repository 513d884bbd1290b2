"""Settings: one table gives the dataclass, YAML keys, flags and environment twins."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import (
    DEFAULT_PORT,
    OPTIONS,
    ConfigError,
    ExporterConfig,
    Option,
    add_arguments,
    load_yaml,
    parse_listen_address,
    resolve,
    resolve_settings,
)


def parse(argv: list[str], env: dict[str, str] | None = None) -> ExporterConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(argv), environ=env or {})


def test_defaults() -> None:
    cfg = parse([])
    assert cfg == ExporterConfig()
    assert cfg.host_port == ("0.0.0.0", DEFAULT_PORT)
    assert cfg.ema_alpha == 0.1 and cfg.layers_interval == 10 and cfg.ranks == "zero"


def test_every_option_has_flag_env_and_yaml_key() -> None:
    envs = [o.env for o in OPTIONS]
    assert len(set(envs)) == len(envs)
    assert "TRAINING_EXPORTER_WEB_LISTEN_ADDRESS" in envs
    assert "TRAINING_EXPORTER_COLLECTOR_UPDATE_RATIO" in envs
    assert {o.attr for o in OPTIONS} == set(ExporterConfig.__dataclass_fields__)


def test_flag_is_the_yaml_key_and_env_names_are_unchanged() -> None:
    for opt in OPTIONS:
        assert opt.flag == opt.yaml.replace("_", "-")
        assert opt.flags == (opt.flag, *opt.aliases)
    # Deployments set these; they are named after the spellings the flags had before they followed the
    # YAML keys, and must not change with the flags.
    assert [o.env.removeprefix("TRAINING_EXPORTER_") for o in OPTIONS] == [
        "WEB_LISTEN_ADDRESS", "WEB_PORT_IN_USE", "LINGER", "WEB_FINAL_SCRAPE_TIMEOUT", "SIGNALS_SIGTERM",
        "WEB_SIGTERM_TIMEOUT",
        # Added since, between the other web.* settings; web.config_file is named after its alias
        # --web.config.file, the spelling of every official exporter.
        "WEB_CONFIG_FILE", "WEB_SCRAPE_WINDOW_SECONDS", "WEB_MAX_CONNECTIONS", "WEB_MAX_REQUESTS_PER_SECOND",
        "WEB_READ_TIMEOUT_SECONDS", "WEB_IDLE_TIMEOUT_SECONDS",
        "RUN_ID", "LABEL", "RANKS", "COLLECTOR_GPU", "COLLECTOR_HOST", "COLLECTOR_LAYERS",
        "COLLECTOR_UPDATE_RATIO", "COLLECTOR_PREDICTIONS", "LAYERS_INTERVAL_STEPS", "UPDATE_RATIO_INTERVAL_STEPS",
        "PREDICTIONS_INTERVAL_STEPS", "INTERVALS_MIN_PERIOD_SECONDS", "LOSS_EMA_ALPHA", "LOSS_VARIANCE_WINDOW",
        "LOSS_WINDOW_SECONDS", "COLLECTOR_EVAL", "COLLECTOR_PREVIEWS", "COLLECTOR_DRIFT", "EVAL_INTERVAL_STEPS",
        "EVAL_BUDGET", "EVAL_MAX_NEW_TOKENS", "EVAL_BATCH_SIZE", "EVAL_FAILURE_POOL", "HISTORY_DIR",
        "HISTORY_COMPRESS_AFTER_DAYS", "HISTORY_DELETE_AFTER_DAYS", "DRIFT_SAMPLE_EVERY", "DRIFT_WINDOW_BATCHES",
        "DRIFT_REFERENCE_BATCHES", "DRIFT_TOP_K", "DRIFT_MAX_LENGTH",
        # Settings added since follow the YAML key.
        "COLLECTORS_CUDA", "COLLECTORS_FLOPS", "COLLECTORS_PHASES", "COLLECTORS_AMP", "COLLECTORS_WATCHDOG",
        "MFU_PEAK_FLOPS_PER_SECOND", "WATCHDOG_MULTIPLE", "WATCHDOG_FLOOR_SECONDS",
    ]


# A valid value that is no option's default, as a flag's arguments, per kind.
SAMPLE_ARGS = {"int": ["7"], "float": ["0.5"], "str": ["x"], "labels": ["team=nlp"]}
ALIASED = [opt for opt in OPTIONS if opt.aliases]


def test_some_options_keep_an_alias() -> None:
    assert {o.attr for o in ALIASED} >= {"linger_seconds", "gpu", "layers_interval", "labels"}
    assert all(alias != opt.flag for opt in ALIASED for alias in opt.aliases)


@pytest.mark.parametrize("opt", ALIASED, ids=lambda o: o.attr)
def test_derived_flag_and_alias_parse_to_the_same_value(opt: Option, tmp_path: Path) -> None:
    default = getattr(ExporterConfig(), opt.attr)
    sample = SAMPLE_ARGS.get(opt.kind, [])
    if opt.attr == "web_config_file":  # validated by loading it: an empty web config file is plain HTTP
        (tmp_path / "web.yml").write_text("")
        sample = [str(tmp_path / "web.yml")]
    if opt.kind == "bool":
        for prefix, expected in (("--", True), ("--no-", False)):
            values = [getattr(parse([prefix + flag]), opt.attr) for flag in opt.flags]
            assert values == [expected] * len(opt.flags), prefix
        return
    values = [getattr(parse([f"--{flag}", *sample]), opt.attr) for flag in opt.flags]
    assert values[0] != default
    assert values == [values[0]] * len(opt.flags)


def test_help_lists_every_spelling_on_one_entry() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    lines = [set(re.findall(r"--[\w.-]+", line)) for line in parser.format_help().splitlines()]
    for opt in OPTIONS:
        spellings = {f"--{flag}" for flag in opt.flags}
        assert any(spellings <= line for line in lines), opt.flags


def test_precedence_flag_over_env_over_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("loss:\n  ema_alpha: 0.3\ncollectors:\n  gpu: false\nintervals:\n  layers_steps: 7\n"
                 "labels:\n  team: nlp\n")
    cfg = parse(["--config.file", str(f)])
    assert (cfg.ema_alpha, cfg.gpu, cfg.layers_interval, cfg.labels) == (0.3, False, 7, {"team": "nlp"})
    env = {"TRAINING_EXPORTER_LOSS_EMA_ALPHA": "0.2", "TRAINING_EXPORTER_COLLECTOR_GPU": "true"}
    cfg = parse(["--config.file", str(f)], env)
    assert (cfg.ema_alpha, cfg.gpu) == (0.2, True)
    cfg = parse(["--config.file", str(f), "--loss.ema-alpha", "0.5", "--no-collector.gpu"], env)
    assert (cfg.ema_alpha, cfg.gpu, cfg.layers_interval) == (0.5, False, 7)


def test_labels_flag_and_env() -> None:
    cfg = parse(["--label", "team=nlp", "--label", "cluster=a"])
    assert cfg.labels == {"team": "nlp", "cluster": "a"}
    assert parse([], {"TRAINING_EXPORTER_LABEL": "team=x,zone=b"}).labels == {"team": "x", "zone": "b"}


def test_yaml_lists_every_unknown_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yml"
    f.write_text("web:\n  listen_adress: ':1'\nloss:\n  ema: 0.1\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(f)
    assert err.value.problems == ["unknown key 'bogus'", "unknown key 'loss.ema'", "unknown key 'web.listen_adress'"]
    assert "\n" not in str(err.value)


def test_validation_lists_every_bad_value() -> None:
    with pytest.raises(ConfigError) as err:
        ExporterConfig.from_kwargs(ema_alpha=0.0, layers_interval=0, ranks="some", listen_address="nope",
                                   labels={"run_id": "x"})
    text = str(err.value)
    for key in ("loss.ema_alpha", "intervals.layers_steps", "ranks", "web.listen_address", "labels"):
        assert key in text
    assert len(err.value.problems) == 5


def test_unknown_kwarg_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'emma_alpha'"):
        ExporterConfig.from_kwargs(emma_alpha=0.1)


def test_bad_env_value_named() -> None:
    with pytest.raises(ConfigError, match="TRAINING_EXPORTER_LOSS_VARIANCE_WINDOW"):
        parse([], {"TRAINING_EXPORTER_LOSS_VARIANCE_WINDOW": "many"})


def test_bad_env_value_that_parses_is_named_by_its_variable() -> None:
    with pytest.raises(ConfigError) as err:
        parse([], {"TRAINING_EXPORTER_LOSS_EMA_ALPHA": "2"})
    assert err.value.problems == ["TRAINING_EXPORTER_LOSS_EMA_ALPHA: must be a number in (0, 1], got 2.0"]


def test_env_value_under_an_explicit_one_is_not_an_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("loss:\n  ema_alpha: 7\n")  # bad, but under the environment and the explicit value
    env = {"TRAINING_EXPORTER_LOSS_EMA_ALPHA": "lots", "TRAINING_EXPORTER_LOSS_VARIANCE_WINDOW": "0",
           "TRAINING_EXPORTER_CONFIG_FILE": str(f)}
    # The command line and keyword arguments agree: only the value that wins is checked.
    assert parse(["--loss.ema-alpha", "0.5", "--loss.variance-window", "9"], env).ema_alpha == 0.5
    cfg = resolve_settings({"ema_alpha": 0.5, "variance_window": 9}, environ=env)
    assert (cfg.ema_alpha, cfg.variance_window) == (0.5, 9)
    with pytest.raises(ConfigError) as err:
        resolve_settings({"variance_window": 9}, environ=env)
    assert err.value.problems == ["TRAINING_EXPORTER_LOSS_EMA_ALPHA: could not convert string to float: 'lots'"]


def test_flag_that_does_not_parse_is_reported_once(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("intervals:\n  layers_steps: 0\n")
    env = {"TRAINING_EXPORTER_LAYERS_INTERVAL_STEPS": "-1"}
    with pytest.raises(ConfigError) as err:
        parse(["--config.file", str(f), "--layers.interval-steps", "ten"], env)
    # Named by the spelling derived from the YAML key, also when the alias was typed.
    assert err.value.problems == ["--intervals.layers-steps: invalid literal for int() with base 10: 'ten'"]


def test_unreadable_config_file_joins_the_other_problems(tmp_path: Path) -> None:
    env = {"TRAINING_EXPORTER_CONFIG_FILE": str(tmp_path / "missing.yml"), "TRAINING_EXPORTER_RANKS": "some"}
    with pytest.raises(ConfigError) as err:
        resolve_settings({"emma_alpha": 0.1}, environ=env)
    problems = err.value.problems
    assert problems[0] == "unknown setting 'emma_alpha'"
    assert problems[1].startswith(f"cannot read config file {str(tmp_path / 'missing.yml')!r}")
    assert problems[2:] == ["TRAINING_EXPORTER_RANKS: must be one of zero, all, got 'some'"]


def test_from_kwargs_and_replace_list_unknown_and_bad_together() -> None:
    with pytest.raises(ConfigError) as err:
        ExporterConfig.from_kwargs(emma_alpha=0.1, layers_interval=0)
    assert err.value.problems == ["unknown setting 'emma_alpha'",
                                  "intervals.layers_steps: must be an integer >= 1, got 0"]
    with pytest.raises(ConfigError) as err:
        ExporterConfig(run_id="r").replace(gpus=False, ranks="some")
    assert err.value.problems == ["unknown setting 'gpus'", "ranks: must be one of zero, all, got 'some'"]
    assert ExporterConfig(run_id="r").replace(gpu=False) == ExporterConfig(run_id="r", gpu=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(":9945", ("0.0.0.0", 9945)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:80", ("::1", 80))],
)
def test_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demo", "--max-steps", "zero"], "--max-steps"),
        (["demo", "--inject", "boom@3"], "--inject"),
        (["demo", "--loss.ema-alpha", "2"], "loss.ema_alpha"),
        (["demo", "--web.listen-address", "localhost"], "web.listen_address"),
        (["demo", "--no-such-flag"], "unrecognized arguments"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv: list[str], needle: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "exporter.cli", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert not (tmp_path / "demo-output").exists()


def test_cli_bad_config_file_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("collectors:\n  gpu: maybe\n  nvme: true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "demo", "--config.file", str(f)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "training-exporter: error: invalid configuration: unknown key 'collectors.nvme'; "
        "collectors.gpu: must be true or false, got 'maybe'"
    ]


def test_values_that_would_overflow_later_are_refused_up_front() -> None:
    # deque(maxlen=10**21) and time.sleep(1e300) raise OverflowError, the first after the model is built and
    # the second at the end of a run; a rate or a peak FLOP/s has no such bound.
    with pytest.raises(ConfigError) as err:
        ExporterConfig.from_kwargs(variance_window=10**21, linger_seconds=1e300, watchdog_floor_seconds=1e300)
    text = str(err.value)
    assert "loss.variance_window: must be at most 2147483647" in text
    assert "web.linger_seconds: must be at most 31536000 seconds (a year)" in text
    assert "watchdog.floor_seconds: must be at most 31536000 seconds (a year)" in text
    assert ExporterConfig.from_kwargs(peak_flops=1.979e15, max_requests_per_second=1e6).peak_flops == 1.979e15
