"""Per-GPU memory plan of a stage before launching it (``ds-hybrid plan``), printed again at the start of every run.

    ds-hybrid plan --config runs/llama3_70b_gdn.yaml --nodes 4 --gpus-per-node 8 [--stage kl] [--gpu-gib 80]

Terms, per GPU, for world size W (bytes; b = 2 for bf16, 4 for fp32; P = parameters counted exactly from the
model built on the meta device):

| term | ZeRO-3 | ZeRO-2 |
|---|---|---|
| teacher shards | b P_teacher / W (0 on the GPU with CPU offload) | (teacher is always ZeRO-3 or whole) |
| teacher working set | gathered layers: 2 x largest teacher layer x b (current + prefetch), or its LM head (V h b, gathered for the loss) where larger | - |
| student working set | as the teacher's, of the student's layers and LM head | - |
| student parameters | b P_student / W | b P_student |
| gradients | b P_trainable / W | b P_trainable / W (ZeRO-1 with fp32 accumulation: 4 P_trainable) |
| optimizer states | 12 P_trainable / W (fp32 master, Adam m and v) | same |
| activations | per micro-batch of n = micro_batch x seq_len tokens, bytes per layer: softmax n (18 h + 6 i) b/2, linear n (54 h + 6 i) b/2 (compiled blocks: 12 h + 4 i, 36 h + 4 i), mixer alone (align) 28 n h b/2 + the captured 4 n h (stacked, GPUs: 48 n h b/2); with checkpointing 2 n h L + one layer's. For attention width d = h and two norms a layer; other shapes (Gemma 3, Qwen3): terms in d - h, extra norms and fla's chunk states, in make_plan | |
| KL workspace | 2 C V b (16-bit logits, student and teacher; x 4 with kl.fp32_logits true) + V h b (dW; + 4 V h, its fp32 accumulator, where n > C with 16-bit weights; the torch reference: + 8 V h) + 2 n h b (hidden states), C = loss_chunk_tokens (the Triton kernel writes dL/dz over the student logits); kl_backend torch: 4 fp32 C V workspaces (5 with CE) instead of the logits | |
| framework | 1.5 GiB (CUDA context, NCCL, allocator slack) | |

The activation and framework terms are estimates (Korthikanti et al.'s per-layer count adapted to SwiGLU MLPs and
flash attention, which stores no [s x s] scores); parameters, gradients and optimizer states are exact up to
DeepSpeed's alignment padding (checked against the engines' tensors in tests/test_plan.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ds_hybrid.config import TRAIN_STAGES, RunConfig, checkpoint_due, load_config, resolve_path, stage_steps
from ds_hybrid.errors import ConfigError

GIB = 2**30
FRAMEWORK_BYTES = int(1.5 * GIB)
# micro_batch: auto keeps the plan under this fraction of the device's memory: the activation terms are estimates
# (measured peaks have come within ~10 % of the plan), and the allocator needs slack for fragmentation.
AUTO_MEMORY_FRACTION = 0.85
NOT_TERMS = ("stage", "world", "gpu_gib", "micro_batch", "checkpoint_bytes")


@dataclass
class ModelCounts:
    teacher: int
    student: int
    trainable: int
    largest_teacher_layer: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    attn_width: int = 0  # query heads x head dim (the mixers' q/k/v/o width); 0: = hidden
    head_dim: int = 0  # 0: 64
    norms_per_layer: int = 2  # hidden-size norms in a decoder layer (Llama 2, Gemma 3 4)
    largest_student_layer: int = 0  # the student engine's largest layer (align: mixer); 0: the teacher's


@dataclass
class Plan:
    stage: str
    world: int
    gpu_gib: float
    micro_batch: int
    teacher_shards: int
    teacher_working_set: int
    student_params: int
    student_working_set: int
    gradients: int
    optimizer_states: int
    activations: int
    kl_workspace: int
    framework: int
    checkpoint_bytes: int = 0  # on disk, all ranks together (not GPU memory)
    reduce_buckets: int = 0  # ZeRO-2's gradient reduction buckets (contiguous_gradients; two with overlap_comm)

    @property
    def total(self) -> int:
        return sum(v for k, v in asdict(self).items() if k not in NOT_TERMS)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib * GIB

    def table(self) -> str:
        rows = [(k, v) for k, v in asdict(self).items() if k not in NOT_TERMS]
        out = [f"memory plan per GPU: stage {self.stage}, {self.world} GPUs, micro-batch {self.micro_batch}",
               "| term | GiB |", "|---|---|"]
        out += [f"| {k.replace('_', ' ')} | {v / GIB:.2f} |" for k, v in rows]
        out.append(f"| **total** | **{self.total / GIB:.2f}** of {self.gpu_gib:g} -> {'fits' if self.fits else 'DOES NOT FIT'} |")
        out.append(f"checkpoint on disk: about {self.checkpoint_bytes / GIB:.2f} GiB each (all ranks; keep_checkpoints "
                   "of them are kept)")
        return "\n".join(out)


def schedule_line(cfg: RunConfig, stage: str) -> str:
    """A stage's steps and checkpoints, as its run will take them (what a token budget means at the config's batch)."""
    s = getattr(cfg, stage)
    steps = stage_steps(s)
    line = (f"steps: {steps:,} ({s.tokens:,} tokens at {s.global_batch} x {s.seq_len} a step); checkpoints: ")
    if not s.ckpt_every:
        return line + "none (ckpt_every 0)"
    at_end = checkpoint_due(steps, steps, s)
    saves = (steps - 1) // s.ckpt_every + int(at_end) if steps else 0  # (config.checkpoint_due's count, closed form)
    line += f"{saves:,} (every {s.ckpt_every:,} steps{' and at the end' if at_end else ''})"
    if saves > 100:
        line += f": many; raise {stage}.ckpt_every (each is the size above)"
    return line


def count_models(teacher_config, cfg: RunConfig, stage: str, softmax_layers: list[int]) -> ModelCounts:
    """Exact parameter counts from the models built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    from ds_hybrid.modeling import HybridForCausalLM
    from ds_hybrid.stages.common import param_groups
    from ds_hybrid.transfer import hybrid_config

    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(teacher_config)
        hcfg = hybrid_config(teacher_config, [] if stage == "align" else softmax_layers, cfg.mixer, cfg.mixer_options)
        student = HybridForCausalLM(hcfg)

    def n(params) -> int:
        return sum(p.numel() for p in {id(p): p for p in params}.values())

    s = cfg.stage(stage)
    if stage == "align":  # only the mixers exist in the student engine, and all of them train
        mixers = [layer.self_attn for layer in student.model.layers]
        n_student = n(p for m in mixers for p in m.parameters())
        n_train = n_student
        largest_student = max(n(m.parameters()) for m in mixers)
    else:
        n_student = n(student.parameters())
        groups = param_groups(student.named_parameters(), s)
        n_train = n(p for g in groups for p in g["params"])
        largest_student = max(n(layer.parameters()) for layer in student.model.layers)
    from ds_hybrid.modeling.families import head_dim

    largest = max(n(layer.parameters()) for layer in teacher.model.layers)
    h, hd = teacher_config.hidden_size, head_dim(teacher_config)
    # hidden-size norms of a decoder layer, not the attention's own q/k norms (which are hidden-sized where
    # head_dim == hidden)
    norms = sum(1 for name, m in teacher.model.layers[0].named_modules()
                if not name.startswith("self_attn") and "norm" in type(m).__name__.lower()
                and getattr(m, "weight", None) is not None and tuple(m.weight.shape) == (h,))
    return ModelCounts(teacher=n(teacher.parameters()), student=n_student, trainable=n_train,
                       largest_teacher_layer=largest, hidden=h,
                       intermediate=teacher_config.intermediate_size, layers=teacher_config.num_hidden_layers,
                       vocab=teacher_config.vocab_size, attn_width=teacher_config.num_attention_heads * hd,
                       head_dim=hd, norms_per_layer=norms, largest_student_layer=largest_student)


