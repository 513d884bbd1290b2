"""End to end: real demo runs shaped to show each verdict, a real ``prometheus``, the advisor CLI.

Four demo trainings (``training-exporter demo``) run side by side, each on its
own port, scraped every second by one Prometheus with the project's rules:

- ``adv-nan``: a NaN loss injected at step NAN_STEP -> roll back to a
  checkpoint saved before it, with TrainingLossNonFinite and its recommendation
  among the alerts;
- ``adv-overfit``: 64 training examples, memorised within a hundred steps, while
  the eval loss on fresh examples rises -> use the checkpoint of the best
  evaluation (the Trainer's own record of its evaluations is the truth);
- ``adv-plateau``: a learning rate of 1e-7 on 16 examples, the loss stays flat -> stop;
- ``adv-improving``: the default task asked mid-run while its loss falls ->
  continue, with an ETA; then ``--watch`` redraws it in place on a terminal
  until Ctrl-C, and the run is stopped.

The runs are ``exporter.cli.main(["demo", ...])``, each in its own process,
forked from one launcher that has imported torch, transformers and peft once:
four interpreters importing them would cost ~15 s of CPU more on a 2-core
machine.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.runif import run_if

from exporter.advisor import advise
from exporter.advisor.analysis import Report
from exporter.advisor.cli import CLEAR
from exporter.advisor.client import AdvisorError, Prometheus
from exporter.demo.localstack import (
    ROOT,
    RULES_DIR,
    Process,
    free_port,
    project_rule_files,
    start_prometheus,
    stop_all,
    wait_until,
    write_prometheus_config,
)

pytestmark = run_if(prometheus=True)

NAN_STEP = 150
# Past the format-learning start, before the slow stretch around steps 350-450.
IMPROVING_FROM_STEP = 200
# Generous for a loaded 2-core machine; the runs take ~10-30 s.
DEADLINE_S = 150

# Forks one `training-exporter demo` per run (argv[1]: JSON list of {run_id, argv, log}); prints
# {run_id: pid} once all are started, then {"run_id", "exit"} as each ends. SIGTERM is passed on.
LAUNCHER = r"""
import json, os, signal, sys, traceback
import exporter.demo.run  # the heavy imports, done once and shared by the forked runs
from exporter.cli import main

