"""The dtype of a model's derived buffers: RoPE's inverse frequencies stay fp32 when the weights go to bf16.

A teacher loaded by ``from_pretrained(dtype=torch.bfloat16)`` computes its rotary embeddings' ``inv_freq`` (and
``original_inv_freq``; Gemma 3 one pair per layer type) in fp32: transformers builds them with an explicit float
dtype, and its rotary forward works in fp32. Two ways of building a model round them to bf16 instead:

- ``Module.to(dtype)`` casts every floating buffer, derived ones included;
- under ZeRO-3's ``zero.Init`` every floating tensor made during ``__init__`` is turned into the training dtype
  (DeepSpeed's ``keep_in_fp32_modules`` converts named buffers back to fp32 afterwards, which keeps the rounding).

bf16 keeps 8 significant bits: an inverse frequency rounded to it is off by up to 2^-8 of itself, which turns the
rotation at position p by up to p * inv_freq * 2^-8 radians more or less than the teacher's: over a radian for the
fast components within the first thousand tokens. A hybrid's softmax layers would then attend with other positions
than the teacher's layers they copy (and than the same hybrid reloaded from its export, whose buffers are fp32
again). ``cast`` casts a model and gives its rotary embeddings their fp32 buffers back; ``fp32_rotary_buffers``
recomputes them in place (after ``zero.Init``).
"""

from __future__ import annotations

import torch
from torch import nn


def _is_rotary(module: nn.Module) -> bool:
    """A transformers rotary embedding (``<Family>RotaryEmbedding(config, device=None)``, transformers' own naming)
    whose own buffers include an ``*inv_freq``."""
    return (type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config")
            and any(name.endswith("inv_freq") for name in module._buffers))


@torch.no_grad()
def fp32_rotary_buffers(model: nn.Module) -> nn.Module:
    """Recompute the floating buffers of every rotary embedding in ``model`` as its class makes them outside any
    cast or ``zero.Init`` (fp32), each on the device its buffer is on. Call it outside ``zero.Init``."""
    for module in model.modules():
        if not _is_rotary(module):
            continue
        fresh = type(module)(module.config)  # the class's own computation, in fp32 on the CPU
        for name, buf in fresh.named_buffers(recurse=False):
            old = module._buffers.get(name)
            if old is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(device=old.device)
    return model


def cast(model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """``model.to(device, dtype)`` for the weights; rotary embeddings keep their fp32 buffers (recomputed)."""
    model = model.to(device=device, dtype=dtype)
    return fp32_rotary_buffers(model) if dtype is not None else model
