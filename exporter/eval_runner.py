"""The fixed evaluation: generate answers for a fixed eval set, score them, export and record them.

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
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporter import metrics as m
from exporter.errors import ErrorTracker
from exporter.evaluation import (
    IGNORE_INDEX,
    OUTCOMES,
    AnswerTokenStats,
    answer_token_stats,
    classify,
    exact_match,
    expected_calibration_error,
    length_bucket,
    normalized_match,
)
from exporter.previews import PreviewHistory, format_ts

log = logging.getLogger("training_exporter")

SOURCES = ("fixed_eval", "train", "failures")
ROLLING_WINDOWS = (20, 50, 100)
# Label values come from the eval set's metadata; these bounds keep them labels.
MAX_LABEL_VALUES = 64
MAX_LABEL_LENGTH = 64
# Evaluations waiting for the worker; a third one while two wait is dropped
# (and counted) rather than letting the training thread wait on scoring.
QUEUE_SIZE = 2

Contract = Callable[[str], Mapping[str, bool]]


def regex_contract(pattern: str, name: str = "format") -> Contract:
    """A contract whose one check, ``name``, passes when the whole answer matches ``pattern``."""
    compiled = re.compile(pattern)

    def check(answer: str) -> dict[str, bool]:
        return {name: compiled.fullmatch(answer.strip()) is not None}

    return check


@dataclass(frozen=True)
class EvalExample:
    """One prompt / golden pair of the fixed eval set and the metadata its metrics are labelled by."""

    prompt: str
    golden: str
    example_id: str = ""
    regime: str = "default"
    source: str = "fixed_eval"
    domain: str = "default"
    pattern: str = "default"
    dataset_id: str = ""
    # Per-example contract; without one the eval set's contract (if any) applies.
    contract: Contract | None = field(default=None, compare=False)


def load_eval_set(items: Iterable[EvalExample | Mapping[str, Any]]) -> list[EvalExample]:
    """Examples from :class:`EvalExample` objects or mappings with the same keys; every problem in one ValueError."""
    examples: list[EvalExample] = []
    problems: list[str] = []
    known = set(EvalExample.__dataclass_fields__)
    for index, item in enumerate(items):
        if isinstance(item, EvalExample):
            ex = item
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - known)
            if unknown:
                problems.append(f"example {index}: unknown key(s) {unknown}")
                continue
            try:
                ex = EvalExample(**item)
            except TypeError as exc:
                problems.append(f"example {index}: {exc}")
                continue
        else:
            problems.append(f"example {index}: expected an EvalExample or a mapping, got {type(item).__name__}")
            continue
        if not isinstance(ex.prompt, str) or not isinstance(ex.golden, str):
            problems.append(f"example {index}: prompt and golden must be strings")
            continue
        if ex.source not in SOURCES:
            problems.append(f"example {index}: source must be one of {', '.join(SOURCES)}, got {ex.source!r}")
        for name in ("regime", "domain", "pattern"):
            value = getattr(ex, name)
            if not isinstance(value, str) or not 0 < len(value) <= MAX_LABEL_LENGTH or not value.isprintable():
                problems.append(f"example {index}: {name} must be a printable string of 1..{MAX_LABEL_LENGTH} "
                                f"characters (it is a label value)")
        if not isinstance(ex.example_id, str) or not isinstance(ex.dataset_id, str):
            problems.append(f"example {index}: example_id and dataset_id must be strings")
            continue
        if ex.contract is not None and not callable(ex.contract):
            problems.append(f"example {index}: contract must be callable")
        if not ex.example_id:
            ex = EvalExample(**{**ex.__dict__, "example_id": f"eval-{index}"})
        examples.append(ex)
    for name in ("regime", "domain", "pattern"):
        values = {getattr(ex, name) for ex in examples}
        if len(values) > MAX_LABEL_VALUES:
            problems.append(f"{len(values)} distinct {name} values, at most {MAX_LABEL_VALUES} (they are label values)")
    if not examples and not problems:
        problems.append("the eval set is empty")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("invalid eval set: " + "; ".join(problems[:5]) + more)
    return examples


class TokenizerCodec:
    """Prompt / answer encoding and decoding over a transformers tokenizer or any object with
    ``encode(text) -> ids``, ``decode(ids) -> str`` and ``eos_token_id``.

    A transformers tokenizer encodes the prompt with its own special-token
    convention (a bos where the model family uses one) and the answer without
    special tokens. Any other tokenizer encodes both with ``encode`` and gets
    its ``bos_token_id`` (if it has one) in front of the prompt.
    """

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer is None:
            raise ValueError("the fixed evaluation needs a tokenizer (tokenizer=...)")
        self.tokenizer = tokenizer
        self.hf = callable(getattr(tokenizer, "convert_ids_to_tokens", None))
        eos = getattr(tokenizer, "eos_token_id", None)
        if not isinstance(eos, int):
            raise ValueError("the tokenizer has no eos_token_id: the end of an answer can't be recognised")
        self.eos_token_id = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else eos
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_token_id = bos if isinstance(bos, int) and not self.hf else None

    def prompt(self, text: str) -> list[int]:
        if self.hf:
            return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=True)]
        ids = [int(i) for i in self.tokenizer.encode(text)]
        return [self.bos_token_id, *ids] if self.bos_token_id is not None else ids

    def answer(self, text: str) -> list[int]:
        if self.hf:
            return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        if self.hf:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
        return str(self.tokenizer.decode(list(ids)))


# --------------------------------------------------------------------------- export


@dataclass
class EvalSnapshot:
    """The aggregates of one evaluation, as exported until the next one."""

    step: int
    duration: float
    examples: int
    by_group: dict[tuple[str, str], tuple[float, float, float]]  # (regime, source) -> em, nm, ce
    pattern: dict[tuple[str, str], float]  # (pattern, length bucket) -> em
    # None when no answer token was scored; NaN (exported as is) when the model gave NaN.
    ece: float | None
    top1: float | None
    top5: float | None
    entropy: float | None


class EvalExport:
    """What the fixed evaluation and the Trainer's evaluations export; read at scrape time.

    Always present in a monitor (cheap): best-so-far comes from the Trainer's
    ``eval_loss`` even without a fixed eval set.
    """

    def __init__(self, const_labels: Mapping[str, str]) -> None:
        self.const_labels = dict(const_labels)
        self._lock = threading.Lock()
        self._last: EvalSnapshot | None = None
        self._outcomes: dict[tuple[str, str, str, str], int] = {}
        self._rolling: collections.deque[bool] = collections.deque(maxlen=max(ROLLING_WINDOWS))
        # kind ("trainer": eval_loss of Trainer evaluations, "fixed": answer CE) -> (loss, step)
        self._best: dict[str, tuple[float, int]] = {}

    def declare(self, combos: Iterable[tuple[str, str, str]]) -> None:
        """Create the outcome counters of every (regime, source, domain) at 0, so increase() sees the first."""
        with self._lock:
            for regime, source, domain in combos:
                for outcome in OUTCOMES:
                    self._outcomes.setdefault((regime, source, domain, outcome), 0)

    def observe_loss(self, loss: float, step: int, kind: str = "trainer") -> None:
        if not math.isfinite(loss):
            return
        with self._lock:
            best = self._best.get(kind)
            if best is None or loss < best[0]:
                self._best[kind] = (float(loss), int(step))

    def best(self) -> tuple[float, int] | None:
        """The Trainer's best eval loss and its step; without Trainer evaluations, the fixed eval's answer CE."""
        with self._lock:
            return self._best.get("trainer") or self._best.get("fixed")

    def publish(self, snap: EvalSnapshot, outcomes: Iterable[tuple[str, str, str, str]],
                matches: Iterable[bool]) -> None:
        with self._lock:
            self._last = snap
            for key in outcomes:
                self._outcomes[key] = self._outcomes.get(key, 0) + 1
            self._rolling.extend(matches)

    @property
    def last(self) -> EvalSnapshot | None:
        return self._last

    def collect(self) -> Iterator[Metric]:
        const = self.const_labels
        names, values = list(const), list(const.values())

        def gauge(spec: m.MetricSpec) -> GaugeMetricFamily:
            return GaugeMetricFamily(spec.name, spec.help, labels=[*names, *spec.labels])

        with self._lock:
            snap = self._last
            outcomes = dict(self._outcomes)
            rolling = list(self._rolling)
        best = self.best()
        if outcomes:
            counter = CounterMetricFamily(m.EVAL_OUTCOMES.name, m.EVAL_OUTCOMES.help,
                                          labels=[*names, *m.EVAL_OUTCOMES.labels])
            for key, count in sorted(outcomes.items()):
                counter.add_metric([*values, *key], count)
            yield counter
        if best is not None:
            for spec, value in ((m.EVAL_BEST_LOSS, best[0]), (m.EVAL_BEST_STEP, float(best[1]))):
                family = gauge(spec)
                family.add_metric(values, value)
                yield family
        if rolling:
            family = gauge(m.EVAL_ROLLING_EXACT_MATCH)
            for window in ROLLING_WINDOWS:
                tail = rolling[-window:]
                family.add_metric([*values, str(window)], sum(tail) / len(tail))
            yield family
        if snap is None:
            return
        by_group = sorted(snap.by_group.items())
        for spec, pos in ((m.EVAL_EXACT_MATCH, 0), (m.EVAL_NORMALIZED_MATCH, 1), (m.EVAL_ANSWER_CROSS_ENTROPY, 2)):
            family = gauge(spec)
            for (regime, source), triple in by_group:
                family.add_metric([*values, regime, source], triple[pos])
            yield family
        family = gauge(m.EVAL_PATTERN_ACCURACY)
        for (pattern, bucket), rate in sorted(snap.pattern.items()):
            family.add_metric([*values, pattern, bucket], rate)
        yield family
        scalars: list[tuple[m.MetricSpec, float | None]] = [
            (m.EVAL_CALIBRATION_ERROR, snap.ece), (m.EVAL_TOP1_CONFIDENCE, snap.top1),
            (m.EVAL_TOP5_CONFIDENCE, snap.top5), (m.EVAL_TOKEN_ENTROPY, snap.entropy),
            (m.EVAL_LAST_STEP, float(snap.step)), (m.EVAL_DURATION, snap.duration),
            (m.EVAL_EXAMPLES, float(snap.examples)),
        ]
        for spec, scalar in scalars:
            if scalar is None:
                continue
            family = gauge(spec)
            family.add_metric(values, scalar)
            yield family


# --------------------------------------------------------------------------- runner


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
    """Runs the fixed evaluation on a model at a step boundary; see the module docstring."""

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
        device = _device_of(model)
        limit = _max_positions(model)
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
                    new, done = self._generate(model, prompts, room, device)
                    per_example = (time.perf_counter() - t0) * 1000.0 / len(chunk)
                    generated += new
                    stopped += done
                    gen_ms += [per_example] * len(chunk)
                    part = self._teacher_forced(model, [encoded[a.index] for a in chunk], device, limit)
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

    def _generate(self, model: torch.nn.Module, prompts: list[list[int]], max_new: int,
                  device: torch.device) -> tuple[list[list[int]], list[bool]]:
        eos, pad = self.codec.eos_token_id, self.codec.pad_token_id
        # Chat models often end a turn with a token of their own, listed in their generation config.
        stops = [eos, *(i for i in _as_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
                        if i != eos)]
        generate = getattr(model, "generate", None)
        if callable(generate):
            from transformers import GenerationConfig

            width = max(len(p) for p in prompts)
            # Left padding: every row's next token comes right after its prompt.
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            config = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1,
                                      pad_token_id=pad, eos_token_id=stops)
            out = generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            rows = out[:, width:].tolist()
        else:
            rows = _greedy_plain(model, prompts, max_new, eos, device)
        new: list[list[int]] = []
        done: list[bool] = []
        stop_set = set(stops)
        for row in rows:
            end = next((i for i, t in enumerate(row) if t in stop_set), None)
            new.append(row if end is None else row[:end])
            done.append(end is not None)
        return new, done

    def _teacher_forced(self, model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]],
                        device: torch.device, limit: int | None = None) -> AnswerTokenStats:
        eos, pad = self.codec.eos_token_id, self.codec.pad_token_id
        rows = [(p + a + [eos], [IGNORE_INDEX] * len(p) + a + [eos]) for p, a in pairs]
        if limit is not None:
            # A golden answer longer than the context is scored on the part that fits.
            rows = [(r[:limit], lab[:limit]) for r, lab in rows]
        width = max(len(r) for r, _ in rows)
        # Right padding: positions (and so absolute position embeddings) as in training.
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(lab)
            mask[i, : len(r)] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        logits = out.logits if hasattr(out, "logits") else out[0]
        return answer_token_stats(logits, labels.to(logits.device)).cpu()

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


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _greedy_plain(model: torch.nn.Module, prompts: list[list[int]], max_new: int, eos: int,
                  device: torch.device) -> list[list[int]]:
    """Greedy decoding for a model without ``generate``: prompts of equal length batched, no cache, no padding."""
    by_length: dict[int, list[int]] = {}
    for row, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(row)
    out: list[list[int]] = [[] for _ in prompts]
    for rows in by_length.values():
        ids = torch.tensor([prompts[r] for r in rows], dtype=torch.long, device=device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new: list[torch.Tensor] = []
        for _ in range(max_new):
            result = model(input_ids=ids)
            logits = result.logits if hasattr(result, "logits") else result[0]
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
            new.append(nxt)
            finished |= nxt == eos
            ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
            if bool(finished.all()):
                break
        block = torch.stack(new, dim=1).tolist() if new else [[] for _ in rows]
        for r, tokens in zip(rows, block, strict=True):
            out[r] = tokens
    return out