def make_plan(cfg: RunConfig, stage: str, counts: ModelCounts, world: int, gpu_gib: float = 80.0,
              dtype_bytes: int | None = None, micro_batch: int | None = None, on_gpu: bool = True) -> Plan:
    """The plan of ``stage`` at ``micro_batch`` (default: the stage's, which must then be resolved, not "auto").
    ``on_gpu=False``: a CPU run's (host memory): compile and kl_backend ``auto`` resolve as they do there (eager
    blocks, the torch reference loss)."""
    from ds_hybrid.stages.common import zero_stage

    s = cfg.stage(stage)
    micro = micro_batch if micro_batch is not None else s.micro_batch
    if micro == "auto":
        micro = auto_micro_batch(cfg, stage, counts, world, gpu_gib, dtype_bytes, on_gpu)
    student_ds = json.loads(resolve_path(s.ds_config).read_text())
    teacher_ds = json.loads(resolve_path(s.teacher_ds_config).read_text())
    from ds_hybrid.stages.common import run_dtype

    b = dtype_bytes or (2 if run_dtype(cfg) == torch.bfloat16 else 4)
    teacher_on_gpu = teacher_ds.get("zero_optimization", {}).get("offload_param", {}).get("device", "none") == "none"
    t_stage3 = zero_stage(teacher_ds) == 3
    uses_teacher = stage != "finetune"
    teacher_shards = (b * counts.teacher // (world if t_stage3 else 1)) if (uses_teacher and teacher_on_gpu) else 0
    # ZeRO-3 gathers a layer's parameters for its forward and backward and prefetches the next: two layers whole;
    # the vocabulary-wide loss gathers each model's LM head whole (V x h) once the layers are released: the larger
    # of the two (Llama-3-8B: the head, 0.98 GiB vs 0.81; 70B: two layers, 3.2 GiB vs 2.0)
    head = counts.vocab * counts.hidden if stage != "align" else 0
    teacher_ws = max(2 * counts.largest_teacher_layer, head) * b if (uses_teacher and t_stage3) else 0
    s_stage = zero_stage(student_ds)
    student = b * counts.student // (world if s_stage == 3 else 1)
    student_ws = (max(2 * (counts.largest_student_layer or counts.largest_teacher_layer), head) * b
                  if s_stage == 3 else 0)
    shard = world if s_stage >= 1 else 1
    # ZeRO-1 with fp32 gradient accumulation (ds_configs/student_zero1.json: DeepSpeed's BF16_Optimizer) keeps an
    # fp32 gradient of every trainable parameter; otherwise gradients are in the model dtype
    g_bytes = 4 if (s_stage == 1 and student_ds.get("data_types", {}).get("grad_accum_dtype") == "fp32") else b
    grads = g_bytes * counts.trainable // (world if s_stage >= 2 else 1)
    if g_bytes == 4 and b < 4 and max(1, s.global_batch // world) // micro > 1:
        # (DeepSpeed's BF16_Optimizer keeps the model-dtype gradients autograd writes beside the fp32 ones and only
        # zeroes them between micro-batches: from the second micro-batch of a step on, all of them beside its
        # activations; freed after the step)
        grads += b * counts.trainable
    # ZeRO-2 stages gradients in buffers of reduce_bucket_size elements in the model dtype whatever the model's size
    # (DeepSpeed's stage_1_and_2 setup_buckets: a second with overlap_comm): 1.86 GiB at ds_configs/student_zero2.json
    z = student_ds.get("zero_optimization", {})
    bucket = z.get("reduce_bucket_size", 5e8)
    bucket = counts.hidden ** 2 if bucket == "auto" else int(float(bucket))  # (auto: h^2, as stages.common fills it)
    buckets = ((2 if z.get("overlap_comm", False) else 1) * bucket * b
               if s_stage == 2 and z.get("contiguous_gradients", True) else 0)
    optim = 12 * counts.trainable // shard
    n = micro * s.seq_len
    h, i, L, V = counts.hidden, counts.intermediate, counts.layers, counts.vocab
    n_soft = len(counts_softmax(cfg, stage, L))
    # bytes saved for backward per token, in units of b/2 (bf16 = 1x): softmax block 18 h + 6 i (Korthikanti et al.
    # with SwiGLU and flash attention); linear block 54 h + 6 i; a mixer alone (stage align) 28 h. The linear
    # constants were fitted to one measured H200 run (docs/SCALE.md): GDN keeps fp32 gates, norm and silu copies.
    # Compiled blocks (compile: auto/true, GPUs, ZeRO < 3) keep fewer intermediates: softmax 12 h + 4 i, linear
    # 36 h + 4 i; stage align's stacked pass 48 h per layer, its stacked copies of the teacher's states included
    # (both fitted to the H200 runs of docs/BENCHMARKS.md, 2026-11-29: within 7 % at micro-batches 16 to 96).
    # Those fits are SmolLM2's (head dim 64) and Llama-3-8B's (kl, head dim 128): attention width d (query heads x
    # head dim) = h and two norms a layer.
    # Where d != h (Gemma 3, Qwen3), the mixer's own tensors scale with d: 46 (eager) / 12 (compiled) of a linear
    # block's h, 10 / 3 of a softmax block's, 42 of the stacked align's, 26 of a mixer alone; each norm beyond two
    # (Gemma 3: four, computed in fp32) keeps 7 h eagerly, 2 h compiled (its bf16 input; Inductor recomputes the
    # rest); fla's chunk states (one K x V state per head and 64 tokens, S = d x head_dim / 64 a token) are
    # recomputed in a layer's backward with their fp32 gradient: 6 (S - d) bytes beyond the fitted constants for one
    # layer (head dim 128: +6 n d, under 0.5 % of Llama-3-8B's kl plan), 2 (S - d) for every layer of the stacked
    # align (fitted at head dim 64; no head-dim-128 align measured). The eager and align terms were checked against
    # Gemma-3-270M's H200 align and GA-S2 probes of 2026-12-04 (docs/data/gemma3_270m_h200_2026-12-04); the compiled
    # ones (d - h and extra norms, which the SmolLM2 and Llama fits never see) were fitted to its three compiled kl
    # runs of the third lease that day (16 x 4096, K = 3: 48.3-49.8 GiB; docs/data/gemma3_270m_h200_2026-12-04c),
    # one shape only: the eager values scaled by one factor (0.26) and rounded. tests/test_plan.py holds both.
    compiled = (s.compile is True or (s.compile == "auto" and on_gpu)) and s_stage < 3  # (as wants_compile)
    soft_c, lin_c, i_c = (12, 36, 4) if compiled else (18, 54, 6)
    soft_d, lin_d, norm_c = (3, 12, 2) if compiled else (10, 46, 7)
    d = counts.attn_width or h
    S = d * (counts.head_dim or 64) // 64
    norms = norm_c * max(0, counts.norms_per_layer - 2) * h
    soft_layer = n * (soft_c * h + soft_d * (d - h) + norms + i_c * i) * b // 2
    lin_layer = n * (lin_c * h + lin_d * (d - h) + norms + i_c * i) * b // 2
    states = 6 * n * max(0, S - d) if n_soft < L else 0  # one linear layer's backward, beyond the fit
    if stage == "align":
        from ds_hybrid.modeling.stacked import stacked_choice_from_env

        stacked = (s_stage < 3 and not cfg.mixer_options.get("use_short_conv", False)
                   and stacked_choice_from_env() != "0")
        batched = L * n * (48 * h + 42 * (d - h) + 2 * max(0, S - d)) * b // 2  # all mixers as one pass (GPUs)
        one_by_one = L * n * (28 * h + 26 * (d - h)) * b // 2 + 2 * L * n * h * b + states  # + the captured in/out
        acts = batched if stacked else one_by_one
    elif s.gradient_checkpointing:
        acts = b * n * h * L + max(soft_layer, lin_layer if n_soft < L else 0) + states  # (each layer's input kept)
    else:
        acts = n_soft * soft_layer + (L - n_soft) * lin_layer + states
    C = min(s.loss_chunk_tokens, n)
    torch_loss = s.kl_backend == "torch" or (s.kl_backend == "auto" and not on_gpu)  # (as stages.kl._loss_function)
    if torch_loss:
        # the reference's [C, V] workspaces (losses.ChunkedLinearLoss, fp32; fp64 for fp64 runs): the logits, log p_s
        # and p_t with a teacher, log p for CE, dL/dz; and a 16-bit copy while rounding them (kl.fp32_logits false)
        uses_ce = not uses_teacher or s.ce_weight > 0
        n_bufs = 1 + 2 * uses_teacher + uses_ce + 1
        logits = n_bufs * C * V * (8 if b > 4 else 4) + (C * V * b if not s.fp32_logits and b < 4 else 0)
    else:
        # the kernel: fp32 logits (16-bit ones with kl.fp32_logits false), the teacher's and the student's (finetune:
        # the student's only), dz written over the student's (a buffer of its own for fp64 runs)
        logit_bytes = b if not s.fp32_logits and b < 4 else 4
        logits = (2 if uses_teacher else 1) * C * V * logit_bytes + (C * V * b if b > 4 else 0)
    # dW (counted also for a frozen LM head, lr_rest 0, which computes none since 2026-12-06: the runs this plan was
    # measured against did), and beside a 16-bit dW its fp32 sum: the kernel's accumulator where more than one
    # chunk's GEMM adds to it (kl.dw_fp32), the torch reference's fp32 copy of W and fp32 dW always
    if torch_loss:
        dw = V * h * b + (8 * V * h if b < 4 else 0)
    else:
        dw = V * h * b + (4 * V * h if s.dw_fp32 and b < 4 and n > C else 0)
    kl = 0 if stage == "align" else logits + dw + 2 * n * h * b
    # a checkpoint: the student's parameters in the run dtype + fp32 master weights and Adam's two moments
    ckpt = b * counts.student + 12 * counts.trainable
    return Plan(stage=stage, world=world, gpu_gib=gpu_gib, micro_batch=micro, checkpoint_bytes=ckpt, teacher_shards=teacher_shards, teacher_working_set=teacher_ws,
                student_params=student, student_working_set=student_ws, gradients=grads, optimizer_states=optim, activations=acts, kl_workspace=kl,
                framework=FRAMEWORK_BYTES, reduce_buckets=buckets)


def auto_micro_batch(cfg: RunConfig, stage: str, counts: ModelCounts, world: int, gpu_gib: float,
                     dtype_bytes: int | None = None, on_gpu: bool = True) -> int:
    """``micro_batch: auto``: the largest divisor of global_batch / world whose plan fits AUTO_MEMORY_FRACTION of
    ``gpu_gib`` (1 if none does; the printed plan then says it does not fit). Larger micro-batches mean fewer,
    larger kernels and fewer per-micro-batch fixed costs, which is most of what a small model's step spends."""
    s = cfg.stage(stage)
    per_rank = max(1, s.global_batch // world)
    budget = AUTO_MEMORY_FRACTION * gpu_gib * GIB
    for m in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        if make_plan(cfg, stage, counts, world, gpu_gib, dtype_bytes, micro_batch=m, on_gpu=on_gpu).total <= budget:
            return m
    return 1


def counts_softmax(cfg: RunConfig, stage: str, num_layers: int) -> list[int]:
    return [] if stage == "align" else planned_softmax_layers(cfg, num_layers)


def plan_for(cfg: RunConfig, stage: str, world: int, gpu_gib: float, teacher_config_path: str | None = None,
             dtype_bytes: int | None = None) -> Plan:
    from transformers import AutoConfig

    from ds_hybrid.teacher import load_teacher_config

    if teacher_config_path:
        p = Path(teacher_config_path)
        if not p.is_file():
            raise ConfigError("--teacher-config", teacher_config_path, "no such config.json")
        teacher_config = AutoConfig.from_pretrained(p.parent if p.name == "config.json" else p)
        if getattr(teacher_config, "model_type", None) == "gemma3":  # multimodal Gemma 3: what `ds-hybrid
            teacher_config = teacher_config.text_config              # extract-text` makes of it is the teacher
    else:
        teacher_config = load_teacher_config(cfg.teacher)
    layers = [] if stage == "align" else planned_softmax_layers(cfg, teacher_config.num_hidden_layers)
    counts = count_models(teacher_config, cfg, stage, layers)
    return make_plan(cfg, stage, counts, world, gpu_gib, dtype_bytes)


def planned_softmax_layers(cfg: RunConfig, L: int) -> list[int]:
    """The softmax layers a plan (or a launch check) counts for a run config on an L-layer teacher: its layers, or
    for a selection that stage select has not written yet, as many layers spaced uniformly."""
    from ds_hybrid.layers import resolve_softmax_layers, selection_k, uniform_layers

    spec = cfg.softmax_layers
    if (isinstance(spec, dict) and "selection" in spec and ("k" in spec) != ("ratio" in spec)
            and not Path(str(spec["selection"])).expanduser().is_file()):
        # a selection not computed yet: plan with as many layers, spaced uniformly (its k or ratio checked as in a run)
        return uniform_layers(L, selection_k(spec, L))
    return resolve_softmax_layers(spec, L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hybrid plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--stage", default=None, help="one stage (default: align, kl and finetune)")
    ap.add_argument("--teacher-config", default=None, help="the teacher's config.json when its weights are not here")
    ap.add_argument("--dtype-bytes", type=int, default=None, help="bytes per parameter/activation (default: the "
                    "config's dtype on a GPU: 4 for fp32, else 2, bf16)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.stage is not None and args.stage not in TRAIN_STAGES:
        raise ConfigError("--stage", args.stage, f"choose one of the training stages {TRAIN_STAGES} (stage select's "
                                                 "probes are kl runs: plan them with --stage kl and the probe's sizes)")
    for name, v in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if v < 1:
            raise ConfigError(name, v, "plan for at least 1")
    if not args.gpu_gib > 0:
        raise ConfigError("--gpu-gib", args.gpu_gib, "one GPU's memory in GiB, e.g. 80 (H100) or 141 (H200)")
    if args.dtype_bytes not in (None, 2, 4, 8):
        raise ConfigError("--dtype-bytes", args.dtype_bytes, "2 (bf16, the GPU default), 4 (fp32) or 8 (fp64)")
    cfg = load_config(args.config, args.overrides)
    if args.dtype_bytes is None:  # (a config of dtype fp32 was planned in bf16: half its bytes, "fits")
        args.dtype_bytes = 4 if cfg.dtype == "fp32" else 2
    world = args.nodes * args.gpus_per_node
    for stage in [args.stage] if args.stage else ["align", "kl", "finetune"]:
        plan = plan_for(cfg, stage, world, args.gpu_gib, args.teacher_config, args.dtype_bytes)
        print(plan.table())
        print(schedule_line(cfg, stage))
        print()
    return 0
