"""What the trainer needs from a stage, and how a stage gets its models."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ds_hybrid import distributed as D
from ds_hybrid.config import RunConfig, StageConfig
from ds_hybrid.errors import ConfigError
from ds_hybrid.hf_io import SafetensorsReader, fill_causal_lm, fill_module
from ds_hybrid.modeling import HybridConfig, HybridForCausalLM
from ds_hybrid.modeling.families import layer_rest
from ds_hybrid.modeling.mixers import LinearMixer, MixerOptions
from ds_hybrid.modeling.precision import cast, fp32_rotary_buffers
from ds_hybrid.selection import tensors_fingerprint
from ds_hybrid.stages.common import TeacherTrunk, deepspeed_config, frozen_engine, run_dtype, zero_stage
from ds_hybrid.zero import gathered, is_partitioned, zero3_init


@dataclass
class StageContext:
    cfg: RunConfig
    stage: str
    s: StageConfig
    tokenizer: Any
    teacher_path: str  # local HF folder of the teacher
    teacher_config: Any
    softmax_layers: list[int]
    total_steps: int
    run_dir: Path
    # the teacher's tensors fingerprint (:func:`teacher_weights`, the main rank's reading for all), recorded in every
    # hybrid export (HybridConfig.teacher_weights) and compared with an init_from's; None: not checked
    teacher_weights: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return run_dtype(self.cfg)

    @property
    def device(self) -> torch.device:
        return D.device()

    def ds_config(self, train: bool = True) -> dict:
        field = f"{self.stage}.ds_config" if train else f"{self.stage}.teacher_ds_config"
        return deepspeed_config(self.s.ds_config if train else self.s.teacher_ds_config, self.s, D.world_size(),
                                self.dtype, self.teacher_config.hidden_size, field, train=train)


@functools.lru_cache(maxsize=4)
def teacher_weights(folder: str) -> str | None:
    """:func:`tensors_fingerprint` of a teacher folder (read once per process: a few hundred bytes a tensor)."""
    return tensors_fingerprint(folder)


def strided_share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Rank ``rank``'s share of ``n`` items dealt round-robin: (indices, how many are real). Every rank gets
    ceil(n / world) indices so that per-item work with collectives inside (ZeRO-3's gathers) lines up; a rank short
    of items is padded with index 0 at the end, to run and not count."""
    mine = list(range(rank, n, world))
    per_rank = max(1, -(-n // world))
    return mine + [0] * (per_rank - len(mine)), len(mine)


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows a stage scores. ``every``: all n of them, the same on every rank (stage kl's recall rows are
    made from its first ones); ``rows``: this rank's :func:`strided_share` ([1, seq_len] each), of which only
    ``rows[:real]`` count. A stage's scores are means over the n rows whatever the world size: one GPU and eight
    report the same held-out numbers for the same run, up to summation order."""

    every: Any  # indexable by a list of row indices, as PackedSequences is
    rows: list[torch.Tensor]
    real: int

    @classmethod
    def share(cls, every, rank: int, world: int) -> HeldOut:
        idx, real = strided_share(len(every), rank, world)
        return cls(every, [every[[i]] for i in idx], real)


class Stage:
    """One training stage. The trainer calls setup, then train_step per optimizer step, evaluate, export."""

    name = "stage"
    engines: dict[str, Any]
    grad_norm: float | None = None  # set by train_step where DeepSpeed does not keep it
    # set by the trainer before each train_step: (the next step's index, a function that gives that step's
    # micro-batches on the device, or None after the last step); stages may start work for it early
    next_batches: tuple[int, Callable[[], list[torch.Tensor]] | None] | None = None

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.engines = {}

    def check(self) -> None:
        """What the stage can refuse from config files alone, before the data is tokenized or a model is built
        (the trainer calls it first; stages that need nothing more leave it empty)."""

    def setup(self) -> None:
        raise NotImplementedError

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, held: HeldOut) -> dict[str, float]:
        raise NotImplementedError

    def export(self, out_dir: Path) -> None:
        raise NotImplementedError

    def flops_per_token(self) -> float:
        return 0.0

    def lr_metrics(self) -> dict[str, float]:
        """The learning rate the next optimizer step will use (a stage's train_step reads it before that step, so
        that each step logs its own)."""
        return {"lr": self.engine.get_lr()[0]}


# ---- models ------------------------------------------------------------------------------------------------------
def build_teacher_engine(ctx: StageContext):
    """The frozen teacher in its own engine. Under ZeRO-3 it is built straight into partitions and filled from its
    safetensors one module at a time (rank 0 reads, DeepSpeed scatters), so no rank holds it whole."""
    ds = ctx.ds_config(train=False)
    if zero_stage(ds) == 3:
        config = AutoConfig.from_pretrained(ctx.teacher_path, **_attn_kw(ctx.cfg.attn_implementation))
        with zero3_init(ds, ctx.dtype):
            teacher = AutoModelForCausalLM.from_config(config, dtype=ctx.dtype)
        fp32_rotary_buffers(teacher)  # zero.Init made them bf16 (modeling/precision.py)
        teacher.tie_weights()
        fill_causal_lm(teacher, SafetensorsReader(ctx.teacher_path))
    else:
        teacher = AutoModelForCausalLM.from_pretrained(ctx.teacher_path, dtype=ctx.dtype,
                                                       **_attn_kw(ctx.cfg.attn_implementation))
        teacher.to(ctx.device)
    return frozen_engine(TeacherTrunk(teacher), ds)


def _attn_kw(impl: str | None) -> dict:
    return {"attn_implementation": impl} if impl else {}


def with_attn_implementation(config: HybridConfig, impl: str | None) -> HybridConfig:
    """The run's ``attn_implementation`` for the hybrid's softmax layers too (it reached the teacher only: the
    student's ran transformers' default whatever the run asked)."""
    if impl:
        config.teacher_config._attn_implementation = impl
    return config


@torch.no_grad()
def init_mixer_from_reader(mixer: LinearMixer, reader: SafetensorsReader, layer: int, num_kv_heads: int) -> None:
    """RADLADS stage 0 for one mixer, reading the teacher's attention weights from its safetensors."""
    prefix = f"model.layers.{layer}.self_attn."

    def proj(name: str) -> types.SimpleNamespace:
        bias = f"{prefix}{name}.bias"
        return types.SimpleNamespace(weight=reader.get(f"{prefix}{name}.weight"),
                                     bias=reader.get(bias) if bias in reader else None)

    params = list(mixer.parameters())
    with gathered(params, modifier_rank=0):
        if any(is_partitioned(p) for p in params) and not D.is_main():
            return
        attn = types.SimpleNamespace(q_proj=proj("q_proj"), k_proj=proj("k_proj"), v_proj=proj("v_proj"),
                                     o_proj=proj("o_proj"))
        mixer.init_from_teacher(attn, num_kv_heads)


FROM_TEACHER = "teacher"  # init_from value: start from RADLADS stage 0 (the teacher's weights), skipping align


def check_init_from(ctx: StageContext, init_from: str | Path, field: str) -> HybridConfig | None:
    """``init_from``'s hybrid config after the checks that need no model (called before the teacher is built): an HF
    export of a hybrid of this teacher, with the run's mixer and mixer options, none of whose softmax layers the run
    makes linear. None for ``init_from="teacher"``."""
    if str(init_from) == FROM_TEACHER:
        return None
    init_from = Path(init_from)
    if not (init_from / "config.json").is_file():
        raise ConfigError(field, str(init_from), "no HF export there: run the previous stage first, or point at "
                                                 "a stage's hf/ folder")
    src_cfg = AutoConfig.from_pretrained(init_from)
    if not isinstance(src_cfg, HybridConfig):
        raise ConfigError(field, str(init_from), f"holds a {src_cfg.model_type} model, not a ds_hybrid hybrid")
    if src_cfg.mixer != ctx.cfg.mixer:
        raise ConfigError("mixer", ctx.cfg.mixer, f"{init_from} was trained with mixer {src_cfg.mixer!r}; use the same")
    theirs, ours = src_cfg.teacher_config, ctx.teacher_config
    shape = ("vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim")  # (a teacher of the same depth and vocabulary, another width: a raw
    for key in shape:                            # shape error once the weights were read)
        if getattr(theirs, key, None) != getattr(ours, key, None):
            raise ConfigError(field, str(init_from), f"was made from a different teacher ({key} "
                              f"{getattr(theirs, key, None)} there, {getattr(ours, key, None)} in this run's "
                              f"teacher): start from an export of this teacher's runs")
    if src_cfg.teacher_weights and ctx.teacher_weights and src_cfg.teacher_weights != ctx.teacher_weights:
        raise ConfigError(field, str(init_from), f"was made from a teacher of these shapes with other weights "
                          f"(fingerprint {src_cfg.teacher_weights} there, {ctx.teacher_weights} for this run's "
                          f"teacher, {ctx.teacher_path}): start from an export of this teacher's runs")
    # the mixers' weights come from init_from, so its options are the ones they were trained with: a run that asks
    # for others (e.g. mixer_options.use_gate: false after an align with the gate) is refused, not silently ignored;
    # `backend` only picks the kernels and is the run's own
    run_opts, src_opts = MixerOptions.from_dict(ctx.cfg.mixer_options), src_cfg.options
    if differ := run_opts.differences(src_opts, src_cfg.mixer):
        name = differ[0]
        raise ConfigError(f"mixer_options.{name}", getattr(run_opts, name),
                          f"{init_from} was trained with {name}={getattr(src_opts, name)!r}; set the same, or run "
                          "the earlier stages again with these options")
    if removed := sorted(set(src_cfg.softmax_layers) - set(ctx.softmax_layers)):
        raise ConfigError("softmax_layers", ctx.softmax_layers,
                          f"layer {removed[0]} is softmax in {init_from} and would become linear here; a stage can "
                          "only restore softmax layers, not remove them (start from the align export)")
    return src_cfg


def load_hybrid(ctx: StageContext, init_from: str | Path, field: str) -> HybridForCausalLM:
    """A hybrid with ``ctx.softmax_layers``, filled from ``init_from`` (a previous stage's HF export, checked by
    :func:`check_init_from`); a layer that is softmax here but linear there takes the teacher's attention (the
    selected layers "restored"). ``init_from="teacher"`` builds it by stage-0 transfer straight from the teacher's
    safetensors instead."""
    from ds_hybrid.transfer import hybrid_config

    src_cfg = check_init_from(ctx, init_from, field)
    if src_cfg is None:
        return _hybrid_from_teacher(ctx)
    init_from = Path(init_from)
    # mixer options: init_from's (equal to the run's but for the kernels' backend, which is the run's)
    options = {**src_cfg.options.to_dict(), "backend": MixerOptions.from_dict(ctx.cfg.mixer_options).backend}
    config = hybrid_config(ctx.teacher_config, ctx.softmax_layers, src_cfg.mixer, options, ctx.teacher_weights)
    src, teacher = SafetensorsReader(init_from), SafetensorsReader(ctx.teacher_path)

    def mixer(i: int, layer: nn.Module, student: HybridForCausalLM) -> None:
        restored = i in config.softmax_layers and i not in src_cfg.softmax_layers
        fill_module(layer.self_attn, f"model.layers.{i}.self_attn.", teacher if restored else src)

    return _build_student(ctx, config, src, mixer)


def _hybrid_from_teacher(ctx: StageContext) -> HybridForCausalLM:
    """RADLADS stage 0 under any ZeRO stage: every module but the linear mixers copied from the teacher's
    safetensors, each mixer initialised from its layer's attention (fresh gates/decays, same seed on every rank)."""
    from ds_hybrid.transfer import hybrid_config

    tc = ctx.teacher_config
    config = hybrid_config(tc, ctx.softmax_layers, ctx.cfg.mixer, ctx.cfg.mixer_options, ctx.teacher_weights)
    teacher = SafetensorsReader(ctx.teacher_path)

    def mixer(i: int, layer: nn.Module, student: HybridForCausalLM) -> None:
        if i in config.softmax_layers:
            fill_module(layer.self_attn, f"model.layers.{i}.self_attn.", teacher)
        else:
            fresh_init(student, layer.self_attn, ctx.cfg.seed * 100_003 + i)
            init_mixer_from_reader(layer.self_attn, teacher, i, tc.num_key_value_heads)

    return _build_student(ctx, config, teacher, mixer)


def _build_student(ctx: StageContext, config: HybridConfig, src: SafetensorsReader, fill_mixer) -> HybridForCausalLM:
    """Build the hybrid (under ZeRO-3: straight into partitions), fill everything but the token mixers from ``src``
    module by module, and each layer's mixer with ``fill_mixer(i, layer, student)``."""
    ds = ctx.ds_config()
    with_attn_implementation(config, ctx.cfg.attn_implementation)
    with zero3_init(ds, ctx.dtype):
        student = HybridForCausalLM(config)
    if zero_stage(ds) == 3:
        fp32_rotary_buffers(student)  # as the teacher's (modeling/precision.py)
        student.tie_weights()
    else:
        student = cast(student, ctx.dtype)
    fill_module(student.model.embed_tokens, "model.embed_tokens.", src)
    fill_module(student.model.norm, "model.norm.", src)
    if not config.tie_word_embeddings:
        fill_module(student.lm_head, "lm_head.", src)
    for i, layer in enumerate(student.model.layers):
        for name, m in layer_rest(layer).items():
            fill_module(m, f"model.layers.{i}.{name}.", src)
        fill_mixer(i, layer, student)
    return student if zero_stage(ds) == 3 else student.to(ctx.device)


@torch.no_grad()
def fresh_init(model: HybridForCausalLM, mixer: LinearMixer, seed: int) -> None:
    """The model's own init (HF's std-0.02 normal + fla's A_log / dt_bias) for one mixer, drawn from ``seed`` on the
    whole parameters. Needed under ZeRO-3: a model built inside zero.Init is partitioned before HF's post_init runs,
    so parameters it never fills afterwards hold uninitialised memory."""
    params = list(mixer.parameters())
    with gathered(params, modifier_rank=0):
        if any(is_partitioned(p) for p in params) and not D.is_main():
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in mixer.modules():
                model._init_weights(m)


def hybrid_export_groups(model: HybridForCausalLM) -> list[list[tuple[str, nn.Module]]]:
    head = [("model.embed_tokens.", model.model.embed_tokens), ("model.norm.", model.model.norm)]
    if not model.config.tie_word_embeddings:
        head.append(("lm_head.", model.lm_head))
    return [head] + [[(f"model.layers.{i}.", layer)] for i, layer in enumerate(model.model.layers)]
