"""DeepSpeed's bf16 optimizer step without reading the GPU on the host (``DS_HYBRID_OPTIMIZER_STEP=sync_free``).

DeepSpeed 0.19's ``BF16_Optimizer.step`` (what ``ds_configs/student_zero1.json`` selects: ZeRO-1, bf16, fp32
gradient accumulation) reads the gradient norm on the host twice a step: ``is_invalid_grad_norm`` (a non-finite norm
skips the step) and ``clip_coef < 1`` (clip or not). The first read waits for the whole backward; the GPU then idles
while the host launches the rest of the optimizer step. This step computes the same norm on the device (a foreach
norm over the flat fp32 gradient buffers, which hold every parameter's gradient, zeros elsewhere, instead of one norm
per parameter), always scales the rank's partition of the gradients (what its optimizer steps) by
min(1, clip / (norm + 1e-6)) (exactly 1 where DeepSpeed would not clip), and runs the rest of DeepSpeed's step as it
is: the host reads nothing, and goes on queueing work.

Where the norm is not finite the two differ: DeepSpeed skips the step (weights, AdamW's state and the learning-rate
schedule stay; the engine counts a skipped step); here the gradients are zeroed and the step runs on them: no
gradient enters the weights, but AdamW's momentum moves them once more, weight decay applies, its step count and
the schedule advance, and nothing is counted as skipped. The logged ``grad_norm`` shows the non-finite value (NaN
or inf where DeepSpeed logs inf). The step is DeepSpeed 0.19.8's (``supports_sync_free`` checks the version).
Opt-in until a GPU run measures it (docs/BENCHMARKS.md); DeepSpeed's own step is the reference path (tests compare
the two).
"""

from __future__ import annotations

import logging
import os
import types

import torch

from ds_hybrid.errors import ConfigError

log = logging.getLogger("ds_hybrid")

STEP_CHOICES = ("deepspeed", "sync_free")


def step_choice_from_env() -> str:
    """``DS_HYBRID_OPTIMIZER_STEP``: ``deepspeed`` (default) or ``sync_free`` (checked before any model is built)."""
    value = os.environ.get("DS_HYBRID_OPTIMIZER_STEP", "deepspeed").strip() or "deepspeed"
    if value not in STEP_CHOICES:
        raise ConfigError("DS_HYBRID_OPTIMIZER_STEP", value, f"choose one of {', '.join(STEP_CHOICES)}")
    return value


#: the DeepSpeed release whose ``BF16_Optimizer.step`` :func:`sync_free_step` reproduces
DEEPSPEED_VERSION = "0.19.8"


def supports_sync_free(opt: object) -> bool:
    """A DeepSpeed ``BF16_Optimizer`` of :data:`DEEPSPEED_VERSION` with gradients to step, no MoE, no Muon, no model
    parallelism: the step this module reproduces."""
    try:
        import deepspeed
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    except ImportError:
        return False
    return (deepspeed.__version__ == DEEPSPEED_VERSION and isinstance(opt, BF16_Optimizer)
            and len(opt.fp32_groups_gradients_flat) > 0 and not opt.has_moe_layers
            and not getattr(opt, "_uses_muon", False) and opt.mpu is None and opt.norm_type == 2)


@torch.no_grad()
def sync_free_step(self, closure=None) -> None:
    """``BF16_Optimizer.step`` (DeepSpeed 0.19.8) with the norm's check and the clipping decided on the device."""
    if closure is not None:
        raise NotImplementedError(f"{type(self).__name__} does not support closure.")
    self.overflow = False
    # every rank holds the reduced gradients of all parameters (the norm's input); its optimizer steps its partition
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(self.fp32_groups_gradients_flat))))
    self._global_grad_norm = norm
    finite = torch.isfinite(norm)
    scale = torch.where(finite, torch.clamp(self.clip_grad / (norm + 1e-6), max=1.0) if self.clip_grad > 0.0
                        else torch.ones_like(norm), torch.zeros_like(norm))
    parts = list(self.fp32_groups_gradient_flat_partition)
    torch._foreach_mul_(parts, scale)
    for g in parts:  # a non-finite norm: 0 x inf or NaN is NaN, so zero those too
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    for param_part, grad_part in zip(self.fp32_groups_flat_partition, self.fp32_groups_gradient_flat_partition):
        param_part.grad = grad_part.to(param_part.dtype) if grad_part.dtype != param_part.dtype else grad_part
    self.optimizer.step()
    if self.grad_acc_dtype is not torch.float32:
        for param_partition in self.fp32_groups_flat_partition:
            param_partition.grad = None
    self._lazy_init_hp_params_optimizer_state()
    self.update_lp_params()
    self.clear_hp_grads()


def apply_step_choice(engine, choice: str) -> bool:
    """``sync_free``: replace the engine's optimizer step (this instance only); a ConfigError where
    :func:`supports_sync_free` says no. Returns whether the step was replaced."""
    if choice != "sync_free":
        return False
    opt = engine.optimizer
    if not supports_sync_free(opt):
        import deepspeed

        raise ConfigError("DS_HYBRID_OPTIMIZER_STEP", choice,
                          f"sync_free reproduces DeepSpeed {DEEPSPEED_VERSION}'s BF16_Optimizer step (ZeRO-1, bf16, "
                          f"fp32 gradient accumulation: ds_configs/student_zero1.json; no MoE or model parallelism); "
                          f"this engine's optimizer is {type(opt).__name__} under DeepSpeed {deepspeed.__version__}: "
                          f"unset the variable or use that config")
    opt.step = types.MethodType(sync_free_step, opt)
    log.info("DS_HYBRID_OPTIMIZER_STEP=sync_free: the optimizer step reads nothing on the host")
    return True
