"""Dataset drift: a profile of the reference batches against a rolling window of recent ones.

Features (one ``feature`` label value each, Jensen-Shannon divergence in bits):

``sequence_length``   histogram of the real (attention-mask) length of each
                      sequence over the fixed bins :data:`LENGTH_EDGES`; the
                      sequences of a packed (padding-free) row, where
                      ``position_ids`` restart at 0, are each one sequence;
``token_frequency``   frequency of the reference's top-K token ids, plus one
                      "other" bucket for every other id;
``padding_fraction``  real vs padding token slots of the batches (a packed row
                      without a mask: padding is what follows its last
                      non-zero position id);
``truncation``        sequences cut short vs complete. A sequence is cut short
                      when its length reaches ``max_length`` (when set) or,
                      without one, when its last real token is not an
                      end-of-sequence token of the model.

The reference is the first ``reference_batches`` training batches (forward
passes in training mode), or batches the user passes to
:meth:`DriftProfiler.set_reference`. Costs in the training loop: a few small
device ops per forward pass (bucketize, an index lookup, one ``index_add_``),
no device->host synchronisation; the per-batch count vectors are read at
scrape time, and only the newest ``window`` of them are kept.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from exporter import metrics as m
from exporter.errors import ErrorTracker
from exporter.evaluation.scoring import js_divergence

log = logging.getLogger("training_exporter")

FEATURES = ("sequence_length", "token_frequency", "padding_fraction", "truncation")

# Sequence-length bin edges in tokens: about x1.4 apart (powers of two and the
# 1.5x between them) from 1 to 32k, so a shift of a third in typical length
# moves mass across a bin edge at any scale. Bin 0 is [0, 1), the last [32768, inf).
LENGTH_EDGES: tuple[int, ...] = (
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
    6144, 8192, 12288, 16384, 24576, 32768,
)


@dataclass(frozen=True)
class _Constants:
    """Device tensors that depend only on the batch shape, made once per shape."""

    edges: torch.Tensor
    positions: torch.Tensor
    ones: torch.Tensor
    token_ones: torch.Tensor
    full_lengths: torch.Tensor
    row_start: torch.Tensor
    true_col: torch.Tensor
    real_slot: torch.Tensor
    pad_slot: torch.Tensor
    truncated_slot: torch.Tensor
    eos: torch.Tensor | None


@dataclass(frozen=True)
class _Batch:
    """One batch as profiled: 2-D ids, real slots (None: all), position ids (None: one sequence a row)."""

    ids: torch.Tensor
    real: torch.Tensor | None
    positions: torch.Tensor | None
    const: _Constants


class DriftProfiler:
    """Reference and rolling profiles of the training batches, and their divergence per feature."""

    def __init__(
        self,
        const_labels: Mapping[str, str],
        errors: ErrorTracker,
        *,
        window: int = 100,
        reference_batches: int = 100,
        top_k: int = 100,
        max_length: int = 0,
        sample_every: int = 1,
        vocab_size: int | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.const_labels = dict(const_labels)
        self.errors = errors
        self.window = window
        self.reference_batches = reference_batches
        self.top_k = top_k
        self.max_length = max_length
        self.sample_every = max(1, sample_every)
        self._calls = 0
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._nb = len(LENGTH_EDGES) + 1
        # _lock guards what the training thread touches (pending vectors, the reference) and is
        # never held across a device transfer; _read_lock serialises concurrent scrapes.
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._const: dict[tuple[int, int, torch.device], _Constants] = {}
        # Reference phase, on the device of the first batch.
        self._ref_seen = 0
        self._ref_sum: torch.Tensor | None = None
        self._ref_vocab: torch.Tensor | None = None
        self._ref_external = False
        # Set once the reference is complete.
        self._k = 0
        self._lookup: dict[torch.device, torch.Tensor] = {}
        self._reference_dev: torch.Tensor | None = None
        self._reference: list[float] | None = None
        # Current phase: device vectors not yet read, host rows of the window.
        self._pending: collections.deque[torch.Tensor] = collections.deque(maxlen=window)
        self._rows: collections.deque[list[float]] = collections.deque(maxlen=window)

    # ------------------------------------------------------------------ setup

    @property
    def reference_ready(self) -> bool:
        return self._reference_dev is not None

    def attach(self, model: torch.nn.Module) -> None:
        """Vocabulary size and end-of-sequence ids from ``model`` where known (the batches come from the
        training exporter's forward hook, :meth:`observe_forward`)."""
        if self.vocab_size is None:
            self.vocab_size = _vocab_size(model)
        if not self.eos_token_ids:
            self.eos_token_ids = _eos_ids(model)

    def set_reference(self, batches: Iterable[Any]) -> int:
        """Profile up to ``reference_batches`` of ``batches`` (mappings with ``input_ids`` and optionally
        ``attention_mask`` and ``position_ids``, or bare id tensors) as the reference; returns how many
        were used."""
        self._ref_external = True
        self._ref_seen, self._ref_sum, self._ref_vocab = 0, None, None
        used = 0
        for batch in batches:
            if used >= self.reference_batches:
                break
            ids, mask, positions = _batch_tensors(batch)
            if ids is None:
                continue
            self._accumulate_reference(ids, mask, positions)
            used += 1
        if used:
            self._finish_reference()
        return used

    # -------------------------------------------------------------- hot path

    def observe_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None) -> None:
        """One training forward pass (from the exporter's forward hook): every ``sample_every``-th is profiled."""
        # A profile of every N-th batch: the same distribution at a tenth of the
        # per-step cost (the ops are small, so on a CPU their count is the cost).
        self._calls += 1
        if (self._calls - 1) % self.sample_every:
            return
        try:
            self.observe(input_ids, attention_mask, position_ids)
        except Exception as exc:
            self.errors.record("drift", exc)

    def observe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> None:
        """Add one training batch: to the reference until it is complete, to the rolling window after.

        With ``position_ids``, every run that starts at position 0 is a
        sequence of its own (packing); rows with one start each count as
        without them.
        """
        with torch.no_grad():
            if self._reference_dev is None:
                if self._ref_external:
                    return
                self._accumulate_reference(input_ids, attention_mask, position_ids)
                if self._ref_seen >= self.reference_batches:
                    self._finish_reference()
                return
            counts = self._counts(self._batch(input_ids, attention_mask, position_ids), with_tokens=True)
        with self._lock:
            self._pending.append(counts)

    def _batch(self, input_ids: torch.Tensor, mask: torch.Tensor | None,
               positions: torch.Tensor | None) -> _Batch:
        ids = input_ids.detach()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None and mask.dim() == 1 else mask
            positions = positions.unsqueeze(0) if positions is not None and positions.dim() == 1 else positions
        b, t = ids.shape
        const = self._constants(b, t, ids.device)
        if positions is not None:
            positions = positions.detach()
            # (1, t) is one set of positions for every row; any other shape (e.g. the (3, b, t) of
            # multimodal rotary positions) says nothing about sequence starts.
            if positions.dim() == 2 and positions.shape[1] == t and positions.shape[0] in (1, b):
                positions = positions.to(ids.device).expand(b, t)
            else:
                positions = None
        if mask is not None and mask.shape == ids.shape:
            real: torch.Tensor | None = (mask.detach() != 0).long()
        elif positions is not None:
            real = padding_free_real(positions, const.positions).long()
        else:
            real = None
        return _Batch(ids, real, positions, const)

    def _counts(self, batch: _Batch, with_tokens: bool) -> torch.Tensor:
        """One int64 vector: length bins | real, padding | complete, truncated | token buckets (if asked).

        Built with one ``index_add_`` of (index, weight) pairs; the index parts
        that only depend on the batch shape are cached, and the token lookup
        table already holds its offset in the vector, so a batch costs about
        fifteen small device ops (some ten more with position ids).
        """
        ids, real, const = batch.ids, batch.real, batch.const
        dev = ids.device
        t = ids.shape[1]
        nb = self._nb
        lengths = real.sum(1) if real is not None else const.full_lengths
        # Real and padding slots (weights length, width - length) per row, whatever its sequences.
        index = [const.real_slot, const.pad_slot]
        weight = [lengths, t - lengths]
        if batch.positions is None:
            # Lengths to their bins (weight 1 each).
            index.append(torch.bucketize(lengths, const.edges, right=True))
            weight.append(const.ones)
            complete = self._complete(ids, real, lengths, const)
            if complete is not None:
                index.append(const.truncated_slot - complete.long())
                weight.append(const.ones)
        else:
            self._packed(batch, index, weight)
        size = nb + 4
        lookup = self._lookup_on(dev) if with_tokens else None
        if lookup is not None:
            index.append(lookup[self._safe_ids(ids).reshape(-1)])
            weight.append(real.reshape(-1) if real is not None else const.token_ones)
            size += self._k + 1
        return torch.zeros(size, dtype=torch.long, device=dev).index_add_(0, torch.cat(index), torch.cat(weight))

    def _packed(self, batch: _Batch, index: list[torch.Tensor], weight: list[torch.Tensor]) -> None:
        """Length bins and truncation of every sequence of rows that ``position_ids`` split at each 0.

        Sequence k of row r is slot r * t + k of a b * t vector: shapes fixed by
        the batch, so no count of sequences is read back; a slot past a row's
        sequences has length 0 and weight 0.
        """
        ids, real, positions, const = batch.ids, batch.real, batch.positions, batch.const
        assert positions is not None
        b, t = ids.shape
        nb = self._nb
        starts = positions == 0
        if real is not None:
            starts = starts & (real != 0)
        seen = starts.cumsum(1)
        # Slots before a row's first start (left padding) join its first sequence, so a row with one
        # start, or none, is one sequence of the row's real length: the counts without position ids.
        slot = ((seen - 1).clamp_(min=0) + const.row_start).reshape(-1)
        tokens = real.reshape(-1) if real is not None else const.token_ones
        lengths = torch.zeros(b * t, dtype=torch.long, device=ids.device).index_add_(0, slot, tokens)
        present = (const.positions < seen[:, -1:].clamp(min=1)).reshape(-1).long()
        index.append(torch.bucketize(lengths, const.edges, right=True))
        weight.append(present)
        if self.max_length > 0:
            index.append((nb + 3) - (lengths < self.max_length).long())
            weight.append(present)
            return
        if const.eos is None:
            return
        # A sequence ends before the next start or at the row end (not before the first start, which
        # only ends left padding); each one has one end, and there the last real token so far is its own.
        end = torch.cat([starts[:, 1:] & (seen[:, :-1] > 0), const.true_col], 1)
        if real is None:
            last_id = ids
        else:
            last_real = torch.where(real != 0, const.positions, -1).cummax(1).values.clamp_(min=0)
            last_id = ids.gather(1, last_real)
        complete = last_id == const.eos if const.eos.numel() == 1 else torch.isin(last_id, const.eos)
        index.append(((nb + 3) - complete.long()).reshape(-1))
        weight.append(end.reshape(-1).long())

    def _constants(self, b: int, t: int, dev: torch.device) -> _Constants:
        key = (b, t, dev)
        const = self._const.get(key)
        if const is None:
            if len(self._const) > 64:  # many batch shapes (dynamic padding): keep the cache bounded
                self._const.clear()
            nb = self._nb
            const = self._const[key] = _Constants(
                edges=torch.tensor(LENGTH_EDGES, dtype=torch.long, device=dev),
                positions=torch.arange(t, device=dev),
                ones=torch.ones(b, dtype=torch.long, device=dev),
                token_ones=torch.ones(b * t, dtype=torch.long, device=dev),
                full_lengths=torch.full((b,), t, dtype=torch.long, device=dev),
                row_start=torch.arange(0, b * t, t, device=dev).unsqueeze(1),
                true_col=torch.ones(b, 1, dtype=torch.bool, device=dev),
                real_slot=torch.full((b,), nb, dtype=torch.long, device=dev),
                pad_slot=torch.full((b,), nb + 1, dtype=torch.long, device=dev),
                truncated_slot=torch.full((b,), nb + 3, dtype=torch.long, device=dev),
                eos=torch.tensor(self.eos_token_ids, dtype=torch.long, device=dev) if self.eos_token_ids else None,
            )
        return const

    def _complete(self, ids: torch.Tensor, real: torch.Tensor | None, lengths: torch.Tensor,
                  const: _Constants) -> torch.Tensor | None:
        """Per sequence: not truncated (see the module docstring); None when that can't be told."""
        if self.max_length > 0:
            return lengths < self.max_length
        if const.eos is None:
            return None
        if real is None:
            last_id = ids[:, -1]
        else:
            # Position of the last real token, whichever side the padding is on.
            last_id = ids.gather(1, (real * const.positions).argmax(1, keepdim=True)).squeeze(1)
        if const.eos.numel() == 1:
            return last_id == const.eos
        return torch.isin(last_id, const.eos)

    def _safe_ids(self, ids: torch.Tensor) -> torch.Tensor:
        # An id outside the embedding (a resized vocabulary, a sentinel) would be a device-side
        # assert on CUDA: ids past the end go to the extra slot V (negative ones, never seen in
        # practice, to id 0).
        return ids.clamp(0, int(self.vocab_size or 0))

    def _accumulate_reference(self, ids: torch.Tensor, mask: torch.Tensor | None,
                              positions: torch.Tensor | None = None) -> None:
        batch = self._batch(ids, mask, positions)
        counts = self._counts(batch, with_tokens=False)
        self._ref_sum = counts if self._ref_sum is None else self._ref_sum + counts.to(self._ref_sum.device)
        if self.vocab_size:
            flat = self._safe_ids(batch.ids).reshape(-1)
            weight = batch.real.reshape(-1) if batch.real is not None else batch.const.token_ones
            if self._ref_vocab is None:
                self._ref_vocab = torch.zeros(self.vocab_size + 1, dtype=torch.long, device=flat.device)
            self._ref_vocab.index_add_(0, flat.to(self._ref_vocab.device), weight.to(self._ref_vocab.device))
        self._ref_seen += 1

    def _finish_reference(self) -> None:
        """Fix the top-K tokens and the reference vector; device ops only, no synchronisation."""
        assert self._ref_sum is not None
        ref = self._ref_sum
        if self._ref_vocab is not None and self.vocab_size:
            vocab = self._ref_vocab
            k = min(self.top_k, self.vocab_size)
            top = vocab[: self.vocab_size].topk(k).indices
            # Values are positions in the count vector (after the nb + 4 fixed slots): no add per batch.
            offset = self._nb + 4
            lookup = torch.full((self.vocab_size + 1,), offset + k, dtype=torch.long, device=vocab.device)
            lookup[top] = torch.arange(offset, offset + k, device=vocab.device)
            kept = vocab[top]
            ref = torch.cat([ref, kept, (vocab.sum() - kept.sum()).reshape(1)])
            self._k = k
            self._lookup = {vocab.device: lookup}
        self._ref_vocab = None
        with self._lock:
            self._reference_dev = ref
            self._reference = None
            self._pending.clear()
            self._rows.clear()

    def _lookup_on(self, dev: torch.device) -> torch.Tensor | None:
        if not self._lookup:
            return None
        lookup = self._lookup.get(dev)
        if lookup is None:
            lookup = self._lookup[dev] = next(iter(self._lookup.values())).to(dev)
        return lookup

    # ----------------------------------------------------------------- export

    def divergences(self) -> dict[str, float]:
        """JS divergence per feature once the reference is complete and the window full; else empty."""
        with self._read_lock:
            return self._divergences()

    def _divergences(self) -> dict[str, float]:
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
            ref_dev = self._reference_dev
        if ref_dev is None:
            return {}
        if pending:
            # One transfer for every batch since the last read.
            self._rows.extend(torch.stack([p.to(pending[0].device) for p in pending]).double().tolist())
        if self._reference is None:
            self._reference = ref_dev.double().tolist()
        if len(self._rows) < self.window:
            return {}
        current = [sum(col) for col in zip(*self._rows, strict=True)]
        return divergences(self._reference, current, self._nb)

    def collect(self) -> Iterator[Metric]:
        values = self.divergences()
        if not values:
            return
        spec = m.DATASET_DRIFT
        family = GaugeMetricFamily(spec.name, spec.help, labels=[*self.const_labels, *spec.labels])
        for feature, value in values.items():
            family.add_metric([*self.const_labels.values(), feature], value)
        yield family


