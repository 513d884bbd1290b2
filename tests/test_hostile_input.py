"""Hostile and odd input on the command line: one line on stderr, exit code 2, before anything is built.

Each case runs the real console entry point in a child process. The child reports which heavy modules it
had imported when it ended: the error must come before torch is imported, which is before any model is
built (importing torch and transformers alone takes seconds, building the demo's model more). So "before
the model" is checked by what was loaded, not by a time that a loaded machine could miss; the time bound
below only keeps a regression from hanging the suite (``/dev/zero`` read to the end, a FIFO opened for a
writer that never comes).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from exporter.argtypes import usable_cpus
from exporter.files import MAX_CONFIG_BYTES

REPO = Path(__file__).resolve().parents[1]

# Runs `training-exporter ARGS...` and prints the heavy modules it had imported on stdout.
_CHILD = """
import sys
from exporter.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("loaded:" + ",".join(m for m in ("torch", "transformers") if m in sys.modules))
sys.exit(code)
"""
# Far above the 0.2-0.3 s these take here; far below what the regressions take (minutes, or forever).
LIMIT_S = 30


def run_cli(argv: list[str], cwd: Path, env: Mapping[str, str] | None = None) -> tuple[int, list[str], str]:
    """(exit code, stderr lines, heavy modules loaded) of one command line."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_EXPORTER_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, cwd=cwd,
                          env={**full_env, "PYTHONPATH": str(REPO)}, timeout=LIMIT_S, check=False)
    loaded = proc.stdout.strip().rpartition("loaded:")[2]
    return proc.returncode, proc.stderr.strip().splitlines(), loaded


def assert_one_line(argv: list[str], cwd: Path, pattern: str, env: Mapping[str, str] | None = None) -> str:
    code, lines, loaded = run_cli(argv, cwd, env)
    assert code == 2, lines
    assert len(lines) == 1, lines  # no traceback
    assert re.search(pattern, lines[0]), lines[0]
    assert lines[0].startswith("training-exporter")
    assert loaded == "", f"the error came after importing {loaded}"
    assert not (cwd / "demo-output").exists()  # nothing written either
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port with a listener on 127.0.0.1, as another exporter would hold it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------- config files