children = {}
for run in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = main(run["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children[pid] = run["run_id"]
print(json.dumps({name: pid for pid, name in children.items()}), flush=True)


def stop(signum, frame):
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


signal.signal(signal.SIGTERM, stop)
while children:
    pid, status = os.wait()
    print(json.dumps({"run_id": children.pop(pid), "exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Demo:
    run_id: str
    max_steps: int
    flags: list[str]
    save_steps: int
    output_dir: Path = Path()
    log: Path = Path()
    pid: int = 0

    def checkpoints_on_disk(self) -> set[int]:
        return {int(p.name.split("-")[1]) for p in self.output_dir.glob("checkpoint-*")}

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _demos() -> dict[str, Demo]:
    runs = [
        Demo("adv-nan", 200, ["--inject", f"nan@{NAN_STEP}"], save_steps=50),
        Demo("adv-overfit", 300, ["--train-examples", "64", "--eval-steps", "100"], save_steps=100),
        # One batch worth of data: every step sees the same loss, the flat line is exact (no batch noise).
        # 400 steps: the short-run window (the last half of the run) must hold the plateau's 100 steps with
        # room to spare, however the steps spread over the run's time on a loaded machine.
        Demo("adv-plateau", 400, ["--train-examples", "16", "--learning-rate", "1e-7"], save_steps=100),
        Demo("adv-improving", 2000, ["--eval-steps", "100"], save_steps=100),
    ]
    return {d.run_id: d for d in runs}


@dataclass
class Stack:
    url: str
    demos: dict[str, Demo]
    procs: list[Process] = field(default_factory=list)
    launcher: Process | None = None

    def _messages(self) -> list[dict[str, Any]]:
        assert self.launcher is not None
        try:
            lines = self.launcher.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def exit_code(self, run_id: str) -> int | None:
        return next((msg["exit"] for msg in self._messages() if msg.get("run_id") == run_id), None)

    def stop_run(self, run_id: str) -> None:
        """SIGTERM to a run still going (by its PID, from the launcher)."""
        if self.exit_code(run_id) is None:
            try:
                os.kill(self.demos[run_id].pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("advisor-e2e")
    demos = _demos()
    ports = {run_id: free_port() for run_id in demos}
    config = write_prometheus_config(work, targets=[f"127.0.0.1:{p}" for p in ports.values()],
                                     alertmanager=f"127.0.0.1:{free_port()}", rule_files=project_rule_files())
    stack = Stack("", demos)
    try:
        port = free_port()
        stack.procs.append(start_prometheus(config, work, port))
        stack.url = f"http://127.0.0.1:{port}"
        runs = []
        for demo in demos.values():
            demo.output_dir = work / demo.run_id
            demo.log = work / f"demo-{demo.run_id}.log"
            argv = ["demo", "--max-steps", str(demo.max_steps), "--save-steps", str(demo.save_steps),
                    "--web.listen-address", f"127.0.0.1:{ports[demo.run_id]}", "--output-dir",
                    str(demo.output_dir), "--run-id", demo.run_id,
                    # The final values (state completed, last step) stay up for two scrapes.
                    "--linger", "2",
                    # Nothing here reads them; they would only take CPU from the four runs.
                    "--no-collector.gpu", "--no-collector.eval", "--no-collector.previews", "--no-collector.drift",
                    *demo.flags]
            runs.append({"run_id": demo.run_id, "argv": argv, "log": str(demo.log)})
        stack.launcher = Process("launcher", [sys.executable, "-c", LAUNCHER, json.dumps(runs)], work, cwd=ROOT)
        stack.procs.append(stack.launcher)
        launcher = stack.launcher

        def started() -> dict[str, int] | None:
            if not launcher.running():
                raise RuntimeError(f"the launcher exited:\n{launcher.log_tail()}")
            return next((msg for msg in stack._messages() if "run_id" not in msg), None)

        forked = wait_until(started, timeout=60, what="the demo runs forked")
        assert forked is not None
        for run_id, pid in forked.items():
            demos[run_id].pid = pid
        yield stack
    finally:
        for run_id in demos:
            if stack.launcher is not None and demos[run_id].pid:
                stack.stop_run(run_id)
        stop_all(reversed(stack.procs))


def advise_json(stack: Stack, run_id: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "exporter.cli", "advise", "--prometheus", stack.url,
                          "--run-id", run_id, "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def finished(stack: Stack, run_id: str) -> dict[str, Any]:
    """The advisor's JSON on a run once it has completed and Prometheus has its last step."""
    demo = stack.demos[run_id]

    def ended() -> tuple[int] | None:
        code = stack.exit_code(run_id)
        return None if code is None else (code,)

    try:
        (code,) = wait_until(ended, timeout=DEADLINE_S, interval=0.2, what=f"{run_id} done") or (None,)
    except TimeoutError:
        pytest.fail(f"{run_id} still training after {DEADLINE_S} s:\n{demo.log_tail()}")
    assert code == 0, demo.log_tail()
    deadline = time.monotonic() + 15
    while True:
        doc = advise_json(stack, run_id)
        if doc["status"] == "ok" and doc["progress"]["step"] == demo.max_steps:
            return doc
        assert time.monotonic() < deadline, f"Prometheus never saw {run_id} finish: {doc}"
        time.sleep(0.5)


def _rule_annotation(alert: str, key: str) -> str:
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text()).get("groups", []):
            for rule in group.get("rules", []):
                if rule.get("alert") == alert:
                    return str(rule["annotations"][key])
    raise AssertionError(f"no alert {alert}")


def _trainer_evaluations(output_dir: Path) -> list[tuple[int, float]]:
    """(step, eval loss) of every evaluation, from the Trainer's own state in its last checkpoint."""
    last = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return [(int(h["step"]), float(h["eval_loss"])) for h in history if "eval_loss" in h]


def test_nan_run_rolls_back_to_a_checkpoint_before_the_nan(stack: Stack) -> None:
    demo = stack.demos["adv-nan"]
    doc = finished(stack, "adv-nan")
    loss, rec = doc["loss"], doc["recommendation"]
    assert loss["nonfinite_steps"] == 1
    assert loss["nonfinite_after_step"] < NAN_STEP <= loss["nonfinite_by_step"]
    assert (rec["verdict"], rec["action"]) == ("nonfinite", "use_checkpoint")
    ckpt = rec["checkpoint_step"]
    # Saved before the NaN step's update, and really there.
    assert ckpt < NAN_STEP and ckpt <= loss["nonfinite_after_step"]
    assert rec["checkpoint"] == f"checkpoint-{ckpt}" and (demo.output_dir / rec["checkpoint"]).is_dir()
    assert set(doc["checkpoints"]) <= demo.checkpoints_on_disk()
    # The rule fired in Prometheus; the advisor passes its recommendation on.
    alerts = {a["name"]: a for a in doc["alerts"]}
    assert "TrainingLossNonFinite" in alerts, doc["alerts"]
    nan_alert = alerts["TrainingLossNonFinite"]
    assert (nan_alert["state"], nan_alert["severity"]) == ("firing", "critical")
    assert nan_alert["recommendation"] == _rule_annotation("TrainingLossNonFinite", "recommendation")


def test_overfitting_run_uses_the_checkpoint_of_the_best_evaluation(stack: Stack) -> None:
    demo = stack.demos["adv-overfit"]
    doc = finished(stack, "adv-overfit")
    truth = _trainer_evaluations(demo.output_dir)
    best_step, best_loss = min(truth, key=lambda e: e[1])
    assert best_step < truth[-1][0], f"the demo did not overfit: {truth}"
    ev, rec = doc["evaluation"], doc["recommendation"]
    # Every evaluation, at its exact step, with the Trainer's own eval loss.
    assert [p["step"] for p in ev["points"]] == [step for step, _ in truth]
    assert [p["loss"] for p in ev["points"]] == pytest.approx([loss for _, loss in truth], rel=1e-9)
    assert ev["best"]["step"] == best_step and ev["best"]["loss"] == pytest.approx(best_loss, rel=1e-9)
    assert ev["overfitting"] and ev["change_from_best"] > 0.05 and ev["train_change_since_best"] < -0.01
    assert (rec["verdict"], rec["action"], rec["checkpoint"]) == (
        "overfitting", "use_checkpoint", f"checkpoint-{best_step}")
    assert ev["best_checkpoint"] == rec["checkpoint"] and (demo.output_dir / rec["checkpoint"]).is_dir()
    assert set(doc["checkpoints"]) <= demo.checkpoints_on_disk()


def test_plateau_run_stops(stack: Stack) -> None:
    demo = stack.demos["adv-plateau"]
    doc = finished(stack, "adv-plateau")
    loss, rec = doc["loss"], doc["recommendation"]
    assert loss["plateau"] and loss["trend"] == "flat" and abs(loss["relative_change"]) < 0.01, loss
    assert loss["window_steps"] >= 100
    assert (rec["verdict"], rec["action"]) == ("plateau", "stop")
    assert rec["checkpoint"] is not None and (demo.output_dir / rec["checkpoint"]).is_dir()
    assert doc["progress"]["state"] == "completed" and doc["progress"]["eta_seconds"] == 0


def _improving_report(stack: Stack) -> Report:
    prom = Prometheus(stack.url)
    deadline = time.monotonic() + DEADLINE_S
    demo = stack.demos["adv-improving"]
    while time.monotonic() < deadline:
        assert stack.exit_code("adv-improving") is None, demo.log_tail()
        try:
            result = advise(prom, run_id="adv-improving")
        except AdvisorError:  # not scraped yet
            result = None
        if isinstance(result, Report) and result.progress.step >= IMPROVING_FROM_STEP:
            return result
        time.sleep(0.5)
    pytest.fail(f"adv-improving did not reach step {IMPROVING_FROM_STEP} in {DEADLINE_S} s")


def test_improving_run_continues_with_progress_and_eta(stack: Stack) -> None:
    demo = stack.demos["adv-improving"]
    r = _improving_report(stack)
    p = r.progress
    assert p.state == "training" and p.max_steps == demo.max_steps
    assert p.ratio == pytest.approx(p.step / demo.max_steps)
    assert p.steps_per_second and p.steps_per_second > 0
    assert p.eta_seconds == pytest.approx((demo.max_steps - p.step) / p.steps_per_second)
    assert r.loss.trend == "falling" and not r.loss.plateau, r.loss
    assert not r.evaluation.overfitting and len(r.evaluation.points) >= 2
    assert (r.recommendation.verdict, r.recommendation.action) == ("improving", "continue"), r.recommendation
    assert r.evaluation.best_checkpoint is not None
    assert (demo.output_dir / f"checkpoint-{r.evaluation.best_checkpoint}").is_dir()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _read_for(fd: int, seconds: float) -> bytes:
    out = b""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


def test_watch_redraws_in_place_and_stops_on_ctrl_c(stack: Stack) -> None:
    _improving_report(stack)  # the run is up and past its first steps
    argv = [sys.executable, "-X", "faulthandler", "-m", "exporter.cli", "advise", "--prometheus", stack.url,
            "--run-id", "adv-improving", "--watch", "0.5"]
    # On a terminal: each refresh clears the screen and redraws.
    main, child = pty.openpty()
    # SIGINT at its default disposition, as from a terminal: a SIG_IGN inherited from the test process (set by
    # an earlier test of the suite) makes the child ignore Ctrl-C: its stacks showed it asleep in the watch loop.
    proc = subprocess.Popen(argv, stdout=child, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
                            preexec_fn=_default_sigint)
    os.close(child)
    # Drained all along: a child blocked on a full stderr pipe would never exit, and what it says matters.
    stderr: list[bytes] = []
    assert proc.stderr is not None
    drain = threading.Thread(target=lambda: stderr.append(proc.stderr.read() if proc.stderr else b""), daemon=True)
    drain.start()
    try:
        # Ctrl-C after 3 s and three screens drawn (the start, torch import included, is slow on a loaded
        # machine: a Ctrl-C before the watch loop runs tests nothing).
        shown = _read_for(main, 3.0)
        deadline = time.monotonic() + 30.0
        while shown.count(CLEAR.encode()) < 3 and time.monotonic() < deadline and proc.poll() is None:
            shown += _read_for(main, 0.5)
        proc.send_signal(signal.SIGINT)
        # Keep reading while it exits: a full terminal buffer would block its last write. The bound is generous:
        # the whole suite loads this 2-core machine, and the exit (torch's teardown) is slow then.
        deadline = time.monotonic() + 30.0
        while proc.poll() is None and time.monotonic() < deadline:
            shown += _read_for(main, 0.2)
        if proc.poll() is None:  # hung: faulthandler (-X faulthandler) prints every thread's stack on SIGABRT
            proc.send_signal(signal.SIGABRT)
            drain.join(10)
            raise AssertionError(f"still running 30 s after Ctrl-C; its stacks:\n{b''.join(stderr).decode()}")
        assert proc.wait(1) == 0
        shown += _read_for(main, 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    text = shown.decode(errors="replace")
    drain.join(10)
    assert stderr == [b""]
    frames = text.split(CLEAR)[1:]
    assert len(frames) >= 2, text
    steps = [int(m[1]) for m in (re.search(r"step (\d+)/2000", f) for f in frames) if m]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] > steps[0], steps
    assert all("\nrecommendation: " in f for f in frames[:-1]), frames

    # Piped with --json: one document per refresh, one per line.
    piped = subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True,
                             preexec_fn=_default_sigint)
    time.sleep(2.0)
    piped.send_signal(signal.SIGINT)
    out, err = piped.communicate(timeout=10)
    assert piped.returncode == 0 and err == ""
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) >= 2 and all(d["status"] == "ok" and d["run_id"] == "adv-improving" for d in docs)
    # Done with the long run: give the CPU back.
    stack.stop_run("adv-improving")
