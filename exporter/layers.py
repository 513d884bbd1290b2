"""Map parameter names to bounded (layer, module) labels and compute grouped norms with fused ops.

Layer labels:
  * ``"-1"``: embeddings (token and position), as in the seed data contract;
  * ``"0"`` .. ``"N-1"``: transformer blocks (``transformer.h.N.`` for GPT-2,
    ``model.layers.N.`` for Llama / Qwen / Mistral, ``encoder.layer.N.`` for BERT,
    ``blocks.N.`` for others), with or without peft prefixes;
  * ``"final"``: everything after the blocks (final norm, LM head, classifier).

The module label is the parameter path inside its block without the peft
adapter parts and the ``weight`` / ``bias`` suffix (``attn.c_attn``,
``self_attn.q_proj``), so a LoRA module's A and B matrices form one group and
the label set is fixed by the architecture, never by the data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.(.+)$")
_EMBEDDING = re.compile(r"(?:^|\.)(wte|wpe|embed_tokens|embed_positions|word_embeddings|position_embeddings|"
                        r"token_type_embeddings|shared|embeddings)(?:\.|$)")
_PEFT_NOISE = re.compile(
    r"\.(?:lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)|modules_to_save|original_module)(?:\.[^.]+)?"
    r"(?=\.|$)"
)
_SUFFIX = re.compile(r"\.(?:weight|bias)$")


def layer_and_module(name: str) -> tuple[str, str]:
    clean = name.removeprefix("module.").removeprefix("base_model.model.")
    clean = _PEFT_NOISE.sub("", clean)
    clean = _SUFFIX.sub("", clean)
    block = _BLOCK.search(clean)
    if block:
        return block.group(1), block.group(2)
    emb = _EMBEDDING.search(clean)
    if emb:
        return "-1", emb.group(1)
    return "final", clean.rsplit(".", 1)[-1] or clean


def layer_sort_key(layer: str) -> tuple[int, int]:
    if layer == "final":
        return (1, 0)
    return (0, int(layer))


@dataclass
class ParamGroups:
    """Trainable parameters grouped by (layer, module), ready for fused norm computation."""

    labels: list[tuple[str, str]]
    params: list[torch.nn.Parameter]
    index: dict[torch.device, tuple[list[int], torch.Tensor]]  # device -> (positions in params, group ids)

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, torch.nn.Parameter]]) -> ParamGroups:
        keyed: dict[tuple[str, str], int] = {}
        params: list[torch.nn.Parameter] = []
        group_of: list[int] = []
        for name, p in named:
            if not p.requires_grad:
                continue
            key = layer_and_module(name)
            group_of.append(keyed.setdefault(key, len(keyed)))
            params.append(p)
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        index = {
            dev: (pos, torch.tensor([group_of[i] for i in pos], dtype=torch.long, device=dev))
            for dev, pos in by_device.items()
        }
        labels = list(keyed)
        return cls(labels=labels, params=params, index=index)

    def __len__(self) -> int:
        return len(self.labels)

    def grouped_norms(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """L2 norm per group of ``tensors`` (aligned with ``params``), as one float32 tensor.

        Stays on the device: one fused ``_foreach_norm`` per device and a
        scatter-add of the squares, no host synchronisation. ``None`` entries
        (a trainable parameter that got no gradient) count as zero.
        """
        out: torch.Tensor | None = None
        for dev, (pos, gid) in self.index.items():
            present = [(k, tensors[i]) for k, i in enumerate(pos) if tensors[i] is not None]
            sq = torch.zeros(len(self.labels), dtype=torch.float32, device=dev)
            if present:
                ks, ts = zip(*present, strict=True)
                norms = torch.stack(torch._foreach_norm(list(ts))).float()
                ids = gid if len(ks) == len(pos) else gid[list(ks)]
                sq.index_add_(0, ids, norms * norms)
            out = sq if out is None else out + sq.to(out.device, non_blocking=True)
        if out is None:
            return torch.zeros(0)
        return out.sqrt()
