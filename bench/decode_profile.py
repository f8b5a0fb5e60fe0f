"""Where a decode step's time goes, hybrid vs teacher: per-step wall time, kernel launches, and time per layer kind.

`ds-hybrid bench-infer` measures decode tokens/s; this explains them. For each model, after a prefill of --context
tokens (batch --batch), it runs:
1. --steps timed decode steps (no sync inside): wall ms per token, as bench-infer measures it;
2. the same steps under torch.profiler: kernel launches per step, the top CPU-side ops by self time and the top
   device kernels by total time;
3. the same steps with a device sync around every decoder layer's mixer (softmax attention or linear mixer) and MLP:
   mean ms per call per kind. Syncing removes the overlap of host and device, so these add up to more than (1);
   they show where host time is spent when the step is launch bound.

With ``--static`` (issue 18) the steps are GraphDecoder's instead (ds_hybrid.graph_decode: static cache, decode
attention): (1) timed with CUDA graphs and (2) eagerly, then (3) the eager static steps under torch.profiler with the
GPU time of every aten op by input shapes, which names what a graph replays beyond the dynamic path's kernels.

    python bench/decode_profile.py --model hybrid=out/kl/hf --teacher embedded --context 4096 --out prof.json
    python bench/decode_profile.py --model hybrid=out/kl/hf --teacher embedded --context 32768 --batch 4 --static \
        --out static_prof.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ds_hybrid.evaluation.speed import decode, kernel_ms, prefill, random_ids


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _layer_kind(model, i: int) -> str:
    types = getattr(model.config, "layer_types", None)
    if model.config.model_type == "ds_hybrid" and types is not None:
        return "linear" if types[i] == "linear_attention" else "softmax"
    return "softmax"


def _timed_layers(model, steps: int, context: int, batch: int, seed: int) -> dict[str, dict[str, float]]:
    """Mean ms per call of each decoder layer's token mixer and MLP, by kind, with a sync around each."""
    dev = next(model.parameters()).device
    times: dict[str, list[float]] = defaultdict(list)
    handles = []
    starts: dict[int, float] = {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        kind = _layer_kind(model, i)
        mixer = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)
        for name, mod in ((f"{kind}_mixer", mixer), (f"{kind}_layer_mlp", layer.mlp)):
            if mod is None:
                continue

            def pre(m, args, key=id(mod)):
                _sync(dev)
                starts[key] = time.perf_counter()

            def post(m, args, out, key=id(mod), name=name):
                _sync(dev)
                times[name].append((time.perf_counter() - starts[key]) * 1e3)

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        cache, nxt = prefill(model, random_ids(model, context, batch, seed))
        times.clear()  # only decode steps count
        decode(model, cache, nxt, steps)
    finally:
        for h in handles:
            h.remove()
    return {k: {"mean_ms": sum(v) / len(v), "calls": len(v)} for k, v in sorted(times.items())}


