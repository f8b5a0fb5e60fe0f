"""Pieces every training stage shares: DeepSpeed configs, engines, parameter groups, the schedule, the teacher.

DeepSpeed JSON files are plain DeepSpeed; fields set to "auto" (or missing) are filled from the run config:
batch sizes from the stage's global/micro batch and the world size, clipping from ``clip``, bf16 from the run dtype,
ZeRO-3 bucket sizes from the hidden size H (reduce H^2, prefetch 0.9 H^2, persistence 10 H, as HF's integration).
A value set in the JSON that contradicts the run config is an error naming both. DeepSpeed's throughput timer is off
unless the JSON has a "timers" section: by default it synchronises the GPU at every forward, backward and step of
every engine (teacher included), which stalls the host behind the GPU several times per micro-batch; the trainer
measures throughput itself, once per optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ds_hybrid.config import RunConfig, StageConfig, resolve_path
from ds_hybrid import sync_free
from ds_hybrid.errors import ConfigError
from ds_hybrid.zero import full_shape


def run_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _fill(ds: dict, key: str, value: Any, field: str) -> None:
    cur = ds.get(key, "auto")
    if cur == "auto":
        ds[key] = value
    elif cur != value:
        raise ConfigError(field, cur, f"DeepSpeed's {key}={cur} contradicts the run config ({value}); set it to \"auto\"")


def deepspeed_config(path: str, s: StageConfig, world: int, dtype: torch.dtype, hidden_size: int, field: str,
                     train: bool = True) -> dict[str, Any]:
    ds = json.loads(resolve_path(path).read_text())
    gas = s.global_batch // (s.micro_batch * world)
    _fill(ds, "train_batch_size", s.global_batch, field)
    _fill(ds, "train_micro_batch_size_per_gpu", s.micro_batch, field)
    _fill(ds, "gradient_accumulation_steps", gas, field)
    if train:
        _fill(ds, "gradient_clipping", s.clip, field)
    else:
        ds.pop("gradient_clipping", None)
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = dtype == torch.bfloat16
    elif bool(bf16["enabled"]) != (dtype == torch.bfloat16):
        raise ConfigError(field, bf16["enabled"], f"bf16.enabled contradicts the run dtype {dtype}; set it to \"auto\"")
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    z = ds.setdefault("zero_optimization", {"stage": 0})
    auto_sizes = {"reduce_bucket_size": hidden_size * hidden_size,
                  "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                  "stage3_param_persistence_threshold": 10 * hidden_size}
    for k, v in auto_sizes.items():
        if z.get(k) == "auto":
            z[k] = v
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def lr_lambda(s: StageConfig, total_steps: int):
    """Multiplier of each group's base lr at a step: linear warmup, then constant / cosine / linear to min_lr_ratio."""

    def fn(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.schedule == "constant":
            return 1.0
        span = max(1, total_steps - s.warmup_steps)
        t = min(1.0, (step - s.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * t)) if s.schedule == "cosine" else 1 - t
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * decay

    return fn


_SHARD_SHAPE_DECAY = False  # see shard_shape_decay


@contextmanager
def shard_shape_decay(on: bool) -> Iterator[None]:
    """Within the block, :func:`param_groups` judges a ZeRO-3 parameter by its shard's shape (1-D: no weight decay
    for any), as ds-hybrid did before 2026-12-06: a checkpoint of that time holds an optimizer of those groups, and
    DeepSpeed loads it only into the same groups."""
    global _SHARD_SHAPE_DECAY
    was, _SHARD_SHAPE_DECAY = _SHARD_SHAPE_DECAY, on
    try:
        yield
    finally:
        _SHARD_SHAPE_DECAY = was


def param_groups(named: Iterable[tuple[str, nn.Parameter]], s: StageConfig) -> list[dict[str, Any]]:
    """Attention/mixer parameters (any `.self_attn.`, or all for align) at ``lr``, the rest at ``lr_rest``; no
    weight decay on vectors (norms, biases, A_log, dt_bias). Parameters with lr 0 are frozen, not grouped."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in named:
        is_attn = ".self_attn." in f".{name}" or name.startswith("mixers.")
        lr = s.lr if is_attn else s.lr_rest
        if lr == 0:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        shape = p.shape if _SHARD_SHAPE_DECAY else full_shape(p)
        decay = len(shape) >= 2 and not getattr(p, "_no_weight_decay", False)
        groups.setdefault(("attn" if is_attn else "rest", decay), []).append(p)
    out = []
    for (kind, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": s.lr if kind == "attn" else s.lr_rest,
                    "weight_decay": s.weight_decay if decay else 0.0, "name": f"{kind}{'' if decay else '_nodecay'}"})
    if not out:
        raise ConfigError("lr", 0, "every parameter has learning rate 0: nothing would train")
    return out


def student_engine(module: nn.Module, ds: dict, s: StageConfig, total_steps: int):
    import deepspeed

    groups = param_groups(module.named_parameters(), s)
    opt = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay)
    sched_fn = lr_lambda(s, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=opt, config=ds,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, sched_fn),
    )
    sync_free.apply_step_choice(engine, sync_free.step_choice_from_env())
    return engine


#: what a resume takes from the run config, not from the checkpoint, in each optimizer group (with its base lr); fused
#: and foreach: the step's implementation (a checkpoint of the sync-free step, fused, resumed under
#: DS_HYBRID_OPTIMIZER_STEP=deepspeed ran torch's fused AdamW where the reference path is its default one)
GROUP_SETTINGS = ("weight_decay", "betas", "eps", "fused", "foreach")


def optimizer_settings(engine) -> dict[str, Any] | None:
    """The student's optimizer settings as the run config built them (before a checkpoint is loaded): each group's
    base learning rate, weight decay, betas and eps, by group name. None for an engine without our scheduler."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "base_lrs") or not hasattr(sched, "lr_lambdas"):
        return None
    groups = sched.optimizer.param_groups
    return {"base_lrs": list(sched.base_lrs),
            "groups": [{"name": g.get("name"), **{k: _plain(g.get(k)) for k in GROUP_SETTINGS}} for g in groups]}


def _plain(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def restore_optimizer_settings(engine, fresh: dict[str, Any] | None) -> list[str]:
    """After a checkpoint's load, put the run config's optimizer settings back (DeepSpeed restores the checkpoint's:
    each group's lr, weight decay, betas and eps, and the scheduler's base rates), the learning rate of the resumed
    step recomputed from the schedule; what changed, as "group: what was -> what is". A resume after "lower the
    learning rate" then runs at the lower one. Groups of other names (a checkpoint of another parameter grouping,
    which DeepSpeed would not have loaded) are left as loaded. The gradient clipping too: ZeRO-1/2's optimizers (and
    DeepSpeed's bf16 one) take the checkpoint's ``clip_grad`` on load, where the engine's config holds the run
    config's (``check_resume`` reports the change)."""
    opt, clip = getattr(engine, "optimizer", None), getattr(engine, "gradient_clipping", None)
    if opt is not None and hasattr(opt, "clip_grad") and callable(clip):
        opt.clip_grad = clip()
    if fresh is None:
        return []
    sched = engine.lr_scheduler
    groups = sched.optimizer.param_groups
    if [g.get("name") for g in groups] != [g["name"] for g in fresh["groups"]]:
        return []
    changed = []
    for i, (g, want, base) in enumerate(zip(groups, fresh["groups"], fresh["base_lrs"])):
        if sched.base_lrs[i] != base:
            changed.append(f"{g.get('name')}: lr {sched.base_lrs[i]:g} -> {base:g}")
        sched.base_lrs[i] = base
        g["initial_lr"] = base
        for k in GROUP_SETTINGS:
            if _plain(g.get(k)) != want[k]:
                changed.append(f"{g.get('name')}: {k} {_plain(g.get(k))} -> {want[k]}")
            g[k] = want[k]
        g["lr"] = base * sched.lr_lambdas[i](sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]
    inner = getattr(sched.optimizer, "optimizer", sched.optimizer)  # (DeepSpeed's wrapper's torch optimizer)
    if isinstance(inner, torch.optim.Optimizer):
        sync_free.place_step_counts(inner)
    return changed


def frozen_engine(module: nn.Module, ds: dict):
    """An engine with no optimizer, for the teacher: under ZeRO-3 each rank keeps only its parameter shard."""
    import deepspeed

    for p in module.parameters():
        p.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds)
    engine.eval()
    return engine


class TeacherTrunk(nn.Module):
    """The frozen teacher without its lm_head matmul: returns the final hidden states (and, for stage align, each
    layer's attention input and output, captured by hooks on ``self_attn``).

    The hooks are registered once, at the first capturing forward, and are excluded from torch.compile: a hook traced
    inside a compiled block is a different closure per layer (and per call), so every one of the 30 blocks
    recompiled until dynamo's limit of 8 sent the rest back to eager (seen on an H200: most of the teacher ran
    uncompiled in stage align). Now each block compiles once, with a graph break around the hook."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher
        self._sink: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._hooked = False

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.teacher.lm_head.weight

    @torch.compiler.disable
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._sink is not None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._sink.append((x.detach(), output[0].detach()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, capture: bool = False):
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        if capture and not self._hooked:
            for layer in self.teacher.model.layers:
                layer.self_attn.register_forward_hook(self._capture, with_kwargs=True)
            self._hooked = True
        self._sink = captured if capture else None
        try:
            with torch.no_grad(), unpacked_rows():
                out = self.teacher.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self._sink = None
        return out.last_hidden_state, captured


def _not_packed(position_ids: torch.Tensor) -> None:
    return None


@contextmanager
def unpacked_rows() -> Iterator[None]:
    """Within the block, transformers' masks take every row as one sequence without reading the GPU.

    A forward without an attention mask and without a cache makes transformers look for packed sequences (position
    ids that restart inside a row: ``masking_utils.find_packed_sequence_indices``) and read the answer on the host:
    one sync with the GPU per forward, teacher and student, every micro-batch, each of which leaves the GPU idle while
    the host launches the next kernels. Training rows here never restart their positions (no position ids are
    passed: the model's own 0..T-1), so the answer is known: not packed. Forwards given a mask or a cache never ask.
    """
    from transformers import masking_utils

    found = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = _not_packed
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found


def wants_compile(s: StageConfig, ds: dict) -> bool:
    """Whether a stage compiles the blocks of an engine with DeepSpeed config ``ds`` (``compile``: true/false/auto)."""
    if zero_stage(ds) >= 3:
        return False
    return s.compile is True or (s.compile == "auto" and torch.cuda.is_available())


def compile_backend() -> str:
    """``DS_HYBRID_COMPILE_BACKEND`` (default inductor; tests use aot_eager on CPU): training stages' compiled blocks
    and ``GraphDecoder(compile=True)``'s decode step."""
    import os

    return os.environ.get("DS_HYBRID_COMPILE_BACKEND", "inductor")


#: Inductor modes that compose with DeepSpeed's engines and fla (the CUDA-graph modes do not: they need static
#: addresses, which the engines' gradient buffers and fla's autotuned launches do not keep)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_options() -> dict:
    """torch.compile arguments of the training stages: ``DS_HYBRID_COMPILE_BACKEND`` (default inductor; tests use
    aot_eager on CPU) and ``DS_HYBRID_COMPILE_MODE`` (default; ``max-autotune-no-cudagraphs`` lets Inductor time
    Triton GEMM templates with fused epilogues against cuBLAS: minutes more compiling, for throughput experiments)."""
    import os

    mode = os.environ.get("DS_HYBRID_COMPILE_MODE", "default")
    if mode not in COMPILE_MODES:
        raise ConfigError("DS_HYBRID_COMPILE_MODE", mode, f"choose one of {', '.join(COMPILE_MODES)}")
    options: dict = {"backend": compile_backend(), "dynamic": False}
    if mode != "default" and options["backend"] == "inductor":
        options["mode"] = mode
    return options


#: which fused attention kernel SDPA may use in training ("auto": torch's own order, cuDNN first on Hopper)
SDPA_CHOICES = ("auto", "flash", "cudnn", "efficient")


def apply_sdpa_choice() -> str:
    """``DS_HYBRID_SDPA``: restrict SDPA to one fused kernel (plus the math fallback for shapes it cannot run), for
    throughput experiments; "auto" (default) changes nothing. Checked before any model is built."""
    import os

    choice = os.environ.get("DS_HYBRID_SDPA", "auto")
    if choice not in SDPA_CHOICES:
        raise ConfigError("DS_HYBRID_SDPA", choice, f"choose one of {', '.join(SDPA_CHOICES)}")
    if choice != "auto":
        torch.backends.cuda.enable_cudnn_sdp(choice == "cudnn")
        torch.backends.cuda.enable_flash_sdp(choice == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(choice == "efficient")
    return choice


def compile_blocks(layers: Iterable[nn.Module]) -> int:
    """``compile: true``: torch.compile every transformer block in place (state-dict keys unchanged). Blocks of one
    class share compiled code (parameters are graph inputs, not constants), so a 30-layer model compiles each block
    kind once. Backend and mode: :func:`compile_options`."""
    options = compile_options()
    n = 0
    for layer in layers:
        layer.compile(**options)
        n += 1
    return n


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    from ds_hybrid.zero import full_shape

    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += math.prod(full_shape(p))
    return n


def matmul_params(model: nn.Module, config, lm_head_runs: bool) -> int:
    """The parameters a forward of ``model`` multiplies by (MFU's 2N per token): all but the embedding rows (a
    lookup), the LM head's only where it runs (``lm_head_runs``; a tied head is the embedding matrix, counted once)."""
    emb = config.vocab_size * config.hidden_size
    n = count_params(model) - emb
    if config.tie_word_embeddings:
        return n + (emb if lm_head_runs else 0)
    return n - (0 if lm_head_runs else emb)


def grad_norm_before_step(engine) -> float | None:
    """The global gradient norm at an accumulation boundary, read before ``engine.step()`` clips and clears it.

    DeepSpeed's own optimizer wrappers keep it (ZeRO's, and the bf16/fp16 wrapper used without ZeRO: read after the
    step through ``engine.get_global_grad_norm()``); only a plain optimizer (fp32 without ZeRO) clips without keeping
    the value, so only then is it computed here from the (already all-reduced) gradients.
    """
    if engine.zero_optimization_stage() > 0 or not engine.is_gradient_accumulation_boundary():
        return None
    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    sq = [p.grad.detach().float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def check_env_knobs() -> None:
    """The throughput knobs read from the environment (docs/TRAINING.md), checked before any model is built, whatever
    the stage (a typo in stage align's knobs is refused in stage kl too; stage select's probes are kl runs)."""
    from ds_hybrid.modeling import stacked

    sdpa, compile_opts = apply_sdpa_choice(), compile_options()
    if sdpa != "auto" or "mode" in compile_opts:
        logging.getLogger("ds_hybrid").info("DS_HYBRID_SDPA=%s, torch.compile mode %s", sdpa,
                                            compile_opts.get("mode", "default"))
    for check in (stacked.stacked_choice_from_env, stacked.pass_elements_from_env, stacked.layout_from_env,
                  sync_free.step_choice_from_env):
        check()
