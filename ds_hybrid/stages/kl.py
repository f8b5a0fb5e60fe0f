"""Stages kl (RADLADS stage 2) and finetune (stage 3): train the whole hybrid on the vocabulary-wide losses.

kl: the student starts from the align export with ``softmax_layers`` restored from the teacher; the frozen teacher
runs in its own engine (ZeRO-3: each rank holds a shard; optional CPU offload). Loss per token:
T^2 KL(p_t || p_s) over the full vocabulary, averaged over real tokens, + ce_weight * next-token CE. Two learning
rates: attention/mixer parameters (``lr``) and the rest (``lr_rest``); AdamW(betas), clip, weight decay.

finetune: the student starts from the kl export; next-token CE only, no teacher, optionally longer sequences.

Both losses run through :class:`ds_hybrid.modeling.modeling.HybridLMHead` (``lm_head(h, loss_fn=...)``) so the
lm_head weight is whole during the loss and its gradient reaches DeepSpeed once, under ZeRO-3 and tied embeddings.
The loss function is the chunked torch reference (:mod:`ds_hybrid.losses`) or the fused Triton kernel, chosen by
``kl_backend`` (auto: the kernel on CUDA when it is available).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ds_hybrid import distributed as D
from ds_hybrid.config import check_teacher_overlap
from ds_hybrid.errors import ConfigError
from ds_hybrid.hf_io import export_hf
from ds_hybrid.losses import chunked_linear_loss, next_token_labels
from ds_hybrid.modeling import HybridForCausalLM
from ds_hybrid.stages.base import (HeldOut, Stage, build_teacher_engine, check_init_from, hybrid_export_groups,
                                   load_hybrid, strided_share)
from ds_hybrid.stages.common import (
    compile_blocks, grad_norm_before_step, matmul_params, student_engine, unpacked_rows, wants_compile,
)
from ds_hybrid.teacher import teacher_generation_config
from ds_hybrid.triton_env import triton_interpreted
from ds_hybrid.zero import gathered

QUANTILE_MAX = 1 << 24  # torch.quantile's input limit (a rank's tokens of a step; 4096 rows of 4096 tokens)
log = logging.getLogger("ds_hybrid")


def loss_function(backend: str, fp32_logits: bool = True, dw_fp32: bool = True):
    """The linear+loss implementation for ``kl_backend``: the Triton kernel or the torch reference; with
    ``fp32_logits=False`` one that computes 16-bit logits (``kl.fp32_logits``); ``dw_fp32=False``: the kernel sums
    dW over chunks in the weights' dtype (``kl.dw_fp32``; the reference always sums in fp32)."""
    fn = _loss_function(backend)
    kw = {} if fp32_logits else {"fp32_logits": False}
    if not dw_fp32 and fn is not chunked_linear_loss:
        kw["dw_fp32"] = False
    return partial(fn, **kw) if kw else fn


def _loss_function(backend: str):
    if backend == "triton" or (backend == "auto" and torch.cuda.is_available()):
        try:
            from ds_hybrid.kernels.fused_kl import fused_linear_loss
        except ImportError as e:
            if backend == "triton":
                raise
            log.warning(
                "kl_backend auto: the fused Triton KL kernel is not importable (%s); using the torch reference, "
                "several times slower. Install the package (pip install -e .) so that ds_hybrid.kernels exists", e)
        else:
            return fused_linear_loss
    return chunked_linear_loss


class LMStudent(nn.Module):
    """The hybrid plus its training loss, so that one engine forward computes the loss under ZeRO hooks."""

    def __init__(self, hybrid: HybridForCausalLM, temperature: float, kl_weight: float, ce_weight: float,
                 chunk: int, loss_fn):
        super().__init__()
        self.hybrid = hybrid
        self.temperature, self.kl_weight, self.ce_weight, self.chunk = temperature, kl_weight, ce_weight, chunk
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor, h_t: torch.Tensor | None = None, w_t: torch.Tensor | None = None,
                kl_weight: float | None = None, ce_weight: float | None = None, h_t_ready=None):
        with unpacked_rows():
            h_s = self.hybrid.model(input_ids=input_ids, use_cache=False).last_hidden_state
        if h_t_ready is not None:  # h_t computed on another stream (teacher_overlap): the student's forward above
            torch.cuda.current_stream(h_s.device).wait_event(h_t_ready)  # did not need it, the loss does
        labels = next_token_labels(input_ids).flatten()
        return self.hybrid.lm_head(
            h_s.flatten(0, 1), loss_fn=self.loss_fn,
            h_t=None if h_t is None else h_t.flatten(0, 1), w_t=w_t, labels=labels,
            temperature=self.temperature, chunk=self.chunk,
            kl_weight=self.kl_weight if kl_weight is None else kl_weight,
            ce_weight=self.ce_weight if ce_weight is None else ce_weight,
        )