@torch.no_grad()
def profile_model(model, context: int, batch: int, steps: int, seed: int = 0, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dev = next(model.parameters()).device
    cache, nxt = prefill(model, random_ids(model, context, batch, seed))
    decode(model, cache, nxt, steps)  # warm: per-shape kernel compilation and cuDNN graphs of every key length
    cache, nxt = prefill(model, random_ids(model, context, batch, seed))
    _sync(dev)
    t0 = time.perf_counter()
    decode(model, cache, nxt, steps)
    _sync(dev)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    cache, nxt = prefill(model, random_ids(model, context, batch, seed))
    _sync(dev)
    with profile(activities=acts) as prof:
        decode(model, cache, nxt, steps)
        _sync(dev)
    events = prof.key_averages()
    cpu_top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    res: dict = {
        "context": context, "batch": batch, "steps": steps, "wall_ms_per_token": wall_ms,
        "top_cpu_ops": [{"op": e.key, "calls_per_step": e.count / steps,
                         "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in cpu_top],
    }
    if dev.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        device_ms, n_kernels = kernel_ms(events)  # the measure bench-infer's "decode GPU ms/step" uses
        res["kernels_per_step"] = n_kernels / steps
        res["device_ms_per_step"] = device_ms / steps
        res["top_kernels"] = [{"kernel": e.key[:120], "calls_per_step": e.count / steps,
                               "device_ms_per_step": e.self_device_time_total / 1e3 / steps}
                              for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]]
        launches = [e for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")]
        res["launch_calls_per_step"] = sum(e.count for e in launches) / steps
    res["per_layer_kind"] = _timed_layers(model, steps, context, batch, seed)
    return res


@torch.no_grad()
def profile_static(model, context: int, batch: int, steps: int, seed: int = 0, top: int = 25,
                   compiled: bool = False) -> dict:
    """GraphDecoder's decode step: ms per step with graphs and eagerly, and the eager step's GPU time per aten op
    (top level). ``compiled``: also the step compiled by torch.compile, with graphs and without; the latter profiled
    under ``compiled_static_profile`` (its kernels per step: what Inductor's fusion left)."""
    from ds_hybrid.graph_decode import GraphDecoder

    dev = next(model.parameters()).device
    ids = random_ids(model, context, batch, seed)
    res: dict = {"context": context, "batch": batch, "steps": steps}
    modes = [("cuda_graphs", True, False), ("eager_static", False, False)]
    if compiled:
        modes += [("cuda_graphs_compiled", True, True), ("compiled_static", False, True)]
    for mode, graphs, comp in modes:
        decoder = GraphDecoder(model, max_len=context + steps + 1, cuda_graphs=graphs, compile=comp)
        for timed in (False, True):  # untimed: compiles, autotunes, captures
            decoder.prefill(ids, None, steps + 1)
            _sync(dev)
            t0 = time.perf_counter()
            decoder.decode(batch, steps)
            _sync(dev)
        res[f"{mode}_ms_per_step"] = (time.perf_counter() - t0) * 1e3 / steps
        if not graphs:
            prof = _profile_steps(decoder, ids, batch, steps, dev, top)
            if comp:
                res["compiled_static_profile"] = prof
            else:
                res.update(prof)
        del decoder
    return res


def _profile_steps(decoder, ids: torch.Tensor, batch: int, steps: int, dev: torch.device, top: int) -> dict:
    """``steps`` decode steps of ``decoder`` under torch.profiler: per aten op (with shapes) and per kernel."""
    from torch.profiler import ProfilerActivity, profile

    decoder.prefill(ids, None, steps + 1)
    _sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        decoder.decode(batch, steps)
        _sync(dev)
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == torch.autograd.DeviceType.CPU]  # aten ops, with the GPU time they launched
    timed_by = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    res: dict = {"top_ops": [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls_per_step": e.count / steps,
                              "ms_per_step": getattr(e, timed_by) / 1e3 / steps}
                             for e in sorted(ops, key=lambda e: getattr(e, timed_by), reverse=True)[:top]]}
    if dev.type == "cuda":
        device_ms, n_kernels = kernel_ms(prof.key_averages())
        res["device_ms_per_step"] = device_ms / steps
        res["kernels_per_step"] = n_kernels / steps
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        res["top_kernels"] = [{"kernel": e.key[:120], "calls_per_step": e.count / steps,
                               "device_ms_per_step": e.self_device_time_total / 1e3 / steps}
                              for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]]
    return res


def markdown(results: dict[str, dict]) -> str:
    lines = ["| model | ms / token | kernels / step | device ms / step | softmax mixer ms | linear mixer ms | MLP ms |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        k = r["per_layer_kind"]
        mlp = [v["mean_ms"] for key, v in k.items() if key.endswith("_mlp")]

        def cell(key: str) -> str:
            return f"{k[key]['mean_ms']:.3f}" if key in k else "-"

        lines.append(f"| {name} | {r['wall_ms_per_token']:.2f} | {r.get('kernels_per_step', float('nan')):.0f} | "
                     f"{r.get('device_ms_per_step', float('nan')):.2f} | {cell('softmax_mixer')} | "
                     f"{cell('linear_mixer')} | {sum(mlp) / max(1, len(mlp)):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="HF folder or name=folder; repeatable")
    ap.add_argument("--teacher", default=None, help="HF folder or 'embedded'")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--static", action="store_true", help="profile GraphDecoder's static-cache step instead")
    ap.add_argument("--compile", action="store_true", help="with --static: also the step compiled by torch.compile")
    ap.add_argument("--out", required=True, help="JSON file (a .md table is written beside it)")
    args = ap.parse_args()

    from ds_hybrid.evaluation.run import _device, _dtype, describe, load_model, parse_models
    from ds_hybrid.monitor import versions

    dev = _device(args.device)
    dtype = _dtype(args.dtype, dev)
    results, info = {}, {}
    for name, path in parse_models(args.model, args.teacher).items():
        model, _, _ = load_model(path, dev, dtype)
        info[name] = describe(model)
        if args.static:
            results[name] = r = profile_static(model, args.context, args.batch, args.steps, compiled=args.compile)
            print(name, json.dumps(r, indent=1), flush=True)
        else:
            results[name] = profile_model(model, args.context, args.batch, args.steps)
            print(name, f"{results[name]['wall_ms_per_token']:.2f} ms/token", flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"versions": versions(), "device": str(dev), "dtype": str(dtype),
                               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                               "models": info, "results": results}, indent=1))
    if not args.static:
        md = markdown(results)
        out.with_suffix(".md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
