"""What an eval example is, and how its text becomes token ids.

* :class:`EvalExample`, one prompt / golden pair and the metadata its metrics
  are labelled by, and :func:`load_eval_set`, which checks a whole eval set
  before training starts;
* contracts: checks of an answer's form (:data:`Contract`,
  :func:`regex_contract`);
* :class:`TokenizerCodec`, the prompt / answer encoding and decoding over the
  run's tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SOURCES = ("fixed_eval", "train", "failures")
# Label values come from the eval set's metadata; these bounds keep them labels.
MAX_LABEL_VALUES = 64
MAX_LABEL_LENGTH = 64

# An answer's form checks: answer -> {check name: passed}.
Contract = Callable[[str], Mapping[str, bool]]


def regex_contract(pattern: str, name: str = "format") -> Contract:
    """A contract whose one check, ``name``, passes when the whole answer matches ``pattern``."""
    compiled = re.compile(pattern)

    def check(answer: str) -> dict[str, bool]:
        return {name: compiled.fullmatch(answer.strip()) is not None}

    return check


@dataclass(frozen=True)
class EvalExample:
    """One prompt / golden pair of the fixed eval set and the metadata its metrics are labelled by.

    ``regime``, ``source``, ``domain`` and ``pattern`` become label values of
    the ``training_eval_*`` metrics; :func:`load_eval_set` checks them.

    Args:
        prompt: the text the model continues.
        golden: the expected answer, compared with the generated one.
        example_id: the example's id in the preview history; empty means
            ``eval-<position in the eval set>``.
        regime: the kind of example its metrics are grouped by (``regime`` label).
        source: ``"fixed_eval"`` (asked every time), ``"failures"`` (a known hard
            case, also asked every time) or ``"train"`` (a training example, asked
            in rotation and again while answered wrong).
        domain: the subject the example belongs to (``domain`` label).
        pattern: the example's shape, a row of the pattern x answer-length
            accuracy heatmap (``pattern`` label).
        dataset_id: the dataset the example comes from, written to the preview history.
        contract: checks of the answer's form for this example; without one the
            eval set's contract (if any) applies.

    Raises:
        TypeError: If ``prompt`` or ``golden`` is missing or a keyword is unknown.
            The values themselves are checked by :func:`load_eval_set`.

    Example::

        from exporter.evaluation import EvalExample, regex_contract

        example = EvalExample(prompt="12+30=", golden="42", regime="no_carry", domain="arithmetic",
                              pattern="2d+2d", example_id="add-1", dataset_id="add_v1",
                              contract=regex_contract(r"[0-9]+", "digits_only"))
    """

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
    """Examples from :class:`EvalExample` objects or mappings with the same keys, checked before training starts.

    An example without an ``example_id`` gets ``eval-<position>``.

    Args:
        items: the eval set: :class:`EvalExample` objects, or mappings whose keys
            are :class:`EvalExample` fields (``prompt`` and ``golden`` required).

    Returns:
        The examples, in the order given.

    Raises:
        ValueError: If the eval set is empty or any example is malformed: an item that
            is neither an :class:`EvalExample` nor a mapping, an unknown key, a missing or
            non-string ``prompt`` / ``golden``, a non-string ``example_id`` / ``dataset_id``,
            a ``source`` other than ``fixed_eval``, ``train`` or ``failures``, a label value
            (``regime``, ``domain``, ``pattern``) that is not a printable string of 1 to 64
            characters, more than 64 distinct values of one label, or a ``contract`` that is
            not callable. Every problem found is named in the one error (the first five, and
            how many more).

    Example::

        from exporter.evaluation import load_eval_set

        eval_set = load_eval_set([
            {"prompt": "12+30=", "golden": "42", "regime": "no_carry"},
            {"prompt": "19+23=", "golden": "42", "regime": "carry", "source": "train"},
        ])
    """
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