def _config_files(tmp: Path) -> dict[str, str]:
    (tmp / "latin1.yml").write_bytes("run_id: caf\xe9\n".encode("latin-1"))
    (tmp / "bad.yml").write_text("loss: [1, 2\n")
    os.mkfifo(tmp / "fifo.yml")
    (tmp / "adir").mkdir()
    with open(tmp / "big.yml", "wb") as f:  # 52 MB, sparse: refused by its size, before a byte is read
        f.truncate(52_000_000)
    (tmp / "recursive.yml").write_text("web: &a\n  x: *a\n")
    # Nine levels of ten aliases: 10^9 values from 700 bytes.
    levels = ["a0: &a0 [" + ", ".join(["1"] * 10) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    (tmp / "bomb.yml").write_text("\n".join(levels) + "\n")
    return {name: str(tmp / name) for name in ("latin1.yml", "bad.yml", "fifo.yml", "adir", "big.yml",
                                               "recursive.yml", "bomb.yml")}


CONFIG_CASES = [
    ("latin1.yml", r"config file '.*latin1.yml' is not UTF-8 text \(byte 11, line 1\)"),
    ("bad.yml", r"config file '.*bad.yml' is not valid YAML at line 2"),
    ("fifo.yml", r"cannot read config file '.*fifo.yml': not a regular file"),
    ("adir", r"cannot read config file '.*adir': a directory"),
    ("big.yml", rf"config file '.*big.yml' is 52000000 bytes, more than the {MAX_CONFIG_BYTES} accepted"),
    ("recursive.yml", r"config file '.*recursive.yml' nests more than 64 levels deep"),
    ("bomb.yml", rf"config file '.*bomb.yml' expands to more than {MAX_CONFIG_BYTES} values"),
]


@pytest.mark.parametrize(("name", "pattern"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_file_is_one_line(tmp_path: Path, name: str, pattern: str) -> None:
    path = _config_files(tmp_path)[name]
    started = time.monotonic()
    line = assert_one_line(["demo", "--config.file", path], tmp_path, pattern)
    assert line.startswith("training-exporter: error: invalid configuration: ")
    assert time.monotonic() - started < LIMIT_S


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_config_file_is_refused_unread(tmp_path: Path, device: str) -> None:
    # Read to the end, /dev/zero grew the process to 23 GB; from the environment as from the flag.
    pattern = rf"cannot read config file '{device}': not a regular file"
    assert_one_line(["demo", "--config.file", device], tmp_path, pattern)
    assert_one_line(["demo"], tmp_path, pattern, env={"TRAINING_EXPORTER_CONFIG_FILE": device})


# --------------------------------------------------------------------------- integer and duration flags


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        # torch.set_num_threads(100000) is accepted, and the first matrix product segfaulted.
        (["analytics", "--threads", "100000"], r"--threads: must be <= \d+ \(the CPUs this process may use\)"),
        (["analytics", "--threads", str(usable_cpus() + 1)], r"--threads: must be <= "),
        (["analytics", "--history", "1000000000"], r"--history: must be <= 10000"),
        # A timeout or interval beyond the platform's time_t: an OverflowError traceback when it was reached.
        (["analytics", "--interval", "1e300"], r"--interval: must be at most 31536000 seconds"),
        (["advise", "--timeout", "1e300", "--prometheus", "http://127.0.0.1:1"], r"--timeout: must be at most"),
        (["advise", "--watch", "1e300", "--prometheus", "http://127.0.0.1:1"], r"--watch: must be at most"),
        # numpy's legacy seed range, which the Trainer seeds: a traceback outside it.
        (["demo", "--seed", "-1"], r"--seed: must be >= 0, got -1"),
        (["demo", "--seed", str(2**32)], r"--seed: must be <= 4294967295"),
        # Built in memory up front: 10^9 examples are about 800 GB.
        (["demo", "--train-examples", "1000000000"], r"--train-examples: must be <= 1000000"),
        (["demo", "--train-examples", "9" * 100], r"--train-examples: must be <= 1000000 .*a 100-digit number"),
    ],
    ids=["threads-100000", "threads-cpus+1", "history", "interval", "advise-timeout", "advise-watch",
         "seed-negative", "seed-2**32", "train-examples", "train-examples-100-digits"],
)
def test_a_huge_number_is_one_line(tmp_path: Path, argv: list[str], pattern: str) -> None:
    if argv[0] == "analytics":
        argv = [*argv, "--base", str(tmp_path), "--checkpoint-dir", str(tmp_path)]
    assert_one_line(argv, tmp_path, pattern)


def test_threads_up_to_the_cpus_are_accepted() -> None:
    from exporter.cli import build_parser

    args = build_parser().parse_args(["analytics", "--threads", str(usable_cpus())])
    assert args.threads == usable_cpus()


# --------------------------------------------------------------------------- paths that a file is in the way of


def test_output_and_history_dirs_that_are_files(tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    # A traceback from the Trainer after the model was built, before.
    assert_one_line(["demo", "--output-dir", str(file)], tmp_path, r"--output-dir: '.*a-file' is not a directory")
    assert_one_line(["demo", "--output-dir", str(file / "run")], tmp_path,
                    r"--output-dir: '.*a-file/run' has '.*a-file' in its path, which is not a directory")
    # Found at the first evaluation, before: the whole preview history lost, exit code 0.
    out = str(tmp_path / "out")
    assert_one_line(["demo", "--output-dir", out, "--history.dir", str(file)], tmp_path,
                    r"history\.dir: '.*a-file' is not a directory")
    assert_one_line(["demo", "--output-dir", out], tmp_path, r"history\.dir: '.*a-file' is not a directory",
                    env={"TRAINING_EXPORTER_HISTORY_DIR": str(file)})
    # The default history dir, under the output dir.
    (tmp_path / "out2" / "logs").mkdir(parents=True)
    (tmp_path / "out2" / "logs" / "preview").write_text("")
    assert_one_line(["demo", "--output-dir", str(tmp_path / "out2")], tmp_path,
                    r"history\.dir: '.*out2/logs/preview' is not a directory")
    analytics = ["analytics", "--base", str(tmp_path), "--checkpoint-dir", str(tmp_path)]
    assert_one_line([*analytics, "--status-dir", str(file)], tmp_path, r"--status-dir: '.*a-file' is not a directory")


def test_a_history_dir_that_is_a_file_stops_the_callback_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter import PrometheusCallback
    from exporter.config import ConfigError

    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(ConfigError, match=r"history\.dir: '.*a-file' is not a directory"):
        PrometheusCallback(history_dir=str(file))
    monkeypatch.setenv("TRAINING_EXPORTER_HISTORY_DIR", str(file / "deeper"))
    with pytest.raises(ConfigError, match=r"history\.dir: .* has '.*a-file' in its path"):
        PrometheusCallback()
    PrometheusCallback(previews=False)  # nothing written there then: no error
    monkeypatch.setenv("TRAINING_EXPORTER_HISTORY_DIR", str(tmp_path / "new" / "dir"))
    PrometheusCallback()  # to be created: fine
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- listen addresses


def test_a_taken_port_is_one_line_before_anything_is_loaded(tmp_path: Path, taken_port: int) -> None:
    address = f"127.0.0.1:{taken_port}"
    # Before: after importing torch and transformers and building the model (8.5 s here).
    assert_one_line(["demo", "--web.listen-address", address], tmp_path,
                    rf"^training-exporter: error: cannot listen on 127\.0\.0\.1:{taken_port}: Address already in use$")
    # The base named here has no weights: reading it first would report that instead of the port.
    (tmp_path / "ckpt").mkdir()
    assert_one_line(["analytics", "--base", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--web.listen-address", address], tmp_path,
                    rf"analytics: cannot listen on 127\.0\.0\.1:{taken_port}: Address already in use$")
    assert_one_line(["demo"], tmp_path, "cannot listen on", env={"TRAINING_EXPORTER_WEB_LISTEN_ADDRESS": address})


def test_an_address_that_is_not_local_is_one_line(tmp_path: Path) -> None:
    # TEST-NET-1 (RFC 5737): never an address of this machine.
    assert_one_line(["demo", "--web.listen-address", "192.0.2.1:9945"], tmp_path,
                    r"cannot listen on 192\.0\.2\.1:9945: Cannot assign requested address")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_demo_serves_on_the_address_it_held_from_before_the_model_was_built(tmp_path: Path) -> None:
    """The address checked at once is then bound by the exporter itself, which serves from before the model
    is built to the end of the run."""
    port = _free_port()
    argv = [sys.executable, "-m", "exporter.cli", "demo", "--output-dir", str(tmp_path / "out"),
            "--web.listen-address", f"127.0.0.1:{port}", "--max-steps", "60", "--train-examples", "64",
            "--eval-steps", "1000", "--save-steps", "1000", "--web.final-scrape-timeout", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINING_EXPORTER_")}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scraped = ""
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and "training_state{" not in scraped:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    scraped = resp.read().decode()
            except OSError:
                time.sleep(0.05)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert 'training_state{' in scraped and 'run_id="out"' in scraped
    # Announced before the Trainer printed its first progress: the endpoint was up before training began.
    assert err.index(f"serving metrics on http://127.0.0.1:{port}/metrics") < err.index("it/s]")
