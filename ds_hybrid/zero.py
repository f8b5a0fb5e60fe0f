"""Helpers for code that must work on plain modules and on DeepSpeed ZeRO-3 partitioned ones alike.

Under ZeRO-3 a parameter outside its module's forward is an empty shard (shape (0,)). Code that reads or writes whole
weights (weight transfer, export, fused losses) gathers them for the duration of a block, a module at a time, so no
rank ever holds more than one module's full parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 parameters for the block (no-op for ordinary tensors).

    With ``modifier_rank`` set, writes made on that rank are re-partitioned to every rank when the block ends.
    """
    zp = [p for p in params if is_partitioned(p)]
    if not zp:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zp, modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def copy_into_partitions(dst: nn.Module, src: nn.Module) -> None:
    """Every parameter and buffer of the whole module ``src`` into ``dst``, a module of the same structure that may
    be ZeRO-3 partitioned (rank 0's values are scattered; buffers, never partitioned, are copied on every rank)."""
    params = dict(dst.named_parameters())
    whole = dict(src.named_parameters())
    if params.keys() != whole.keys():
        raise ValueError(f"copy_into_partitions: parameters differ: {sorted(params.keys() ^ whole.keys())}")
    partitioned = any(is_partitioned(p) for p in params.values())
    writes = not partitioned or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    with gathered(params.values(), modifier_rank=0):
        if writes:  # (elsewhere rank 0's copy arrives when the block ends)
            for name, p in params.items():
                p.copy_(whole[name].to(p.dtype))
    bufs = dict(src.named_buffers())
    for name, b in dst.named_buffers():
        b.copy_(bufs[name].to(b.dtype))


def full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if is_partitioned(p) else p.shape


def num_params(module: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += int(torch.Size(full_shape(p)).numel())
    return n


@contextlib.contextmanager
def zero3_init(ds_config: dict | None, dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly into ZeRO-3 partitions (no rank ever holds a whole model); no-op without ZeRO-3.

    Weight initialisation is skipped (transformers' ``no_init_weights``): what is built here is filled from a
    checkpoint right after. Call ``model.tie_weights()`` after construction for tied embeddings.
    """
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    if stage != 3:
        yield
        return
    import deepspeed
    from transformers.initialization import no_init_weights

    # dtype comes from the config's bf16/fp16 sections (which ds-hybrid sets from the run dtype): passing
    # zero.Init(dtype=...) as well takes a branch of DeepSpeed 0.19 that ignores it on CPU and picks bf16.
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    if bf16 != (dtype == torch.bfloat16):
        raise ValueError(f"DeepSpeed config bf16={bf16} does not match the run dtype {dtype}")
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield
