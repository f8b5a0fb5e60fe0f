"""Run under torchrun: set up stage kl (tiny teacher, fp32, CPU), take one optimizer step, then measure on each rank the
bytes the student engine really holds for parameters, gradients and optimizer states, next to ds-hybrid's plan.

    python -m torch.distributed.run --nproc_per_node 2 tests/plan_measure.py <run.yaml> <out.json> [overrides...]
"""

from __future__ import annotations

import sys


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def main() -> None:
    cfg_path, out = sys.argv[1:3]
    from ds_hybrid import distributed as D
    from ds_hybrid.config import load_config
    from ds_hybrid.data import PackedSequences, prepare_streams, rank_micro_batches, step_rows
    from ds_hybrid.plan import count_models, make_plan
    from ds_hybrid.trainer import make_context, stage_class

    cfg = load_config(cfg_path, sys.argv[3:])
    D.init_distributed(10)
    ctx = make_context(cfg, "kl")
    stage = stage_class("kl")(ctx)
    stage.setup()
    streams = prepare_streams(cfg.data, ctx.tokenizer, is_main=D.is_main(), barrier=D.barrier)
    train = PackedSequences(streams.train, ctx.s.seq_len)

    def batches(step):
        rows = step_rows(step, len(train), ctx.s.global_batch, cfg.seed)
        return [train[m] for m in rank_micro_batches(rows, D.rank(), D.world_size(), ctx.s.micro_batch)]

    stage.train_step(batches(0))  # optimizer states exist after the first step
    eng = stage.engine
    opt = eng.optimizer
    params = list({id(p): p for p in eng.module.parameters()}.values())
    zstage = eng.zero_optimization_stage()
    if zstage == 3:
        p_bytes = nbytes(p.ds_tensor for p in params)
        master = nbytes(opt.fp32_partitioned_groups_flat)
    else:
        p_bytes = nbytes(params)
        master = nbytes(opt.single_partition_of_fp32_groups)
    states = nbytes(v for st in opt.optimizer.state.values() for v in st.values() if hasattr(v, "numel") and v.dim() > 0)
    # gradients: one more forward/backward at an accumulation boundary, before the step that would clear them
    ids = batches(1)[0].to(ctx.device)
    h_t, _ = stage.teacher(ids)
    from ds_hybrid.zero import gathered

    w_t = stage.teacher.module.lm_head_weight
    with gathered([w_t]):
        loss, _ = eng(ids, h_t=h_t, w_t=w_t)
    eng.backward(loss)
    if zstage == 3:
        g_bytes = opt.grad_partitions_flat_buffer.numel() * opt.grad_partitions_flat_buffer.element_size()
    else:
        g_bytes = sum(nbytes(g) if isinstance(g, list) else nbytes([g]) for g in opt.averaged_gradients.values())
    counts = count_models(ctx.teacher_config, cfg, "kl", ctx.softmax_layers)
    plan = make_plan(cfg, "kl", counts, D.world_size(), dtype_bytes=4)
    mine = {"rank": D.rank(), "zero": zstage, "params": p_bytes, "grads": g_bytes, "optimizer": master + states,
            "plan_params": plan.student_params, "plan_grads": plan.gradients, "plan_optimizer": plan.optimizer_states}
    from trainer_utils import write_rank_reports

    write_rank_reports(mine, out)


if __name__ == "__main__":
    main()
