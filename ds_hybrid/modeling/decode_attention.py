"""Softmax attention for a static cache's decode step, without expanding the KV heads.

A static cache (:mod:`ds_hybrid.graph_decode`) hands every softmax layer its whole preallocated [B, H_kv, max_len, D]
keys and values and an explicit mask (the positions not yet written, the left pads). With a mask, transformers'
``sdpa`` path copies K and V to all H query heads (``repeat_kv``) and SDPA runs its math or memory-efficient kernel:
at Llama-3-8B shape (32 query / 8 KV heads), batch 4 and 32k context, that is ~2 GiB written per layer per step,
and a decode step with CUDA graphs took 100 ms against 19 ms of GPU time in eager decoding (docs/SERVING.md).

Here the G = H / H_kv query heads that share a KV head are treated as G queries of that head: one batched matmul
of [G, D] x [D, S] per (row, KV head) gives the scores (fp32, read from bf16 K without a copy where the GPU's
``bmm`` can write fp32), the mask is applied, softmax in fp32, and a second matmul with V. K and V are read once,
at memory bandwidth, in any mask. Used only where it applies (one query token, a mask, no dropout, no soft-capping
or attention sinks); every other call goes to transformers' ``sdpa`` function unchanged.

    with decode_attention(model):    # every sub-config on "sdpa" uses it; restored on exit
        model(input_ids=..., attention_mask=..., past_key_values=static_cache)

The reference is transformers' own ``sdpa_attention_forward`` (tests/test_decode_attention.py compares in fp64).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

NAME = "ds_hybrid_decode"
_FP32_OUT_BMM: dict[str, bool] = {}  # device type -> whether bmm(bf16, bf16, out_dtype=fp32) runs there


def _bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; from half-precision inputs without converting them where the backend allows."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return torch.bmm(a, b)
    if fp32_out_bmm(a.device):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def fp32_out_bmm(device: torch.device) -> bool:
    """Whether ``bmm(bf16, bf16, out_dtype=float32)`` runs on ``device``'s kind, tried once per process. A compiled
    decode step calls this eagerly first (graph_decode), so that the try is never traced."""
    kind = device.type
    if kind not in _FP32_OUT_BMM:
        a = torch.zeros(1, 1, 1, dtype=torch.bfloat16, device=device)
        try:
            torch.bmm(a, a, out_dtype=torch.float32)
            _FP32_OUT_BMM[kind] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUT_BMM[kind] = False
    return _FP32_OUT_BMM[kind]


def grouped_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One query token per row. query [B, H, 1, D], key/value [B, H_kv, S, D] (query head h reads KV head h // G,
    as ``repeat_kv``), mask [B, 1 or H, 1, S]: bool (True = attend) or additive float. Returns [B, 1, H, D]."""
    B, H, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = H // Hkv
    q = query.reshape(B * Hkv, G, D)
    scores = _bmm_fp32(q, key.reshape(B * Hkv, S, D).transpose(1, 2)).view(B, Hkv, G, S) * scaling
    if mask.shape[1] != 1:  # a per-head mask: [B, H, 1, S] -> [B, H_kv, G, S]
        mask = mask.reshape(B, Hkv, G, S)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(B * Hkv, G, S)
    out = _probs_times_values(probs, value.reshape(B * Hkv, S, value.shape[-1])).to(query.dtype)
    return out.view(B, 1, H, value.shape[-1])


#: key-block lengths that probs @ V may be split into (the first that divides S and leaves more than one block)
KEY_BLOCKS: tuple[int, ...] = (1024, 512, 256)
#: split only below this many (row, KV head) problems and from this many keys on: measured on an H200
#: (bench/decode_attention_bench.py, docs/SERVING.md), the split wins with few problems over long caches (3 problems
#: at 32k: 45 vs 71 us a call) and loses where one matmul already has work for every SM (32 problems at 32k: 219 vs
#: 193 us; 8 at 4k: 34 vs 27 us)
SPLIT_BELOW_PROBLEMS = 16
SPLIT_FROM_KEYS = 16384


def key_splits(problems: int, S: int) -> int:
    """How many blocks of keys :func:`_probs_times_values` sums over for ``problems`` = B x H_kv (1: one matmul)."""
    if problems >= SPLIT_BELOW_PROBLEMS or S < SPLIT_FROM_KEYS:
        return 1
    for block in KEY_BLOCKS:
        if S % block == 0 and S > block:
            return S // block
    return 1


def _probs_times_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs [N, G, S] @ value [N, S, Dv] -> fp32 [N, G, Dv], split over blocks of keys (flash-decoding's split).

    As one matmul this is N problems of [G, S] x [S, Dv] with the long dimension as the reduction: with few problems
    (N = B x H_kv = 3 at batch 1, SmolLM2 shape) a GPU's matmul gives it a handful of thread blocks, each reading
    megabytes of V in turn. Split into n blocks of keys it is N x n small matmuls (the partial sums added in fp32),
    enough to occupy every SM; V is viewed, not copied (its rows are contiguous), probs are copied once (G x S per
    problem). See :data:`SPLIT_BELOW_PROBLEMS` for when.
    """
    N, G, S = probs.shape
    n = key_splits(N, S)
    if n == 1:
        return _bmm_fp32(probs, value)
    blocks = probs.view(N, G, n, S // n).transpose(1, 2).reshape(N * n, G, S // n)
    partial = _bmm_fp32(blocks, value.reshape(N * n, S // n, value.shape[-1]))
    return partial.view(N, n, G, value.shape[-1]).sum(1)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; falls back to ``sdpa_attention_forward`` where it does not apply."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    applies = (
        query.shape[2] == 1 and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
        and not dropout and not module.training and query.shape[1] % key.shape[1] == 0
        and key.shape[-2] == attention_mask.shape[-1]
        and kwargs.get("softcap") is None and kwargs.get("s_aux") is None and kwargs.get("sinks") is None
    )
    if not applies:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return grouped_decode_attention(query, key, value, attention_mask, scaling), None


_REGISTERED = False


def register() -> None:
    """Register ``NAME`` with transformers (attention function, and sdpa's mask format), once per process."""
    global _REGISTERED
    if _REGISTERED:  # (called at every decode step through decode_attention)
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _REGISTERED = True


def sdpa_configs(model: nn.Module) -> list:
    """Every distinct config on ``sdpa`` that a module of ``model`` reads (a hybrid's layers read its teacher_config)."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextmanager
def decode_attention(model: nn.Module | None = None, configs: list | None = None) -> Iterator[None]:
    """Within the block, every config of ``model`` on ``sdpa`` (or the given ``configs``, from :func:`sdpa_configs`)
    uses :data:`NAME`; ``sdpa`` comes back on exit (also on an error). Other implementations (eager,
    flash-attention) are left as they are."""
    register()
    switched = sdpa_configs(model) if configs is None else configs
    for cfg in switched:  # the field itself: the property's setter would also overwrite every sub-config
        cfg._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for cfg in switched:
            cfg._attn_implementation_internal = "sdpa"
