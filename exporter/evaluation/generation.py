"""What the fixed evaluation asks of the model: greedy answers and the teacher-forced pass.

Both run in the training thread, on token ids (see
:class:`~exporter.evaluation.examples.TokenizerCodec`); the caller puts the
model in eval mode under ``torch.no_grad()`` and restores its modes and RNG
states afterwards:

* :func:`generate_answers`: batched greedy generation, through the model's
  ``generate`` (transformers) or, for a plain module, a forward loop without
  cache; each answer is cut at the first end marker;
* :func:`teacher_forced_stats`: one forward pass over prompt + golden answer
  + end marker, with the statistics of the golden tokens;
* :func:`max_positions` and :func:`device_of`: the context length and the
  device the ids go to.
"""

from __future__ import annotations

from typing import Any

import torch

from exporter.evaluation.scoring import IGNORE_INDEX, AnswerTokenStats, answer_token_stats


def generate_answers(model: torch.nn.Module, prompts: list[list[int]], max_new: int, device: torch.device, *,
                     eos: int, pad: int) -> tuple[list[list[int]], list[bool]]:
    """Greedy answers to ``prompts`` (new tokens, end marker and what follows cut off) and whether each ended."""
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


def teacher_forced_stats(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], device: torch.device,
                         limit: int | None = None, *, eos: int, pad: int) -> AnswerTokenStats:
    """Statistics of the golden tokens and end marker of each (prompt, golden) pair, prompt positions ignored."""
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


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's context length from its config (``n_positions`` or ``max_position_embeddings``); None if unknown."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
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
