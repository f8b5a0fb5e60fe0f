"""GPU check of the mixers and a trained hybrid: fla kernels (fp32 and bf16) against the torch reference path (fp32),
on the same GPU. Usage: python bench/mixer_parity.py [trained_hybrid_dir] -> JSON of relative L2 errors."""
import json
import sys

import torch

import ds_hybrid  # noqa: F401
from ds_hybrid.modeling.mixers import MixerOptions, build_mixer


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


res = {"card": torch.cuda.get_device_name()}
for mx in ("gdn", "gla"):
    torch.manual_seed(0)
    ref = build_mixer(mx, 576, 9, 64, 0, MixerOptions(backend="torch")).cuda()
    x = torch.randn(2, 512, 576, device="cuda")
    w = torch.linspace(-1, 1, 576, device="cuda")
    out = {}
    for name, dt, be in (("torch32", torch.float32, "torch"), ("fla32", torch.float32, "fla"), ("fla16", torch.bfloat16, "fla")):
        m = build_mixer(mx, 576, 9, 64, 0, MixerOptions(backend=be)).cuda().to(dt)
        m.load_state_dict(ref.state_dict())
        xi = x.to(dt).clone().requires_grad_()
        o = m(hidden_states=xi)[0]
        (o.float() * w).sum().backward()
        out[name] = (o.detach().float(), xi.grad.float(), {k: p.grad.float() for k, p in m.named_parameters()})
    r = out["torch32"]
    for k in ("fla32", "fla16"):
        res[f"{mx}_{k}_vs_torch32"] = {"out": rel(out[k][0], r[0]), "dx": rel(out[k][1], r[1]),
                                       "dparam_max": max(rel(out[k][2][n], r[2][n]) for n in r[2])}
if len(sys.argv) > 1:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (2, 512), generator=torch.Generator().manual_seed(1)).cuda()
    lg = {}
    for be, dt in (("torch", torch.float32), ("fla", torch.bfloat16)):
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dt).cuda().train()
        for layer in m.model.layers:
            if hasattr(layer.self_attn, "options"):
                layer.self_attn.options.backend = be
        o = m(ids, labels=ids, use_cache=False)
        o.loss.backward()
        lg[be] = (o.logits.float().detach(), float(o.loss),
                  {k: p.grad.float() for k, p in m.named_parameters() if "self_attn" in k and p.grad is not None})
    g = sorted(rel(lg["fla"][2][k], lg["torch"][2][k]) for k in lg["torch"][2])
    res["trained_hybrid_fla16_vs_torch32"] = {"logits": rel(lg["fla"][0], lg["torch"][0]),
                                              "loss": [lg["fla"][1], lg["torch"][1]],
                                              "attn_grad_median": g[len(g) // 2], "attn_grad_max": g[-1]}
print(json.dumps(res, indent=1))
