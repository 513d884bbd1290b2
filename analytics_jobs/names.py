"""What a checkpoint tensor is: its name in the base model, its part in a LoRA module, and its layer.

Checkpoint names differ from the base model's by the wrappers training adds:

* prefixes ``module.`` (DDP), ``_orig_mod.`` (torch.compile) and
  ``base_model.model.`` (peft);
* LoRA factors ``X.lora_A.weight`` / ``X.lora_B.weight`` as peft saves them in
  ``adapter_model.safetensors``, ``X.lora_A.<adapter>.weight`` as they are in
  memory (a full ``state_dict()``), ``X.lora_embedding_A[.<adapter>]`` for
  embeddings, and ``X.lora_B[.<adapter>].bias`` with ``lora_bias``; each
  belongs to the base tensor ``X.weight`` (the bias to ``X.bias``);
* ``X.base_layer.weight``: the frozen base weight inside a LoRA layer;
* ``X.modules_to_save.<adapter>.weight``: a fully trained copy of ``X.weight``
  (saved adapters already store it as plain ``X.weight``), and
  ``X.original_module.weight``: the untouched original beside it (skipped).

Layers come from :func:`exporter.layers.layer_and_module`, the training
exporter's mapping, so both exporters label a parameter alike: ``-1`` for
embeddings, ``N`` for the N-th transformer block, ``final`` for the rest
(final norm, LM head, classifier heads, and anything else outside the blocks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from exporter.layers import layer_and_module

Role = Literal["full", "frame", "A", "B", "bias", "skip", "unsupported"]

_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<kind>weight|bias)$")
_LORA_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?$")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")
# Adapter kinds whose effect on the weight is not a low-rank sum (DoRA's
# magnitude, IA3's scaling, ...): reported as unsupported, never guessed.
_OTHER_ADAPTER = re.compile(r"\.(?:lora_magnitude_vector|ia3_l|lokr_|loha_|oft_|boft_|vera_|hra_|token_adapter)")
# Output embeddings that may be tied to the input embedding.
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
INPUT_EMBEDDING_MODULES = ("wte", "embed_tokens", "word_embeddings", "shared", "tok_embeddings", "embed_in")


@dataclass(frozen=True)
class Parsed:
    """A checkpoint tensor: ``target`` is the base-model tensor it belongs to."""

    target: str
    role: Role
    adapter: str | None = None
    embedding: bool = False  # lora_embedding_A/B: the delta is (B @ A)^T


def strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def parse(name: str) -> Parsed:
    clean = strip_prefixes(name)
    if ".original_module." in clean:
        return Parsed(clean.replace(".original_module.", "."), "skip")
    clean = _MODULES_TO_SAVE.sub("", clean)
    m = _LORA.match(clean)
    if m:
        if m["kind"] == "bias":
            return Parsed(f"{m['module']}.bias", "bias" if m["ab"] == "B" else "unsupported", m["adapter"])
        return Parsed(f"{m['module']}.weight", "A" if m["ab"] == "A" else "B", m["adapter"])
    m = _LORA_EMBEDDING.match(clean)
    if m:
        return Parsed(f"{m['module']}.weight", "A" if m["ab"] == "A" else "B", m["adapter"], embedding=True)
    if _OTHER_ADAPTER.search(clean):
        return Parsed(clean, "unsupported")
    if ".base_layer." in clean:
        return Parsed(clean.replace(".base_layer.", "."), "frame")
    return Parsed(clean, "full")


def layer_of(name: str) -> str:
    """``"-1"``, ``"0"``.. or ``"final"``: the training exporter's layer label of a parameter."""
    return layer_and_module(name)[0]


def module_path(target: str) -> str:
    """The module a weight belongs to (``model.layers.0.self_attn.q_proj``), as peft's patterns see it."""
    return target.rsplit(".", 1)[0]


def is_output_embedding(name: str) -> bool:
    return any(name == n or name.endswith("." + n) for n in OUTPUT_EMBEDDINGS)


def is_input_embedding(name: str) -> bool:
    layer, module = layer_and_module(name)
    return layer == "-1" and module in INPUT_EMBEDDING_MODULES and name.endswith(".weight")
