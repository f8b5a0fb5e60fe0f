"""DeepSpeed's BF16_Optimizer step against ds_hybrid.sync_free's, on CPU in one process (tests/test_throughput.py).

    python tests/optimizer_step_check.py <out.json> <workdir>

Engines from the same weights (ZeRO-1, bf16, fp32 gradient accumulation, AdamW with weight decay, a decaying
LambdaLR schedule as stage kl builds), the same data; per case and step path: the losses, the final weights (bf16
and the fp32 master copy), the grad norms, the learning rate, AdamW's step count and first moment, the skipped steps,
and the host reads of device data made by DeepSpeed or ds_hybrid code inside ``engine.step()`` (``.item()``,
``bool()``...: on a GPU each is a sync; reads inside torch itself are not counted). Step paths: "deepspeed"
(DeepSpeed's step over torch's default AdamW), "deepspeed_fused" (DeepSpeed's step over the fused AdamW that the
sync-free step switches to), "sync_free", "auto" (the default). Cases: "noclip" (the norm stays under the clip),
"clip" (a clip of 1e-3: every step clipped), "nonfinite" (a NaN gradient at step 2), and "resume": two steps of
DeepSpeed's, a checkpoint, two more under "auto" from it, against four of DeepSpeed's in one run; and two steps under
"auto", a checkpoint, two more under "deepspeed" (after the trainer's restore of the run's optimizer settings).
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
from torch import nn

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "cpu")
STEPS = 4


def engine_for(clip: float, fused: bool = False, seed: int = 0):
    import deepspeed

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)).to(torch.bfloat16)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2,
                            fused=fused or None)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "gradient_clipping": clip, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
           "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.8**step))
    return engine


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 16, generator=g).to(torch.bfloat16), torch.randn(4, 8, generator=g)) for _ in range(STEPS)]


def steps(engine, batches, nan_at: int | None = None, first: int = 0) -> dict:
    from ds_hybrid import sync_free

    reads = [0]
    real = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(t, *a, **k):
            caller = traceback.extract_stack()[-2].filename
            if "/torch/" not in caller:
                reads[0] += 1
            return real[name](t, *a, **k)
        return read

    losses, norms, skipped = [], [], []
    for i, (x, y) in enumerate(batches[first:], start=first):
        loss = (engine(x).float() - y).pow(2).mean()
        engine.backward(loss)
        if nan_at == i:
            engine.optimizer.fp32_groups_gradients_flat[0][0] = float("nan")
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        try:
            engine.step()
        finally:
            for name in READS:
                setattr(torch.Tensor, name, real[name])
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
        skipped.append(sync_free.settle(engine, norms[-1]))  # (what the trainer calls after every step)
    return {"losses": losses, "norms": norms, "settled_skips": skipped, "reads_per_step": reads[0] / len(losses)}


def record(engine, out: dict) -> dict:
    inner = engine.optimizer.optimizer
    state = [inner.state[p] for g in inner.param_groups for p in g["params"]]
    return {**out, "weights": [p.detach().float().flatten().tolist() for p in engine.module.parameters()],
            "master": [p.detach().flatten().tolist() for p in engine.optimizer.fp32_groups_flat_partition],
            "lr": [g["lr"] for g in inner.param_groups], "skipped_steps": engine.skipped_steps,
            "adam_steps": [float(s["step"]) for s in state], "exp_avg": [s["exp_avg"].flatten().tolist() for s in state],
            "exp_avg_sq": [s["exp_avg_sq"].flatten().tolist() for s in state],
            "fused": [bool(g.get("fused")) for g in inner.param_groups],
            "finite": all(torch.isfinite(p).all().item() for p in engine.module.parameters())}


def run(choice: str, clip: float, nan_at: int | None) -> dict:
    from ds_hybrid import sync_free

    engine = engine_for(clip, fused=choice == "deepspeed_fused")
    replaced = sync_free.apply_step_choice(engine, "deepspeed" if choice == "deepspeed_fused" else choice)
    return record(engine, {"replaced": replaced, **steps(engine, data(), nan_at)})


def resume(workdir: str) -> dict:
    from ds_hybrid import sync_free

    batches = data()
    first = engine_for(1e9)
    steps(first, batches[:2])
    first.save_checkpoint(workdir, tag="two")
    engine = engine_for(1e9, seed=1)  # other weights: the checkpoint's must come back
    replaced = sync_free.apply_step_choice(engine, "auto")
    engine.load_checkpoint(workdir, tag="two")
    return record(engine, {"replaced": replaced, **steps(engine, batches, first=2)})


def resume_reference(workdir: str) -> dict:
    """Two steps under "auto" (the sync-free step, fused AdamW), a checkpoint, two more under "deepspeed" from it
    after the trainer's restore of the run's optimizer settings: DeepSpeed's step over torch's default AdamW again
    (the checkpoint's groups say fused)."""
    from ds_hybrid import sync_free
    from ds_hybrid.stages.common import optimizer_settings, restore_optimizer_settings

    batches = data()
    first = engine_for(1e9)
    sync_free.apply_step_choice(first, "auto")
    steps(first, batches[:2])
    first.save_checkpoint(workdir, tag="auto_two")
    engine = engine_for(1e9, seed=1)
    replaced = sync_free.apply_step_choice(engine, "deepspeed")
    fresh = optimizer_settings(engine)
    engine.load_checkpoint(workdir, tag="auto_two")
    loaded = [bool(g.get("fused")) for g in engine.optimizer.optimizer.param_groups]
    changed = restore_optimizer_settings(engine, fresh)
    inner = engine.optimizer.optimizer
    on_host = all(inner.state[p]["step"].device.type == "cpu" for g in inner.param_groups for p in g["params"])
    return record(engine, {"replaced": replaced, "loaded_fused": loaded, "changed": changed, "steps_on_host": on_host,
                           **steps(engine, batches, first=2)})


def main() -> int:
    from ds_hybrid import distributed as D

    D.init_distributed()
    out = {}
    for case, clip, nan_at in (("noclip", 1e9, None), ("clip", 1e-3, None), ("nonfinite", 1.0, 2)):
        out[case] = {choice: run(choice, clip, nan_at) for choice in ("deepspeed", "deepspeed_fused", "sync_free",
                                                                      "auto")}
    out["resume"] = {"auto": resume(sys.argv[2]), "deepspeed": out["noclip"]["deepspeed"],
                     "deepspeed_after_auto": resume_reference(sys.argv[2])}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
