"""Running the fixed evaluation: generate answers for a fixed eval set, score them, export and record them.

Split between two threads so that training waits for no more than the model's
own work:

* in the training thread, at a step boundary (:meth:`FixedEvaluator.run`):
  greedy generation, batched, bounded by ``max_new_tokens``, and one
  teacher-forced pass over prompt + golden answer for the cross-entropy,
  calibration, confidence and entropy of the golden tokens. The model is put
  in eval mode under ``torch.no_grad()``; every module's train/eval mode and
  the torch RNG states (CPU and CUDA) are restored afterwards, so the training
  run goes on exactly as it would have without the evaluation;
* in a worker thread, fed through a bounded queue: decoding, matching,
  failure-mode classification, the aggregates behind the metrics and the
  preview history lines (disk I/O).

Failures are counted under ``collector="eval"`` (history writes under
``collector="previews"``) and never reach the training loop.

Which examples an evaluation asks, within ``budget``:

1. the fixed examples (source ``fixed_eval``, and ``failures`` when the
   eval set itself marks known hard cases), the same ones every time so that
   successive evaluations compare;
2. the failure pool: ``train`` examples answered wrong in an earlier
   evaluation, asked again (source ``failures``) until answered right, at
   most ``failure_pool`` of them, oldest dropped first;
3. ``train`` examples in rotation, as many as fit.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from exporter.errors import ErrorTracker
from exporter.evaluation.examples import Contract, EvalExample, TokenizerCodec, load_eval_set
from exporter.evaluation.export import EvalExport, EvalSnapshot
from exporter.evaluation.generation import device_of, generate_answers, max_positions, teacher_forced_stats
from exporter.evaluation.scoring import (
    AnswerTokenStats,
    classify,
    exact_match,
    expected_calibration_error,
    length_bucket,
    normalized_match,
)
from exporter.previews import PreviewHistory, format_ts

# Evaluations waiting for the worker; a third one while two wait is dropped
# (and counted) rather than letting the training thread wait on scoring.
QUEUE_SIZE = 2


@dataclass(frozen=True)
class _Asked:
    index: int  # position in the eval set
    source: str  # as asked: a train example from the failure pool is asked as "failures"


@dataclass
class _Job:
    step: int
    ts: float
    asked: list[_Asked]
    generated: list[list[int]]  # new tokens, end marker and what follows cut off
    stopped: list[bool]  # the end marker was generated
    gen_ms: list[float]
    stats: AnswerTokenStats  # over the golden tokens (and end marker), example index = position in `asked`
    duration: float


class FixedEvaluator:
    """Runs the fixed evaluation on a model at a step boundary and scores it on a worker thread.

    :meth:`run` (training thread) generates the answers and does the
    teacher-forced pass; the worker scores them, publishes the aggregates to
    ``export`` and appends one preview history line per answer. A failure in
    either is counted under ``collector="eval"`` (history writes under
    ``collector="previews"``) and never reaches the training loop. Which
    examples are asked is described in this module's docstring.

    Args:
        examples: the eval set, checked by :func:`~exporter.evaluation.examples.load_eval_set`:
            :class:`~exporter.evaluation.examples.EvalExample` objects or mappings with the same keys.
        tokenizer: a transformers tokenizer, or any object with ``encode(text) -> ids``,
            ``decode(ids) -> str`` and an integer ``eos_token_id``.
        export: where the metrics of each evaluation go, read at scrape time.
        errors: counts (and logs once) the failures of the evaluation and of the history writes.
        budget: examples asked per evaluation: the fixed ones first, then the failure pool,
            then training examples in rotation. Defaults to ``64``.
        max_new_tokens: bound on generated tokens per answer; ``0`` is twice the longest
            golden answer asked. Defaults to ``0``.
        batch_size: prompts generated (and teacher-forced) together. Defaults to ``32``.
        failure_pool: at most this many ``train`` examples answered wrong are asked again
            until answered right, oldest dropped first; ``0`` disables. Defaults to ``32``.
        contract: checks of an answer's form for the examples without a contract of their
            own; an answer failing one is ``wrong_format``. Defaults to ``None`` (no checks).
        history_dir: directory of the preview history; ``None`` writes none. Defaults to ``None``.
        compress_after_days: history day files older than this many days are gzipped.
            Defaults to ``7``.
        delete_after_days: history day files older than this many days are deleted.
            Defaults to ``30``.

    Raises:
        ValueError:
            If the eval set is empty or malformed (every problem in one error), if
            ``tokenizer`` is ``None``, or if it has no integer ``eos_token_id`` (the end of
            an answer could not be recognised). Raised by the constructor, before training
            starts; :meth:`run` never raises.

    Example::

        from exporter.errors import ErrorTracker
        from exporter.evaluation import EvalExport, FixedEvaluator, regex_contract

        export = EvalExport({"run_id": "demo"})
        registry.register(export)  # a prometheus_client registry: the training_eval_* metrics
        evaluator = FixedEvaluator(
            [{"prompt": "12+30=", "golden": "42"}, {"prompt": "19+23=", "golden": "42", "source": "train"}],
            tokenizer, export, ErrorTracker(None, {}), budget=16,
            contract=regex_contract(r"[0-9]+", "digits_only"),
        )
        for step in range(1, 1001):
            ...  # one optimizer step
            if evaluator.due(step, interval=250):
                evaluator.run(model, step)
        evaluator.close()  # scores what is pending, then stops the worker
    """

    def __init__(
        self,
        examples: Iterable[EvalExample | Mapping[str, Any]],
        tokenizer: Any,
        export: EvalExport,
        errors: ErrorTracker,
        *,
        budget: int = 64,
        max_new_tokens: int = 0,
        batch_size: int = 32,
        failure_pool: int = 32,
        contract: Contract | None = None,
        history_dir: str | None = None,
        compress_after_days: int = 7,
        delete_after_days: int = 30,
    ) -> None:
        self.examples = load_eval_set(examples)
        self.codec = TokenizerCodec(tokenizer)
        self.export = export
        self.errors = errors
        self.budget = budget
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.failure_pool = failure_pool
        self.contract = contract
        self.history_dir = history_dir
        self.compress_after_days = compress_after_days
        self.delete_after_days = delete_after_days
        self.last_step: int | None = None
        self.evaluations = 0
        self._fixed = [i for i, ex in enumerate(self.examples) if ex.source != "train"]
        self._train = [i for i, ex in enumerate(self.examples) if ex.source == "train"]
        self._cursor = 0
        self._pool: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._pool_lock = threading.Lock()
        self._encoded: list[tuple[list[int], list[int]]] | None = None
        self._history: PreviewHistory | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._worker: threading.Thread | None = None
        self._idle = threading.Condition()
        self._busy = 0
        combos = {(ex.regime, ex.source, ex.domain) for ex in self.examples}
        combos |= {(ex.regime, "failures", ex.domain) for ex in self.examples if ex.source == "train"}
        export.declare(sorted(combos))

    # ------------------------------------------------------------ training thread

    def due(self, step: int, interval: int) -> bool:
        return interval > 0 and step > 0 and step % interval == 0 and step != self.last_step

    def run(self, model: torch.nn.Module, step: int) -> bool:
        """Evaluate ``model`` now (once per step); True when an evaluation was handed to the worker."""
        if step == self.last_step:
            return False
        self.last_step = step
        try:
            job = self._evaluate(model, step)
        except Exception as exc:
            self.errors.record("eval", exc)
            return False
        self._start_worker()
        with self._idle:
            self._busy += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()
            self.errors.record("eval", RuntimeError("scoring is behind by two evaluations; this one was dropped"),
                               traceback=False)
            return False
        self.evaluations += 1
        return True

    def select(self) -> list[_Asked]:
        """The examples of the next evaluation, within the budget (fixed, failure pool, train rotation)."""
        asked = [_Asked(i, self.examples[i].source) for i in self._fixed[: self.budget]]
        room = self.budget - len(asked)
        with self._pool_lock:
            retry = list(self._pool)[:room]
        asked += [_Asked(i, "failures") for i in retry]
        room -= len(retry)
        if room > 0 and self._train:
            # Round the train examples from where the last evaluation stopped, skipping those just retried.
            taken = set(retry)
            count = len(self._train)
            scanned = 0
            picked: list[int] = []
            while scanned < count and len(picked) < room:
                i = self._train[(self._cursor + scanned) % count]
                scanned += 1
                if i not in taken:
                    picked.append(i)
            self._cursor = (self._cursor + scanned) % count
            asked += [_Asked(i, "train") for i in picked]
        return asked

    def _evaluate(self, model: torch.nn.Module, step: int) -> _Job:
        if self._encoded is None:
            # Once per run; a tokenizer that raises leaves it None and is retried (and counted) next time.
            self._encoded = [(self.codec.prompt(ex.prompt), self.codec.answer(ex.golden)) for ex in self.examples]
        encoded = self._encoded
        asked = self.select()
        if not asked:
            raise RuntimeError("no example to ask (budget 0 or an empty eval set)")
        max_new = self.max_new_tokens or 2 * max(len(encoded[a.index][1]) + 1 for a in asked)
        device = device_of(model)
        eos, pad = self.codec.eos_token_id, self.codec.pad_token_id
        limit = max_positions(model)
        if limit is not None:
            # A position past the model's table is an index error, on a GPU a device-side assert that
            # ends the run: prompts keep their last tokens and generation stops at the context's end.
            encoded = [(p[-max(limit - len(a) - 1, 1):], a) for p, a in encoded]
        modes = [(mod, mod.training) for mod in model.modules()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        ts = time.time()
        start = time.perf_counter()
        generated: list[list[int]] = []
        stopped: list[bool] = []
        gen_ms: list[float] = []
        stats: list[AnswerTokenStats] = []
        try:
            model.eval()
            with torch.no_grad():
                for lo in range(0, len(asked), self.batch_size):
                    chunk = asked[lo: lo + self.batch_size]
                    t0 = time.perf_counter()
                    prompts = [encoded[a.index][0] for a in chunk]
                    room = max_new if limit is None else max(min(max_new, limit - max(map(len, prompts))), 1)
                    new, done = generate_answers(model, prompts, room, device, eos=eos, pad=pad)
                    per_example = (time.perf_counter() - t0) * 1000.0 / len(chunk)
                    generated += new
                    stopped += done
                    gen_ms += [per_example] * len(chunk)
                    part = teacher_forced_stats(model, [encoded[a.index] for a in chunk], device, limit,
                                                eos=eos, pad=pad)
                    stats.append(AnswerTokenStats(part.example + lo, part.nll, part.confidence, part.correct,
                                                  part.top5, part.entropy))
        finally:
            # train() first for modules that override it, then each module's own mode exactly as it was.
            model.train(modes[0][1])
            for mod, training in modes:
                mod.training = training
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        merged = AnswerTokenStats(*(torch.cat([getattr(s, f) for s in stats]) for f in (
            "example", "nll", "confidence", "correct", "top5", "entropy")))
        return _Job(step, ts, asked, generated, stopped, gen_ms, merged, time.perf_counter() - start)


    # ---------------------------------------------------------------- worker

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="training-exporter-eval", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self.score(job)
            except Exception as exc:
                self.errors.record("eval", exc)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until every evaluation handed over has been scored and written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Finish pending scoring (at the end of training) and stop the worker."""
        self.wait(timeout)
        worker = self._worker
        if worker is not None and worker.is_alive():
            try:
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                return
            worker.join(timeout=1.0)

    def score(self, job: _Job) -> list[dict[str, Any]]:
        """Turn a generated job into metrics and history records (worker thread); returns the records."""
        n = len(job.asked)
        token_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, job.stats.example, job.stats.nll.double())
        token_counts = torch.zeros(n, dtype=torch.float64).index_add_(
            0, job.stats.example, torch.ones_like(job.stats.nll, dtype=torch.float64))
        sums, counts = token_sums.tolist(), token_counts.tolist()
        groups: dict[tuple[str, str], list[float]] = {}
        patterns: dict[tuple[str, str], list[int]] = {}
        outcomes: list[tuple[str, str, str, str]] = []
        matches: list[bool] = []
        records: list[dict[str, Any]] = []
        fixed_ce = [0.0, 0.0]
        pool_updates: list[tuple[int, bool]] = []
        stamp = format_ts(job.ts)
        for pos, asked in enumerate(job.asked):
            ex = self.examples[asked.index]
            prompt_ids, golden_ids = self._encoded[asked.index] if self._encoded else ([], [])
            answer = self.codec.decode(job.generated[pos])
            stopped = job.stopped[pos]
            checks = self._checks(ex.contract or self.contract, answer)
            outcome = classify(answer, ex.golden, truncated=not stopped, contract=checks)
            em, nm = exact_match(answer, ex.golden), normalized_match(answer, ex.golden)
            ce = sums[pos] / counts[pos] if counts[pos] else math.nan
            g = groups.setdefault((ex.regime, asked.source), [0, 0, 0, 0.0, 0.0])
            g[0] += em
            g[1] += nm
            g[2] += 1
            g[3] += sums[pos]
            g[4] += counts[pos]
            if asked.source == "fixed_eval":
                fixed_ce[0] += sums[pos]
                fixed_ce[1] += counts[pos]
            p = patterns.setdefault((ex.pattern, length_bucket(len(golden_ids))), [0, 0])
            p[0] += em
            p[1] += 1
            outcomes.append((ex.regime, asked.source, ex.domain, outcome))
            matches.append(em)
            if ex.source == "train":
                pool_updates.append((asked.index, em))
            records.append({
                "ts": stamp,
                "step": job.step,
                "checkpoint_id": f"checkpoint-{job.step}",
                "example_id": ex.example_id,
                "dataset_id": ex.dataset_id,
                "regime": ex.regime,
                "source_pool": asked.source,
                "prompt": ex.prompt,
                "golden": ex.golden,
                "model_answer": answer,
                "exact_match": em,
                "normalized_match": nm,
                "failure_mode": None if outcome == "correct" else outcome,
                "ce": ce,
                "prompt_tokens": len(prompt_ids),
                "golden_tokens": len(golden_ids),
                "model_tokens": len(job.generated[pos]),
                "generation_time_ms": round(job.gen_ms[pos], 3),
                "contract_status": {"end_marker": stopped, **checks},
            })
        stats = job.stats
        tokens = stats.nll.numel()

        def mean(t: torch.Tensor) -> float | None:
            return float(t.double().mean()) if tokens else None

        snap = EvalSnapshot(
            step=job.step,
            duration=job.duration,
            examples=n,
            by_group={k: (v[0] / v[2], v[1] / v[2], v[3] / v[4] if v[4] else math.nan) for k, v in groups.items()},
            pattern={k: v[0] / v[1] for k, v in patterns.items()},
            ece=expected_calibration_error(stats.confidence, stats.correct) if tokens else None,
            top1=mean(stats.confidence),
            top5=mean(stats.top5),
            entropy=mean(stats.entropy),
        )
        if fixed_ce[1]:
            self.export.observe_loss(fixed_ce[0] / fixed_ce[1], job.step, kind="fixed")
        self.export.publish(snap, outcomes, matches)
        self._update_pool(pool_updates)
        self._write_history(records)
        return records

    def _checks(self, contract: Contract | None, answer: str) -> dict[str, bool]:
        if contract is None:
            return {}
        try:
            return {str(k): bool(v) for k, v in contract(answer).items()}
        except Exception as exc:
            # The user's validator failed on this answer: counted, and the answer counts as off-contract.
            self.errors.record("eval", exc)
            return {"contract": False}

    def _update_pool(self, updates: list[tuple[int, bool]]) -> None:
        with self._pool_lock:
            for index, right in updates:
                if right:
                    self._pool.pop(index, None)
                elif self.failure_pool > 0 and index not in self._pool:
                    self._pool[index] = None
                    while len(self._pool) > self.failure_pool:
                        self._pool.popitem(last=False)

    @property
    def failure_pool_ids(self) -> list[str]:
        with self._pool_lock:
            return [self.examples[i].example_id for i in self._pool]

    def _write_history(self, records: list[dict[str, Any]]) -> None:
        if self.history_dir is None or not records:
            return
        try:
            if self._history is None:
                self._history = PreviewHistory(self.history_dir, compress_after_days=self.compress_after_days,
                                               delete_after_days=self.delete_after_days)
            self._history.append(records)
        except Exception as exc:
            self.errors.record("previews", exc)
