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


class ParamGroups:
    """Trainable parameters grouped by (layer, module), ready for fused norm computation."""

    def __init__(self, labels: list[tuple[str, str]], params: list[torch.nn.Parameter], group_of: list[int]) -> None:
        self.labels = labels
        self.params = params
        self._gid_host = group_of
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        self.positions = by_device
        self._index_cache: dict[tuple[torch.device, int], torch.Tensor] = {}

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, torch.nn.Parameter]]) -> ParamGroups:
        keyed: dict[tuple[str, str], int] = {}
        params: list[torch.nn.Parameter] = []
        group_of: list[int] = []
        for name, p in named:
            if not p.requires_grad:
                continue
            group_of.append(keyed.setdefault(layer_and_module(name), len(keyed)))
            params.append(p)
        return cls(labels=list(keyed), params=params, group_of=group_of)

    def __len__(self) -> int:
        return len(self.labels)

    def grouped_norms(self, *tensor_lists: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """L2 norm per group of each list (aligned with ``params``): a float32 ``(len(lists), groups)`` tensor,
        squeezed to ``(groups,)`` for a single list.

        Stays on the device: one fused ``_foreach_norm`` per device over all
        the lists together and one scatter-add of the squares, no host
        synchronisation. ``None`` entries (a trainable parameter that got no
        gradient) count as zero.
        """
        n_groups, n_lists = len(self.labels), len(tensor_lists)
        out: torch.Tensor | None = None
        for dev, pos in self.positions.items():
            flat = [t for tensors in tensor_lists for i in pos if (t := tensors[i]) is not None]
            if not flat:
                sq = torch.zeros(n_lists * n_groups, dtype=torch.float32, device=dev)
            else:
                norms = torch.stack(torch._foreach_norm(flat))
                if norms.dtype != torch.float32:
                    norms = norms.float()
                index = self._group_index(dev, pos, tensor_lists, complete=len(flat) == n_lists * len(pos))
                # One op for "sum of squares per group" (zeros + index_add_ would be two).
                sq = torch.bincount(index, weights=norms * norms, minlength=n_lists * n_groups).float()
            out = sq if out is None else out + sq.to(out.device, non_blocking=True)
        if out is None:
            return torch.zeros(0)
        result = out.sqrt().view(n_lists, n_groups)
        return result[0] if n_lists == 1 else result

    def _group_index(
        self, dev: torch.device, pos: list[int], tensor_lists: Sequence[Sequence[torch.Tensor | None]], complete: bool
    ) -> torch.Tensor:
        """Output slot (list j, group g -> j * groups + g) of every present tensor, in ``flat`` order.

        Cached per device and number of lists when every tensor is present, the
        usual case; rebuilt on a step where some gradients are missing.
        """
        key = (dev, len(tensor_lists))
        if complete and key in self._index_cache:
            return self._index_cache[key]
        n_groups = len(self.labels)
        ids = [j * n_groups + self._gid_host[i] for j, tensors in enumerate(tensor_lists)
               for i in pos if tensors[i] is not None]
        index = torch.tensor(ids, dtype=torch.long, device=dev)
        if complete:
            self._index_cache[key] = index
        return index
