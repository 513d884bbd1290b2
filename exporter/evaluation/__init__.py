"""The fixed evaluation: answers generated for a fixed eval set, scored, exported and recorded.

* :mod:`~exporter.evaluation.examples`: what an eval example is, contracts, the tokenizer codec;
* :mod:`~exporter.evaluation.scoring`: the pure maths (matching, failure modes, calibration, divergence);
* :mod:`~exporter.evaluation.generation`: greedy generation and the teacher-forced pass over a model;
* :mod:`~exporter.evaluation.export`: the ``training_eval_*`` metrics, read at scrape time;
* :mod:`~exporter.evaluation.runner`: :class:`FixedEvaluator`, which asks, scores and records.
"""

from exporter.evaluation.examples import Contract, EvalExample, TokenizerCodec, load_eval_set, regex_contract
from exporter.evaluation.export import EvalExport, EvalSnapshot
from exporter.evaluation.runner import FixedEvaluator

__all__ = [
    "Contract",
    "EvalExample",
    "EvalExport",
    "EvalSnapshot",
    "FixedEvaluator",
    "TokenizerCodec",
    "load_eval_set",
    "regex_contract",
]
