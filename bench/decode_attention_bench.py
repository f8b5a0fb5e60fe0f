"""Decode attention over a static cache, one layer call at a time (issue 18): where a graph step's attention goes.

For each shape (query heads, KV heads, head dim), batch and context, one query token attends to a static cache of
S = context + 33 keys rounded up to 256 (GraphDecoder's cache since 2026-12-03b; ``exact`` rows: S = context + 33,
the length it allocated before), of which the first context + 1 are valid (a bool mask). Variants, each captured in a CUDA graph of ``--calls`` calls (round-robin over 4 caches, so that the L2
cache does not hold the keys) and replayed; microseconds per call = median replay time / calls:

- ``grouped``: ds_hybrid.modeling.decode_attention (probs @ V split over key blocks), what GraphDecoder runs;
- ``grouped_one_matmul``: the same with probs @ V as one matmul over all S (before 2026-12-03b);
- ``sdpa_repeat_kv``: transformers' sdpa function with the mask (K/V expanded to every query head: before 12-03);
- ``sdpa_valid``: SDPA on the valid keys only, no mask, ``enable_gqa`` (what eager decoding with a dynamic cache
  runs; a length-dependent shape, so not something one graph can replay: the reference speed).

``GB/s`` counts the valid K and V bytes read once. ``max_err``: against ``sdpa_valid`` in the same dtype.

    python bench/decode_attention_bench.py --out /tmp/decode_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"llama3_8b": (32, 8, 128), "smollm2_135m": (9, 3, 64)}


def variants():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ds_hybrid.modeling import decode_attention as da

    class _M(torch.nn.Module):  # what sdpa_attention_forward reads from its module
        is_causal = True
        training = False

    mod = _M()

    def grouped(q, k, v, mask, valid):
        return da.grouped_decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)

    def grouped_one_matmul(q, k, v, mask, valid):
        blocks, da.KEY_BLOCKS = da.KEY_BLOCKS, ()
        try:
            return da.grouped_decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)
        finally:
            da.KEY_BLOCKS = blocks

    def sdpa_repeat_kv(q, k, v, mask, valid):
        mod.num_key_value_groups = q.shape[1] // k.shape[1]
        return sdpa_attention_forward(mod, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]

    def sdpa_valid(q, k, v, mask, valid):
        out = F.scaled_dot_product_attention(q, k[:, :, :valid], v[:, :, :valid], enable_gqa=True)
        return out.transpose(1, 2)

    return {"grouped": grouped, "grouped_one_matmul": grouped_one_matmul, "sdpa_repeat_kv": sdpa_repeat_kv,
            "sdpa_valid": sdpa_valid}


def time_graph(fn, args_list, calls: int, reps: int) -> float:
    """Median microseconds per call of ``fn`` replayed from one CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel selection, lazy init) outside the capture
        for a in args_list:
            fn(*a)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*args_list[i % len(args_list)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    fns = variants()
    rows = []
    for shape in args.shapes.split(","):
        H, Hkv, D = SHAPES[shape]
        for c, B, lens in ((c, B, lens) for c in (int(x) for x in args.contexts.split(","))
                           for B in (int(x) for x in args.batches.split(",")) for lens in ("aligned", "exact")):
            S = -(-(c + 33) // 256) * 256 if lens == "aligned" else c + 33
            valid = c + 1
            g = torch.Generator(device=dev).manual_seed(0)
            caches = [(torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, generator=g),
                       torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, generator=g)) for _ in range(4)]
            q = torch.randn(B, H, 1, D, device=dev, dtype=dtype, generator=g)
            mask = (torch.arange(S, device=dev) < valid).view(1, 1, 1, S).expand(B, 1, 1, S).contiguous()
            args_list = [(q, k, v, mask, valid) for k, v in caches]
            ref = fns["sdpa_valid"](*args_list[0]).float()
            kv_bytes = 2 * B * Hkv * valid * D * 2
            for name, fn in fns.items():
                if lens == "exact" and not name.startswith("grouped"):
                    continue
                try:
                    err = (fn(*args_list[0]).float() - ref).abs().max().item()
                    us = time_graph(fn, args_list, args.calls, args.reps)
                except torch.OutOfMemoryError:
                    rows.append({"shape": shape, "context": c, "batch": B, "variant": name, "error": "oom"})
                    continue
                row = {"shape": shape, "heads": H, "kv_heads": Hkv, "head_dim": D, "context": c, "cache_len": S,
                       "cache": lens, "batch": B, "variant": name, "us_per_call": round(us, 1),
                       "gb_per_s": round(kv_bytes / us / 1e3, 1), "max_err": err}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del caches
            torch.cuda.empty_cache()
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
