"""Tiny models, a code-built tokenizer, data and a recorder for the trainer test matrix (tests/test_trainers*.py).

Nothing is downloaded: the Llama / Qwen2 models are built from configs with
random weights, the tokenizer is a character-level ``tokenizers`` WordLevel
model wrapped in ``PreTrainedTokenizerFast``, and the dataset is generated
from a seed with lengths that vary a lot, so that a mean over micro-batches
and a mean over tokens differ visibly.

:class:`Recorder` is the independent side of every comparison. A forward
hook on the trained model keeps, for every training micro-batch, the inputs
the model saw and the summed next-token negative log-likelihood with its
number of label positions:

* from the logits when the output has them (the plain Trainer): a float64
  cross-entropy over the positions whose shifted label is not -100;
* from TRL's fused LM head otherwise (SFTTrainer: ``log_probs`` and
  ``label_mask``, no logits): ``-log_probs.sum()`` and ``label_mask.sum()``,
  TRL's own numbers, with the fused ``entropy`` summed over the labels.

Its ``on_step_end`` groups those micro-batches by optimizer step and reads
what the exporter published for that step from the exporter's registry;
placed after the :class:`PrometheusCallback` in ``callbacks``, it runs after
the exporter's own ``on_step_end`` (reading the registry flushes the
exporter's device-side buffers, as a scrape would).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
    TrainingArguments,
)

VOCAB = 64
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?"
# The exported series a Recorder reads after each step.
STEP_METRICS = (
    "training_loss",
    "training_samples_total",
    "training_tokens_total",
    "training_token_entropy_nats",
    "training_top1_confidence_ratio",
    "training_top5_confidence_ratio",
)


# --------------------------------------------------------------------------- tokenizer, models, data


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then one id per character; prepends <bos>."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="right"
    )
    # Not needed by the plain-text datasets here; present so chat-style code paths have one.
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    return fast


def _common(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False,
        # Far from uniform predictions (the default 0.02 gives every token a loss of about log(64)), so
        # micro-batch means differ and a mean of means is visibly not the token-weighted mean.
        "initializer_range": 0.5,
    }  # fmt: skip


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_common(tokenizer)))


def tiny_qwen2(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_common(tokenizer)))


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def texts(n: int, seed: int = 0, min_chars: int = 2, max_chars: int = 40) -> list[str]:
    """``n`` lowercase "sentences" of uniformly random length in [min_chars, max_chars] characters."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "42", "7", "and", "then"]
    out = []
    for _ in range(n):
        target = rng.randint(min_chars, max_chars)
        s = ""
        while len(s) < target:
            s += rng.choice(words) + rng.choice([" ", " ", ", ", ". "])
        out.append(s[:target])
    return out


def text_dataset(n: int = 96, seed: int = 0, min_chars: int = 2, max_chars: int = 40) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"text": texts(n, seed, min_chars, max_chars)})


