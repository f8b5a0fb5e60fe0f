"""Retrieval heads: which of a softmax model's layers copy a needle from their context.

The retrieval score of Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality" (2024): a prompt
holds a key-value fact at some depth and asks for it at the end (``ds_hybrid.recall_tasks.needle_row``); the model
reads it once with eager attention, the answer included (teacher-forced), and at every position that predicts an
answer token each head *copies* when its largest attention weight falls on the needle's token that the answer token
repeats. A head's copy rate is the fraction of answer positions where it copies; a layer's score is its best head's.
Used by stage select's ``retrieval`` method (a teacher-only ranking: no align, no training) and by
``bench/retrieval_layers.py`` (the ranking beside the selections).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ds_hybrid.recall_tasks import needle_row

Prompt = tuple[list[int], int, int, list[int]]  # ids, answer start, answer end, each answer token's source position


def needle_sources(ids: list[int], start: int, end: int) -> list[int]:
    """For each answer token ids[start + j], the position of the token it repeats in the planted fact: the last
    place before the question where the answer's tokens occur in a row (-1 for a leading token that does not occur
    there, e.g. the answer's own leading space; [] if the fact's tokens differ, e.g. the tokenizer merged the value
    with the text around it)."""
    answer = ids[start:end]
    for skip in range(len(answer)):
        tail = answer[skip:]
        for p in range(start - len(tail), -1, -1):
            if ids[p:p + len(tail)] == tail:
                return [-1] * skip + list(range(p, p + len(tail)))
        if len(tail) <= 3:
            break
    return []


def retrieval_prompts(rows: list[list[int]], tokenizer, seed: int = 0, bos: int | None = None) -> list[Prompt]:
    """Each row of text turned into a needle prompt of the same length (one seeded generator); rows whose fact the
    tokenizer merged with its neighbours (no source to copy from) are left out. ``bos``: the rows start with it."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        ids, start, end = needle_row(list(r), tokenizer, rng, bos)
        if src := needle_sources(ids, start, end):
            out.append((ids, start, end, src))
    return out


@dataclass
class CopyCounts:
    """Sums over prompts (add them across ranks before dividing): per layer and head, the answer positions where the
    head copies (``hits``) and its weight on the needle's value tokens (``mass``); the answer positions scored; the
    model's own teacher-forced answer accuracy (``correct`` of ``total`` answer tokens)."""

    hits: torch.Tensor  # [L, H]
    mass: torch.Tensor  # [L, H]
    positions: int
    correct: int
    total: int

    def copy_rate(self) -> torch.Tensor:
        return self.hits / max(self.positions, 1)

    def layer_scores(self) -> list[float]:
        """Each layer's best head's copy rate."""
        return self.copy_rate().max(dim=1).values.tolist()


@torch.no_grad()
def copy_counts(model, prompts: list[Prompt]) -> CopyCounts:
    """:class:`CopyCounts` of a decoder-only HF model (``model.model.layers[i].self_attn`` returning its attention
    weights second: load it with ``attn_implementation="eager"``) over ``prompts``."""
    layers = model.model.layers
    L, H = len(layers), model.config.num_attention_heads
    dev = next(model.parameters()).device
    hits, mass = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64)
    positions = correct = total = 0
    rows: dict[int, torch.Tensor] = {}
    want: list[int] = []

    def hook(i: int):
        def fn(_module, _args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError("retrieval scores need the attention weights: load the model with "
                                   "attn_implementation='eager'")
            rows[i] = weights[0, :, want, :].float().cpu()  # [H, answer positions, T]
        return fn

    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids, start, end, src in prompts:
            pos = [start + j - 1 for j in range(end - start) if src[j] >= 0]  # positions that predict answer tokens
            tgt = torch.tensor([src[j] for j in range(end - start) if src[j] >= 0])
            want[:] = pos
            logits = model(input_ids=torch.tensor([ids[:end]], device=dev), use_cache=False).logits[0]
            pred = logits[[start + j - 1 for j in range(end - start)]].argmax(-1).tolist()
            correct += sum(int(p == t) for p, t in zip(pred, ids[start:end]))
            total += end - start
            value = sorted(set(tgt.tolist()))
            for i in range(L):
                w = rows.pop(i)
                hits[i] += (w.argmax(-1) == tgt).double().sum(-1)
                mass[i] += w[:, :, value].sum(-1).sum(-1).double()
            positions += len(pos)
    finally:
        for h in handles:
            h.remove()
    return CopyCounts(hits, mass, positions, correct, total)
