"""DeepSpeed's BF16_Optimizer step against ds_hybrid.sync_free's, on CPU in one process (tests/test_throughput.py).

    python tests/optimizer_step_check.py <out.json>

Two engines from the same weights (ZeRO-1, bf16, fp32 gradient accumulation, AdamW with weight decay), the same data;
per case and step path: the losses, the final weights, the grad norms, and the host reads of device data made by
DeepSpeed or ds_hybrid code inside ``engine.step()`` (``.item()``, ``bool()``...: on a GPU each is a sync; reads
inside torch itself, e.g. AdamW's step counters, which are CPU tensors there, are not counted). Cases: "noclip"
(the norm stays under the clip), "clip" (a clip of 1e-3: every step clipped), "nonfinite" (a NaN gradient at step 2).
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
from torch import nn

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "cpu")


def engine_for(clip: float, seed: int = 0):
    import deepspeed

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)).to(torch.bfloat16)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "gradient_clipping": clip, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
           "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def run(choice: str, clip: float, nan_at: int | None, steps: int = 4) -> dict:
    from ds_hybrid import sync_free

    engine = engine_for(clip)
    replaced = sync_free.apply_step_choice(engine, choice)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 16, generator=g).to(torch.bfloat16), torch.randn(4, 8, generator=g)) for _ in range(steps)]
    reads = [0]
    real = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(t, *a, **k):
            caller = traceback.extract_stack()[-2].filename
            if "/torch/" not in caller:
                reads[0] += 1
            return real[name](t, *a, **k)
        return read

    losses, norms = [], []
    for i, (x, y) in enumerate(data):
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
    weights = [p.detach().float().flatten().tolist() for p in engine.module.parameters()]
    return {"replaced": replaced, "losses": losses, "norms": norms, "weights": weights,
            "reads_per_step": reads[0] / steps, "finite": all(torch.isfinite(p).all().item()
                                                              for p in engine.module.parameters())}


def main() -> int:
    from ds_hybrid import distributed as D

    D.init_distributed()
    out = {}
    for case, clip, nan_at in (("noclip", 1e9, None), ("clip", 1e-3, None), ("nonfinite", 1.0, 2)):
        out[case] = {choice: run(choice, clip, nan_at) for choice in ("deepspeed", "sync_free")}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