def _rows_sum(per_token: torch.Tensor, rows: int, real: int) -> torch.Tensor:
    """The sum of a [rows * T] per-token loss over its first ``real`` rows, in fp64."""
    return per_token.view(rows, -1)[:real].sum().double()


class KLStage(Stage):
    name = "kl"
    uses_teacher = True

    def default_init(self) -> Path:
        return self.ctx.cfg.stage_dir("align") / "hf"

    def check(self) -> None:
        ctx, s = self.ctx, self.ctx.s
        check_init_from(ctx, s.init_from or self.default_init(), f"{self.name}.init_from")
        if s.kl_backend == "triton" and not torch.cuda.is_available() and not triton_interpreted():
            raise ConfigError(f"{self.name}.kl_backend", s.kl_backend,
                              "the Triton kernel needs a CUDA GPU and none is visible: use auto (the torch reference "
                              "on CPU) or torch; TRITON_INTERPRET=1 runs the kernel in Triton's interpreter, slowly")
        if self.uses_teacher:
            check_teacher_overlap(self.name, s, ctx.ds_config(train=False))

    def setup(self) -> None:
        ctx = self.ctx
        s = ctx.s
        init_from = s.init_from or self.default_init()
        self.check()  # before any model is built (again, for callers that skip the trainer's early call)
        self.teacher = build_teacher_engine(ctx) if self.uses_teacher else None
        hybrid = load_hybrid(ctx, init_from, f"{self.name}.init_from")
        if s.gradient_checkpointing:
            hybrid.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if wants_compile(s, ctx.ds_config()):
            compile_blocks(hybrid.model.layers)
        if self.teacher is not None and wants_compile(s, ctx.ds_config(train=False)):
            compile_blocks(self.teacher.module.teacher.model.layers)
        kl_w, ce_w = (1.0, s.ce_weight) if self.uses_teacher else (0.0, 1.0)
        loss_fn = loss_function(s.kl_backend, s.fp32_logits, s.dw_fp32)
        module = LMStudent(hybrid, s.temperature, kl_w, ce_w, s.loss_chunk_tokens, loss_fn)
        self.engine = student_engine(module, ctx.ds_config(), s, ctx.total_steps)
        self.engines = {"student": self.engine}
        # both LM heads run (the teacher's in the loss, on its final hidden states)
        self._student_params = matmul_params(hybrid, hybrid.config, lm_head_runs=True)
        self._teacher_params = matmul_params(self.teacher.module, ctx.teacher_config, True) if self.teacher else 0
        self._overlap = bool(s.teacher_overlap) and self.teacher is not None  # (never with ZeRO-3: check refuses it)
        self._side = torch.cuda.Stream(ctx.device) if self._overlap and ctx.device.type == "cuda" else None
        self._prefetched: tuple | None = None  # (step index, h_t, event that h_t is ready) from _prefetch_next
        # the logged KL quantiles' levels, on the device once (a tensor built from a list each step is a blocking copy)
        self._levels = torch.tensor([0.5, 0.9, 0.99], device=ctx.device)
        self._used_prefetch = False

    def _losses(self, ids: torch.Tensor, h_t: torch.Tensor | None = None, h_t_ready=None, **kw):
        if self.teacher is None:
            return self.engine(ids, **kw)
        if h_t is None:
            h_t, _ = self.teacher(ids)
        elif h_t_ready is not None:
            kw["h_t_ready"] = h_t_ready
        w_t = self.teacher.module.lm_head_weight
        with gathered([w_t]):  # the teacher's lm_head, whole, for the duration of the loss (no grad)
            return self.engine(ids, h_t=h_t, w_t=w_t, **kw)

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        # everything stays on the GPU until one transfer at the end of the step: no host sync per micro-batch
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # loss, kl, ce
        kl_tokens = []
        nxt = self.next_batches
        h_t, ready = self._take_prefetched(None if nxt is None else nxt[0] - 1)
        lr = self.lr_metrics()  # the step's own (engine.step() at the boundary advances the schedule to the next)
        for i, mb in enumerate(micro_batches):
            loss, stats = self._losses(mb.to(self.ctx.device, non_blocking=True), h_t=h_t if i == 0 else None,
                                       h_t_ready=ready if i == 0 else None)
            self.engine.backward(loss)
            if i == len(micro_batches) - 1:
                self._prefetch_next()
            self.grad_norm = grad_norm_before_step(self.engine)
            self.engine.step()
            totals[0] += loss.detach().double()
            if stats.kl_per_token is not None:
                totals[1] += stats.kl_per_token.sum().double() / stats.n_kl.clamp(min=1)
                kl_tokens.append(stats.kl_per_token.detach())
            if stats.ce_per_token is not None:
                totals[2] += stats.ce_per_token.sum().double() / stats.n_ce.clamp(min=1)
        totals = D.all_reduce_mean(totals / len(micro_batches))
        values = totals.float()
        if self.uses_teacher and kl_tokens:
            per_token = torch.cat(kl_tokens).float()
            if per_token.numel() > QUANTILE_MAX:  # torch.quantile refuses more; every k-th token estimates them
                per_token = per_token[::-(-per_token.numel() // QUANTILE_MAX)]
            q = torch.quantile(per_token, self._levels)
            values = torch.cat([values, q])
        values = values.tolist()  # the step's one device-to-host transfer
        out = {"loss": values[0]}
        if self.uses_teacher:
            out["kl"] = values[1]
            if kl_tokens:
                out.update(kl_p50=values[3], kl_p90=values[4], kl_p99=values[5])
        if self.ctx.s.ce_weight or not self.uses_teacher:
            out["ce"] = values[2]
        out.update(lr)
        self.last_kl_tokens = torch.cat(kl_tokens) if kl_tokens else None
        return out

    def lr_metrics(self) -> dict[str, float]:
        """Each parameter group's learning rate (``lr_<name>``: attention/mixers and the rest) and the first's."""
        lrs = self.engine.get_lr()
        groups = [g.get("name", str(i)) for i, g in enumerate(self.engine.optimizer.param_groups)]
        return {**{f"lr_{n}": lr for n, lr in zip(groups, lrs)}, "lr": lrs[0]}

    def _prefetch_next(self) -> None:
        """teacher_overlap: the next step's first micro-batch through the teacher, on the side stream once the
        kernels launched so far (this step's backward) have run; kept for that step's train_step."""
        self._prefetched = None
        nxt = self.next_batches
        if not self._overlap or nxt is None or nxt[1] is None:
            return
        ids = nxt[1]()[0].to(self.ctx.device, non_blocking=True)
        if self._side is None:  # CPU: the same work, in order
            h_t, _ = self.teacher(ids)
            self._prefetched = (nxt[0], h_t, None)
            return
        backward_launched = torch.cuda.Event()
        backward_launched.record()
        with torch.cuda.stream(self._side):
            self._side.wait_event(backward_launched)
            h_t, _ = self.teacher(ids)
            ready = torch.cuda.Event()
            ready.record(self._side)
        ids.record_stream(self._side)  # allocated on the main stream, read on the side one
        self._prefetched = (nxt[0], h_t, ready)

    def _take_prefetched(self, step: int | None) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
        """(the teacher's hidden states for ``step``'s first micro-batch, the event that they are ready) if
        _prefetch_next computed them, else (None, None). The main stream waits for the event only before the loss."""
        got, self._prefetched = self._prefetched, None
        if got is None or step is None or got[0] != step:
            return None, None
        _, h_t, ready = got
        if not self._used_prefetch:
            self._used_prefetch = True
            log.info("teacher_overlap: step %d uses the teacher forward run during step %d's optimizer step",
                     step + 1, step)
        if ready is not None:
            h_t.record_stream(torch.cuda.current_stream(self.ctx.device))  # made on the side stream, read here
        return h_t, ready

    @torch.no_grad()
    def evaluate(self, held: HeldOut) -> dict[str, float]:
        self.engine.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)  # kl sum, kl n, ce sum, ce n
        mb = max(1, self.ctx.s.micro_batch)  # rows per forward, as in training (one row each was launch bound)
        for i in range(0, len(held.rows), mb):
            b = torch.cat(held.rows[i:i + mb])
            _, st = self._losses(b.to(self.ctx.device), kl_weight=1.0 if self.teacher else 0.0, ce_weight=1.0)
            real = max(0, min(len(b), held.real - i))  # a rank's last row may be a pad: run, not counted
            if st.kl_per_token is not None:
                sums[0] += _rows_sum(st.kl_per_token, len(b), real)
                sums[1] += st.n_kl.double() * real / len(b)  # packed rows: every row has as many scored tokens
            sums[2] += _rows_sum(st.ce_per_token, len(b), real)
            sums[3] += st.n_ce.double() * real / len(b)
        recall = self._recall(held) if self.ctx.s.eval_recall else None
        self.engine.train()
        if D.world_size() > 1:
            torch.distributed.all_reduce(sums)
        out = {"ce": float(sums[2] / sums[3]), "ppl": float(torch.exp(sums[2] / sums[3]))}
        if self.teacher is not None:
            out["kl"] = float(sums[0] / sums[1])
        if recall is not None:
            if D.world_size() > 1:
                torch.distributed.all_reduce(recall)
            out["recall_nll"] = float(recall[0] / recall[2])
            if self.teacher is not None:
                out["recall_kl"] = float(recall[1] / recall[2])
        return out

    def _recall(self, held: HeldOut) -> torch.Tensor:
        """Sums over this rank's share of the needle rows made from the first ``eval_recall`` held-out rows (the
        same rows and facts at every evaluation and world size): -log p and KL to the teacher of each answer token,
        and the token count."""
        from ds_hybrid.recall_tasks import needle_rows

        if getattr(self, "_needles", None) is None:
            n = min(self.ctx.s.eval_recall, len(held.every))
            every = needle_rows([held.every[[i]][0].tolist() for i in range(n)], self.ctx.tokenizer,
                                seed=self.ctx.cfg.seed, bos=getattr(held.every, "bos", None))
            idx, real = strided_share(n, D.rank(), D.world_size())
            self._needles = ([every[i] for i in idx], real)
        needles, real = self._needles
        sums = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        mb = max(1, self.ctx.s.micro_batch)
        for i in range(0, len(needles), mb):
            group = needles[i:i + mb]
            ids = torch.tensor([g[0] for g in group], device=self.ctx.device)
            _, st = self._losses(ids, kl_weight=1.0 if self.teacher else 0.0, ce_weight=1.0)
            group = group[:max(0, real - i)]  # pads (the share's last row on some ranks) ran for the collectives
            if not group:
                continue
            T = ids.shape[1]
            # position p's loss is about token p + 1: the answer's tokens start..end-1 are positions start-1..end-2
            pos = torch.cat([torch.arange(j * T + s - 1, j * T + e - 1) for j, (_, s, e) in enumerate(group)])
            pos = pos.to(self.ctx.device)
            sums[0] += st.ce_per_token[pos].sum().double()
            if st.kl_per_token is not None:
                sums[1] += st.kl_per_token[pos].sum().double()
            sums[2] += len(pos)
        return sums

    def export(self, out_dir: Path) -> None:
        hybrid = self.engine.module.hybrid
        skip = ["lm_head.weight"] if hybrid.config.tie_word_embeddings else []
        export_hf(out_dir, hybrid.config, hybrid_export_groups(hybrid), self.ctx.tokenizer, skip=skip,
                  generation_config=teacher_generation_config(self.ctx.teacher_path))

    def flops_per_token(self) -> float:
        return 6.0 * self._student_params + 2.0 * self._teacher_params


class FinetuneStage(KLStage):
    name = "finetune"
    uses_teacher = False

    def default_init(self) -> Path:
        return self.ctx.cfg.stage_dir("kl") / "hf"
