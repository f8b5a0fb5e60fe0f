"""DeepSpeed's bf16 optimizer step without reading the GPU on the host (``DS_HYBRID_OPTIMIZER_STEP``).

DeepSpeed 0.19's ``BF16_Optimizer.step`` (what ``ds_configs/student_zero1.json`` selects: ZeRO-1, bf16, fp32
gradient accumulation) reads the gradient norm on the host twice a step: ``is_invalid_grad_norm`` (a non-finite norm
skips the step) and ``clip_coef < 1`` (clip or not). The first read waits for the whole backward; the GPU then idles
while the host launches the rest of the optimizer step. This step computes the same norm on the device (a foreach
norm over the flat fp32 gradient buffers, which hold every parameter's gradient, zeros elsewhere, instead of one norm
per parameter), always scales the rank's partition of the gradients (what its optimizer steps) by
min(1, clip / (norm + 1e-6)) (exactly 1 where DeepSpeed would not clip), and runs the rest of DeepSpeed's step as it
is: the host reads nothing, and goes on queueing work.

A non-finite norm skips the step on the device: the AdamW underneath runs its fused implementation (switched on
before the first step, the same update in one kernel), which takes a ``found_inf`` flag and then leaves the weights,
both moments and its step count as they were. What DeepSpeed does on the host for a skipped step (count it, keep the
learning-rate schedule where it was) :func:`settle` does once the host reads the step's norm anyway (the trainer
logs it every step). The logged ``grad_norm`` shows the non-finite value (NaN or inf where DeepSpeed logs inf).

``DS_HYBRID_OPTIMIZER_STEP``: ``auto`` (the default) takes this step wherever it reproduces the engine's (DeepSpeed
0.19.8's ``BF16_Optimizer`` over a torch Adam/AdamW on CPU or CUDA: :func:`supports_sync_free`) and DeepSpeed's
elsewhere (ZeRO-2/3, fp32); ``sync_free`` insists (a clear error where it cannot); ``deepspeed`` keeps DeepSpeed's
step, the reference path (tests compare the two). Measured in docs/BENCHMARKS.md (2026-12-05: +1.2 to +1.5 % on
stage kl at SmolLM2's shape, the host's wait before the optimizer step gone).
"""

from __future__ import annotations

import logging
import math
import os
import types

import torch

from ds_hybrid.errors import ConfigError

log = logging.getLogger("ds_hybrid")

STEP_CHOICES = ("auto", "deepspeed", "sync_free")
#: set on an optimizer whose step :func:`apply_step_choice` replaced
MARK = "_ds_hybrid_sync_free"


def step_choice_from_env() -> str:
    """``DS_HYBRID_OPTIMIZER_STEP``: ``auto`` (default), ``deepspeed`` or ``sync_free`` (checked before any model is
    built)."""
    value = os.environ.get("DS_HYBRID_OPTIMIZER_STEP", "auto").strip() or "auto"
    if value not in STEP_CHOICES:
        raise ConfigError("DS_HYBRID_OPTIMIZER_STEP", value, f"choose one of {', '.join(STEP_CHOICES)}")
    return value


#: the DeepSpeed release whose ``BF16_Optimizer.step`` :func:`sync_free_step` reproduces
DEEPSPEED_VERSION = "0.19.8"


def _fusable(inner: object) -> bool:
    """A torch Adam/AdamW (AdamW is one) that can run fused: every parameter a floating-point tensor on CPU or CUDA,
    not differentiable."""
    if not isinstance(inner, torch.optim.Adam):
        return False
    groups = inner.param_groups
    if any(g.get("differentiable") for g in groups):
        return False
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])


def supports_sync_free(opt: object) -> bool:
    """A DeepSpeed ``BF16_Optimizer`` of :data:`DEEPSPEED_VERSION` with gradients to step, no MoE, no Muon, no model
    parallelism, over a torch Adam/AdamW that can run fused: the step this module reproduces."""
    try:
        import deepspeed
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    except ImportError:
        return False
    return (deepspeed.__version__ == DEEPSPEED_VERSION and isinstance(opt, BF16_Optimizer)
            and len(opt.fp32_groups_gradients_flat) > 0 and not opt.has_moe_layers
            and not getattr(opt, "_uses_muon", False) and opt.mpu is None and opt.norm_type == 2
            and _fusable(opt.optimizer))


def use_fused(inner: torch.optim.Adam) -> None:
    """Switch a torch Adam/AdamW to its fused implementation (what ``fused=True`` at construction sets: the same
    update, one kernel, and the ``found_inf`` flag that skips it), its step counts moved where the fused kernel keeps
    them (beside each parameter, fp32), as loading a fused optimizer's state does: also after a checkpoint written by
    DeepSpeed's step is loaded over a switched optimizer."""
    for group in inner.param_groups:
        group["fused"], group["foreach"] = True, False
    inner.defaults.update(fused=True, foreach=False)
    inner._step_supports_amp_scaling = True
    place_step_counts(inner)