def divergences(reference: Sequence[float], current: Sequence[float], length_bins: int) -> dict[str, float]:
    """Split two count vectors (layout of :meth:`DriftProfiler._counts`) into features and compare each."""
    nb = length_bins
    out: dict[str, float] = {}
    spans = {
        "sequence_length": (0, nb),
        "padding_fraction": (nb, nb + 2),
        "truncation": (nb + 2, nb + 4),
    }
    if len(reference) > nb + 4 and len(current) == len(reference):
        spans["token_frequency"] = (nb + 4, len(reference))
    for feature in FEATURES:
        if feature not in spans:
            continue
        lo, hi = spans[feature]
        value = js_divergence(reference[lo:hi], current[lo:hi])
        if math.isfinite(value):
            out[feature] = value
    return out


def padding_free_real(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Real (not padding) slots of padding-free rows that come without a mask, as a bool tensor.

    A padding-free collator pads a row (pad_to_multiple_of) with position id 0,
    which no position id can tell from sequences of one token. The slots after
    a row's last non-zero position id are taken for padding: a packed sequence
    of one token there would have no loss token anyway (its only label is the
    -100 of a sequence start). A row with no non-zero position id is all real.
    ``index`` is ``arange(t)`` on the rows' device. Fixed-shape device ops only.
    """
    moving = ((positions != 0) * index).amax(1, keepdim=True)
    return (index <= moving) | (moving == 0)


def _batch_tensors(batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Input ids, attention mask and position ids of a reference batch (a mapping or a bare id tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        ids, mask, positions = (_tensor(batch.get(key)) for key in ("input_ids", "attention_mask", "position_ids"))
        return ids, mask, positions
    return None, None, None


def _tensor(value: Any) -> torch.Tensor | None:
    return torch.as_tensor(value) if value is not None and not isinstance(value, torch.Tensor) else value


def _vocab_size(model: torch.nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
            n = getattr(emb, "num_embeddings", None)
            if isinstance(n, int) and n > 0:
                return n
        except Exception:  # a model without embeddings simply has no token feature
            pass
    n = getattr(getattr(model, "config", None), "vocab_size", None)
    return n if isinstance(n, int) and n > 0 else None


def _eos_ids(model: torch.nn.Module) -> tuple[int, ...]:
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, (list, tuple)):
        return tuple(int(x) for x in eos if isinstance(x, int))
    return ()