class TokenizedList(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Plain-Trainer dataset: ``{"input_ids": [...]}`` per example, variable lengths."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, n: int = 96, seed: int = 0) -> None:
        self.rows = [tokenizer(t + EOS)["input_ids"] for t in texts(n, seed)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.rows[i]}


class PadCollator:
    """Right-pads a batch; labels are the inputs with -100 on the padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


COMMON_ARGS: dict[str, Any] = {
    "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1,
    "dataloader_num_workers": 0, "learning_rate": 5e-3, "lr_scheduler_type": "constant", "seed": 0,
    "per_device_train_batch_size": 2,
}  # fmt: skip


def sft_config(output_dir: str, max_steps: int, **overrides: Any) -> Any:
    from trl import SFTConfig

    return SFTConfig(output_dir=output_dir, max_steps=max_steps, **{**COMMON_ARGS, "max_length": 48, **overrides})


def training_args(output_dir: str, max_steps: int, **overrides: Any) -> TrainingArguments:
    return TrainingArguments(output_dir=output_dir, max_steps=max_steps, **{**COMMON_ARGS, **overrides})


# --------------------------------------------------------------------------- recorder


@dataclass
class MicroBatch:
    """One training forward as the model saw it, with its independent loss terms."""

    inputs: dict[str, Any]  # the tensors (CPU copies) and scalars passed to forward, labels included
    kwarg_names: tuple[str, ...]  # every keyword argument that reached forward (even None-valued ones)
    nll: float  # summed next-token negative log-likelihood over the label positions
    count: int  # label positions: shifted labels != -100
    source: str  # "logits" or "fused"
    entropy_sum: float | None = None  # TRL's fused entropy summed over the label positions
    num_items_in_batch: float | None = None

    @property
    def rows(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def sequences(self) -> int:
        """Sequences in the batch: rows, or for padding-free rows the starts (position_ids == 0) of each row."""
        pos = self.inputs.get("position_ids")
        mask = self.inputs.get("attention_mask")
        if isinstance(pos, torch.Tensor) and mask is None:
            return int((pos == 0).sum())
        return self.rows

    @property
    def tokens(self) -> int:
        """Non-padding tokens: the attention mask's sum, or every position of a padding-free row."""
        mask = self.inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        return int(self.inputs["input_ids"].numel())


@dataclass
class Step:
    step: int
    micro: list[MicroBatch]
    exported: dict[str, float | None] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The step's token-weighted mean loss: all summed NLL over all label positions."""
        return sum(m.nll for m in self.micro) / sum(m.count for m in self.micro)

    @property
    def micro_mean(self) -> float:
        """The unweighted mean of the micro-batch means (what a wrong aggregation would give)."""
        return sum(m.nll / m.count for m in self.micro) / len(self.micro)

    @property
    def sequences(self) -> int:
        return sum(m.sequences for m in self.micro)

    @property
    def tokens(self) -> int:
        return sum(m.tokens for m in self.micro)


def _get(output: Any, name: str) -> Any:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Float64 next-token cross-entropy summed over the positions whose shifted label is not -100."""
    shifted = labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    keep = shifted != -100
    nll = torch.nn.functional.cross_entropy(flat[keep], shifted[keep], reduction="sum")
    return float(nll), int(keep.sum())


class Recorder(TrainerCallback):
    """Records every training micro-batch and, after each optimizer step, what the exporter published.

    ``exporter``: the PrometheusCallback whose registry is read (None: record the truths only).
    ``snapshot``: keep a copy of the trainable weights as they were in the last step's forward, so
    :meth:`logits_of` can recompute that step's logits after training.
    """

    def __init__(self, exporter: Any = None, metrics: Sequence[str] = STEP_METRICS, snapshot: bool = False) -> None:
        self.exporter = exporter
        self.metrics = tuple(metrics)
        self.snapshot = snapshot
        self.steps: list[Step] = []
        self.kwarg_names: set[str] = set()
        self.weights: dict[str, torch.Tensor] | None = None
        self._pending: list[MicroBatch] = []
        self._model: torch.nn.Module | None = None
        self._hook: Any = None

    # -- hook
    def attach(self, model: torch.nn.Module) -> None:
        if self._hook is None:
            self._model = model
            self._hook = model.register_forward_hook(self._forward, with_kwargs=True)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return
        inputs: dict[str, Any] = {}
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                inputs[k] = v.detach().cpu().clone()
            elif isinstance(v, (int, float, bool, str)) or v is None:
                inputs[k] = v
        if args and "input_ids" not in inputs and isinstance(args[0], torch.Tensor):
            inputs["input_ids"] = args[0].detach().cpu().clone()
        self.kwarg_names.update(kwargs)
        labels = inputs.get("labels")
        logits = _get(output, "logits")
        log_probs = _get(output, "log_probs")
        entropy_sum = None
        if isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor):
            nll, count = summed_nll(logits.detach().cpu(), labels)
            source = "logits"
        elif isinstance(log_probs, torch.Tensor):
            label_mask = _get(output, "label_mask")
            nll = float(-log_probs.detach().double().sum())
            count = int(label_mask.sum())
            source = "fused"
            entropy = _get(output, "entropy")
            if isinstance(entropy, torch.Tensor):
                # Zero on ignored positions (TRL's contract), so the plain sum is the sum over the labels.
                entropy_sum = float(entropy.detach().double().sum())
        else:
            raise AssertionError(f"forward output has neither logits+labels nor log_probs: {type(output)}")
        items = kwargs.get("num_items_in_batch")
        self._pending.append(MicroBatch(
            inputs=inputs, kwarg_names=tuple(kwargs), nll=nll, count=count, source=source,
            entropy_sum=entropy_sum, num_items_in_batch=None if items is None else float(items),
        ))  # fmt: skip

    # -- callback
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if model is not None:
            self.attach(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._pending = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        # The weights are those of this step's forwards until optimizer.step().
        if self.snapshot and self._model is not None:
            self.weights = {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        step = Step(state.global_step, self._pending)
        self._pending = []
        if self.exporter is not None and self.exporter.monitor is not None:
            for name in self.metrics:
                step.exported[name] = exported(self.exporter, name)
        self.steps.append(step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.detach()

    # -- after training
    @torch.no_grad()
    def logits_of(self, micro: MicroBatch) -> torch.Tensor:
        """Full logits of ``micro`` from the weights of the last recorded step (requires ``snapshot=True``).

        The model runs its original (unfused) forward in eval mode with the recorded inputs except the labels.
        """
        assert self._model is not None and self.weights is not None, "Recorder(snapshot=True) and a finished run"
        model = self._model
        self.detach()
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        was_training = model.training
        model.eval()
        try:
            drop = {"labels", "num_items_in_batch", "fused_lm_head", "use_cache", "return_dict"}
            kwargs = {k: v for k, v in micro.inputs.items() if k not in drop and v is not None}
            logits = model(**kwargs, use_cache=False).logits
        finally:
            model.load_state_dict(current)
            model.train(was_training)
        return logits.detach()


def exported(exporter: Any, name: str, **labels: str) -> float | None:
    """A sample from the exporter's registry (its const labels: run_id, and rank under ranks="all")."""
    mon = exporter.monitor
    assert mon is not None
    return mon.registry.get_sample_value(name, {**mon.const_labels, **labels})


def predictions_of(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean entropy, top-1 and top-5 probability over the positions whose shifted label is not -100 (float64)."""
    keep = labels[:, 1:] != -100
    rows = logits[:, :-1][keep].double()
    logp = rows.log_softmax(-1)
    p = logp.exp()
    top = p.topk(min(5, rows.shape[-1]), dim=-1).values
    return {
        "training_token_entropy_nats": float(-(p * logp).sum(-1).mean()),
        "training_top1_confidence_ratio": float(top[:, 0].mean()),
        "training_top5_confidence_ratio": float(top.sum(-1).mean()),
        "positions": float(keep.sum()),
    }


def rel_diff(a: float | None, b: float) -> float:
    if a is None:
        return math.inf
    return abs(a - b) / max(abs(b), 1e-30)