def place_step_counts(inner: torch.optim.Optimizer) -> None:
    """Each parameter's Adam step count where its group's implementation keeps it, as loading an optimizer's state
    places it: beside the parameter (fp32) for the fused or capturable step, on the host (fp32) for the others. A
    group's implementation changed after a load (:func:`use_fused`; a resume that puts the run's back) moves them."""
    for group in inner.param_groups:
        near = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = inner.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if near else "cpu", dtype=torch.float32)


@torch.no_grad()
def sync_free_step(self, closure=None) -> None:
    """``BF16_Optimizer.step`` (DeepSpeed 0.19.8) with the norm's check, the clipping and a skip decided on the
    device."""
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
    torch._foreach_mul_(parts, scale)  # (a non-finite norm leaves NaNs: the fused step below reads none of them)
    for param_part, grad_part in zip(self.fp32_groups_flat_partition, self.fp32_groups_gradient_flat_partition):
        param_part.grad = grad_part.to(param_part.dtype) if grad_part.dtype != param_part.dtype else grad_part
    if not all(g.get("fused") for g in self.optimizer.param_groups):  # (a checkpoint of DeepSpeed's step loaded since)
        use_fused(self.optimizer)
    self.optimizer.found_inf = (~finite).to(torch.float32)  # the fused AdamW skips its update (and step count) at 1
    self.optimizer.step()
    if self.grad_acc_dtype is not torch.float32:
        for param_partition in self.fp32_groups_flat_partition:
            param_partition.grad = None
    self._lazy_init_hp_params_optimizer_state()
    self.update_lp_params()
    self.clear_hp_grads()


def apply_step_choice(engine, choice: str) -> bool:
    """Replace the engine's optimizer step (this instance only) where ``choice`` asks and
    :func:`supports_sync_free` says yes; ``sync_free`` where it says no is a ConfigError. Returns whether the step
    was replaced."""
    if choice == "deepspeed":
        return False
    opt = engine.optimizer
    if not supports_sync_free(opt):
        if choice == "auto":
            log.info("DS_HYBRID_OPTIMIZER_STEP=auto: DeepSpeed's own optimizer step (%s; the sync-free one reproduces "
                     "ZeRO-1's BF16_Optimizer)", type(opt).__name__)
            return False
        import deepspeed

        inner = getattr(opt, "optimizer", None)
        raise ConfigError("DS_HYBRID_OPTIMIZER_STEP", choice,
                          f"sync_free reproduces DeepSpeed {DEEPSPEED_VERSION}'s BF16_Optimizer step (ZeRO-1, bf16, "
                          f"fp32 gradient accumulation: ds_configs/student_zero1.json; no MoE or model parallelism) "
                          f"over a torch Adam/AdamW on CPU or CUDA; this engine's optimizer is {type(opt).__name__}"
                          f"{f' over {type(inner).__name__}' if inner is not None else ''} under DeepSpeed "
                          f"{deepspeed.__version__}: unset the variable or use that config")
    use_fused(opt.optimizer)
    opt.step = types.MethodType(sync_free_step, opt)
    setattr(opt, MARK, True)
    log.info("DS_HYBRID_OPTIMIZER_STEP=%s: the optimizer step reads nothing on the host", choice)
    return True


def settle(engine, grad_norm: float | None) -> bool:
    """After a step, once the host has its gradient norm (the trainer reads it for the step's metrics): where the
    sync-free step skipped on the device (a non-finite norm), do what DeepSpeed does on the host for a skipped step:
    count it (``engine.skipped_steps``) and keep the learning-rate schedule where it was (the step's scheduler
    advance undone; DeepSpeed does not advance it). Returns whether the step was one so skipped (None: no norm to
    read, not a skip)."""
    if grad_norm is None or not getattr(engine.optimizer, MARK, False) or math.isfinite(grad_norm):
        return False
    engine.skipped_steps += 1
    engine._step_applied = False  # (what engine.was_step_applied() reports, as after DeepSpeed's skip)
    sched = engine.lr_scheduler
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        sched.last_epoch -= 1
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
    elif sched is not None:
        log.warning("a step skipped for a non-finite gradient norm advanced the %s schedule by one step (DeepSpeed's "
                    "own step would not): DS_HYBRID_OPTIMIZER_STEP=deepspeed keeps it", type(sched).__name__)
    log.warning("skipped an optimizer step: the gradient norm was %s (%d skipped so far)", grad_norm,
                engine.skipped_steps)
    return True
