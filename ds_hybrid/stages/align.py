"""Stage align (RADLADS stage 1): teach every linear mixer to reproduce its softmax layer, teacher-forced.

All layers are linear. The frozen teacher runs forward once per micro-batch; hooks capture each layer's attention
input (after input_layernorm) and output. Mixer l sees the teacher's input to layer l and is trained to give the
teacher's output; the teacher's output is what flows on, so the L mixers train independently and in parallel.
Only mixer parameters exist in the student engine (no MLP/embedding copies): at 70B that saves ~90% of the memory.
Loss: mean over layers of the per-layer align loss (:func:`ds_hybrid.losses.align_loss`), each layer logged.

The export (``<run>/align/hf``) is the all-linear hybrid: the teacher's weights with the trained mixers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ds_hybrid import distributed as D
from ds_hybrid.hf_io import SafetensorsReader, export_hf
from ds_hybrid.losses import align_loss, align_losses
from ds_hybrid.modeling.families import layer_rest
from ds_hybrid.modeling.mixers import build_mixer
from ds_hybrid.modeling.stacked import (layout_from_env, pass_elements_from_env, stacked_choice_from_env,
                                        stacked_forward, supports_stacked)
from ds_hybrid.stages.base import HeldOut, Stage, build_teacher_engine, init_mixer_from_reader
from ds_hybrid.stages.common import (compile_blocks, compile_options, count_params, grad_norm_before_step,
                                     matmul_params, student_engine, wants_compile, zero_stage)
from ds_hybrid.teacher import teacher_generation_config
from ds_hybrid.zero import copy_into_partitions, zero3_init
from ds_hybrid.transfer import hybrid_config

log = logging.getLogger("ds_hybrid")


class MixerStack(nn.Module):
    """The L mixers of the all-linear student; forward returns the align loss of each layer.

    ``stacked`` runs all L mixers as one batched pass: on CUDA where :func:`~ds_hybrid.modeling.stacked.supports_stacked`
    allows it (not under ZeRO-3, no short convolutions). Otherwise each mixer is called on its own (the reference
    path). ``DS_HYBRID_ALIGN_STACKED=1`` / ``0`` forces either where supported."""

    def __init__(self, mixers: list[nn.Module]):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)
        self.stacked = False
        self.pass_elements: int | None = None  # the stacked pass's row groups (stacked.pass_elements_from_env)
        self.layout = "split"  # its GEMMs of GDN's input projections (stacked.layout_from_env)

    def forward(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        if self.stacked:
            out = stacked_forward(list(self.mixers), torch.stack(inputs), check=False, max_elements=self.pass_elements,
                                  layout=self.layout)
            return align_losses(out, torch.stack(targets))
        losses = [align_loss(m(hidden_states=x)[0], t) for m, x, t in zip(self.mixers, inputs, targets)]
        return torch.stack(losses)


class AlignStage(Stage):
    name = "align"

    def setup(self) -> None:
        ctx = self.ctx
        tc = ctx.teacher_config
        self.hf_config = hybrid_config(tc, [], ctx.cfg.mixer, ctx.cfg.mixer_options, ctx.teacher_weights)
        self.teacher = build_teacher_engine(ctx)
        options = self.hf_config.options
        ds = ctx.ds_config()
        reader = SafetensorsReader(ctx.teacher_path)

        def whole(i: int, fill: bool = True) -> nn.Module:
            """Layer i's mixer: fresh gates/decays drawn from the seeded stream, q/k/v/o from the teacher (``fill``)."""
            m = build_mixer(ctx.cfg.mixer, tc.hidden_size, tc.num_attention_heads, self.hf_config.head_dim, i,
                            options, tc.num_key_value_heads)
            if fill:
                init_mixer_from_reader(m, reader, i, tc.num_key_value_heads)
            return m

        torch.manual_seed(ctx.cfg.seed)  # identical fresh gates/decays on every rank and at any ZeRO stage
        if zero_stage(ds) != 3:
            stack = MixerStack([whole(i) for i in range(tc.num_hidden_layers)]).to(device=ctx.device, dtype=ctx.dtype)
        else:
            # each mixer is partitioned as soon as it is built, and zero.Init skips weight init (its parameters would
            # hold uninitialised memory): one layer at a time, the mixer a run without ZeRO-3 gets (same stream)
            # is built whole and copied into the partitions, then dropped (every rank draws it, so that the stream
            # stays the same on all; only rank 0, whose copy is scattered, reads the teacher's weights into it)
            mixers = []
            for i in range(tc.num_hidden_layers):
                src = whole(i, fill=D.is_main())
                with torch.random.fork_rng(devices=[]), zero3_init(ds, ctx.dtype):
                    mixers.append(build_mixer(ctx.cfg.mixer, tc.hidden_size, tc.num_attention_heads,
                                              self.hf_config.head_dim, i, options, tc.num_key_value_heads))
                copy_into_partitions(mixers[-1], src)
                del src
            stack = MixerStack(mixers)
        mixers = list(stack.mixers)
        # the stacked pass pays on GPUs (fewer, larger kernels); on CPU the per-mixer loop is faster
        mode = stacked_choice_from_env()
        stack.stacked = supports_stacked(mixers) and (mode == "1" or (mode == "auto" and torch.cuda.is_available()))
        stack.pass_elements, stack.layout = pass_elements_from_env(), layout_from_env()
        log.info("align: %d mixers %s", len(mixers), f"in one stacked pass (layout {stack.layout}, row limit "
                 f"{stack.pass_elements})" if stack.stacked else "one by one")
        if wants_compile(ctx.s, ds):
            if stack.stacked:  # one graph around the stacked pass (the fla call is a graph break) and the loss
                stack.compile(**compile_options())
            else:
                compile_blocks(stack.mixers)
        if wants_compile(ctx.s, ctx.ds_config(train=False)):
            compile_blocks(self.teacher.module.teacher.model.layers)
        self.engine = student_engine(stack, ds, ctx.s, ctx.total_steps)
        self.engines = {"student": self.engine}
        self._teacher_params = matmul_params(self.teacher.module, tc, lm_head_runs=False)  # (a trunk: no head)
        self._mixer_params = count_params(stack)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, captured = self.teacher(ids, capture=True)
        return self.engine([c[0] for c in captured], [c[1] for c in captured])

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        per_layer = []
        lr = self.lr_metrics()  # the step's own (engine.step() at the boundary advances the schedule to the next)
        for mb in micro_batches:
            losses = self._forward(mb.to(self.ctx.device, non_blocking=True))
            loss = losses.mean()
            self.engine.backward(loss)
            self.grad_norm = grad_norm_before_step(self.engine)
            self.engine.step()
            per_layer.append(losses.detach().float())
        layer = D.all_reduce_mean(torch.stack(per_layer).mean(0)).tolist()  # the step's one device-to-host transfer
        out = {"loss": sum(layer) / len(layer), **lr}
        out.update({f"layer{i:02d}": v for i, v in enumerate(layer)})
        return out

    @torch.no_grad()
    def evaluate(self, held: HeldOut) -> dict[str, float]:
        self.engine.eval()
        per_row = [self._forward(b.to(self.ctx.device)).double() for b in held.rows]  # every rank: the same forwards
        self.engine.train()
        sums = torch.cat([torch.stack(per_row[:held.real]).sum(0) if held.real else torch.zeros_like(per_row[0]),
                          torch.tensor([held.real], dtype=torch.float64, device=per_row[0].device)])
        if D.world_size() > 1:
            torch.distributed.all_reduce(sums)
        layer = sums[:-1] / sums[-1]  # per layer, the mean over the held-out rows (each row's loss a token mean)
        out = {"loss": float(layer.mean())}
        out.update({f"layer{i:02d}": float(v) for i, v in enumerate(layer)})
        return out

    def export(self, out_dir: Path) -> None:
        t = self.teacher.module.teacher
        mixers = self.engine.module.mixers
        head = [("model.embed_tokens.", t.model.embed_tokens), ("model.norm.", t.model.norm)]
        if not self.hf_config.tie_word_embeddings:
            head.append(("lm_head.", t.lm_head))
        groups = [head]
        for i, layer in enumerate(t.model.layers):
            groups.append([(f"model.layers.{i}.{name}.", m) for name, m in layer_rest(layer).items()]
                          + [(f"model.layers.{i}.self_attn.", mixers[i])])
        export_hf(out_dir, self.hf_config, groups, self.ctx.tokenizer,
                  generation_config=teacher_generation_config(self.ctx.teacher_path))

    def flops_per_token(self) -> float:
        # teacher forward 2N (embedding rows do no matmul work) + mixers forward/backward 6N
        return 2.0 * self._teacher_params + 6.0 * self._mixer_params
