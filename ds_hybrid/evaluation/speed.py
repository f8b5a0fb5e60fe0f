"""Inference speed and memory of a hybrid next to its teacher (``ds-hybrid bench-infer``).

For each context length C and batch size B, on random tokens (speed does not depend on content):
- prefill: one forward of [B, C] tokens that fills the cache -> tokens/s;
- decode: ``decode_tokens`` single-token steps with that cache -> tokens/s;
- cache memory: bytes held by the cache after decoding (KV tensors of softmax layers, recurrent and conv states of
  linear layers), counted from the tensors themselves; on CUDA also the peak allocated memory of the whole run;
- on CUDA, decode GPU time: the device time of the kernels of one decode step, from torch.profiler over a third,
  separate pass. Eager decoding at batch 1-8 is bound by the host (Python and ~1,200-2,000 kernel launches per
  step take 25-66 ms on an H200 host; the kernels take 2-20 ms), so wall-clock decode tokens/s measures the host
  and hides what the cache costs. GPU time is what a step costs once launches are hidden (CUDA graphs, as serving engines do); it is
  where the teacher's growing KV reads show (docs/BENCHMARKS.md).
Modes (a row's ``mode``): ``eager`` is the dynamic cache and an eager step per token, as above; ``cuda_graphs`` is
the static cache with the decode step replayed as a CUDA graph (ds_hybrid.graph_decode, CUDA only); ``static`` is
that static path run eagerly (CPU tests; on CUDA it isolates the cache change from the graph); the ``_compiled``
variants compile the static step with torch.compile first (``GraphDecoder(compile=True)``: its small kernels fused;
the untimed pass compiles it once per shape). Any mode + ``_fused`` runs it with the hybrid's input projections fused
into one GEMM a layer at decode (``HybridForCausalLM.fuse_input_projections``; hybrids with linear layers only:
other models have no such rows).
Every (C, B) is run once untimed, prefill and all ``decode_tokens`` steps, before its timed run: kernels are
compiled and autotuned per shape, and on Hopper PyTorch's cuDNN attention builds a new graph (tens of ms) for every
key length it has not seen, which a decode step meets at every token. A warm-up shorter than the timed decode left
those builds in the timed steps of whichever model ran first and spared the models after it (a 2-3x error on
the 2026-11-28 H200 runs, docs/RESULTS.md). For the static modes the untimed pass also captures the graph (the
static cache has one key length, max_len, for every step), so timed passes only replay. A size that does not fit
is reported as out-of-memory rather than ending the benchmark. Every row also gives the bytes one decode step must
move (``decode_step_gb``: weights, KV cache at ``decode_step_keys`` keys, recurrent states;
ds_hybrid.evaluation.decode_floor; a static mode's step reads its whole cache, ``cache_len``) and the bandwidth
its measured wall-clock step reached with them (``decode_gb_per_s``): near the HBM's, a step is bandwidth bound and
only fewer bytes make it faster; far below, launches and small kernels are the lever.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable

import torch


def cache_bytes(cache) -> int:
    total = 0
    seen: set[int] = set()
    for layer in getattr(cache, "layers", []):
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "recurrent_states", {}).values()) + list(getattr(layer, "conv_states", {}).values())
        tensors += list(getattr(layer, "conv_cache", None) or [])
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_ids(model, context: int, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, context] random token ids on the model's device (speed does not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(next(model.parameters()).device)


def prefill(model, ids: torch.Tensor):
    """One forward of ``ids`` into a fresh cache -> (cache, the greedy next token)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def decode(model, cache, nxt: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy single-token steps extending ``cache`` in place -> the last token."""
    for _ in range(steps):
        nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return nxt


@torch.no_grad()
def bench_model(model, context: int, batch: int, decode_tokens: int = 32, seed: int = 0,
                release: bool = True) -> dict:
    """One row of eager prefill and decode, timed. ``release``: give the allocator's cached blocks back first (for
    the untimed pass; the timed pass after it keeps them: a cudaMalloc in it would be timed)."""
    dev = next(model.parameters()).device
    ids = random_ids(model, context, batch, seed)
    if dev.type == "cuda":
        if release:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    try:
        _sync(dev)
        t0 = time.perf_counter()
        cache, nxt = prefill(model, ids)
        _sync(dev)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        decode(model, cache, nxt, decode_tokens)
        _sync(dev)
        t_decode = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        return {"context": context, "batch": batch, "error": "out of memory"}
    res = {"context": context, "batch": batch, "prefill_tokens_per_s": batch * context / t_prefill,
           "decode_tokens_per_s": batch * decode_tokens / t_decode, "cache_gib": cache_bytes(cache) / 2**30}
    if dev.type == "cuda":
        res["peak_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
    del cache
    return res


MODES: tuple[str, ...] = ("eager", "static", "cuda_graphs", "static_compiled", "cuda_graphs_compiled")
FUSED = "_fused"


@torch.no_grad()
def bench_static(decoder, context: int, batch: int, decode_tokens: int = 32, seed: int = 0) -> dict:
    """As :func:`bench_model`, through a ds_hybrid.graph_decode.GraphDecoder (static cache, graphs if it uses them).

    The decoder is reused for the untimed and the timed pass, so the timed pass replays the graph captured in the
    untimed one.
    """
    model = decoder.model
    dev = decoder.device
    ids = random_ids(model, context, batch, seed)
    try:
        _sync(dev)
        t0 = time.perf_counter()
        decoder.prefill(ids, None, decode_tokens + 1)
        _sync(dev)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoder.decode(batch, decode_tokens)
        _sync(dev)
        t_decode = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        return {"context": context, "batch": batch, "error": "out of memory"}
    res = {"context": context, "batch": batch, "prefill_tokens_per_s": batch * context / t_prefill,
           "decode_tokens_per_s": batch * decode_tokens / t_decode, "decode_ms_per_step": 1e3 * t_decode / decode_tokens,
           "cache_gib": cache_bytes(decoder.cache(batch)) / 2**30}
    return res


def kernel_ms(events) -> tuple[float, int]:
    """Total device time (ms) and count of the CUDA kernels in a torch.profiler ``key_averages()``."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / 1e3, sum(e.count for e in kernels)


@torch.no_grad()
def decode_gpu_ms(model, context: int, batch: int, decode_tokens: int = 32, seed: int = 0) -> float | None:
    """Mean device time of one decode step's kernels (ms) on CUDA, None elsewhere or on out-of-memory.

    Same prefill and decode steps as :func:`bench_model` (so no shape is new here); only the decode steps run under
    the profiler, and the profiler's host overhead does not change the kernels' device time.
    """
    from torch.profiler import ProfilerActivity, profile

    dev = next(model.parameters()).device
    if dev.type != "cuda":
        return None
    try:
        cache, nxt = prefill(model, random_ids(model, context, batch, seed))
        _sync(dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode(model, cache, nxt, decode_tokens)
            _sync(dev)
    except torch.OutOfMemoryError:
        return None
    del cache
    return kernel_ms(prof.key_averages())[0] / decode_tokens


def bench_pair(
    models: dict, contexts: list[int], batches: list[int], decode_tokens: int = 32, modes: tuple[str, ...] = ("eager",),
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows of every model x context x batch x mode; a model's modes side by side (same shapes, same tokens).
    ``on_row``: called with each row as it lands (bench-infer writes its JSON then)."""
    from ds_hybrid.evaluation.decode_floor import decode_step_bytes
    from ds_hybrid.graph_decode import GraphDecoder

    unknown = [m for m in modes if m.removesuffix(FUSED) not in MODES]
    if unknown:
        raise ValueError(f"bench mode {unknown[0]!r} is not one of {MODES} (each optionally + {FUSED!r})")
    rows = []
    for name, model in models.items():
        model.eval()
        fusable = hasattr(model, "fuse_input_projections") and bool(getattr(model.config, "linear_layers", ()))
        for c in contexts:
            for b in batches:
                for mode in modes:
                    fused = mode.endswith(FUSED)
                    if fused and not fusable:
                        continue
                    if fused:
                        model.fuse_input_projections()
                    if mode.removesuffix(FUSED) == "eager":
                        # untimed pass over exactly the shapes of the timed one (every decode step's key length
                        # included): compilation, autotuning and cuDNN graph builds must not land in the timed pass
                        r = bench_model(model, c, b, decode_tokens)
                        if "error" not in r:  # (a failed warm-up is the row: a timed pass after it would time
                            # what it left undone)
                            r = bench_model(model, c, b, decode_tokens, release=False)
                        if "error" not in r:
                            gpu_ms = decode_gpu_ms(model, c, b, decode_tokens)
                            if gpu_ms is not None:
                                r["decode_gpu_ms_per_step"] = gpu_ms
                                r["decode_gpu_bound_tokens_per_s"] = b * 1e3 / gpu_ms
                    else:
                        dev = next(model.parameters()).device
                        if dev.type == "cuda":  # peak over the cache, graph pool and activations, as bench_model
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats(dev)
                            base = torch.cuda.memory_allocated(dev)
                        graphs = mode.startswith("cuda_graphs")
                        decoder = GraphDecoder(model, max_len=c + decode_tokens + 1, cuda_graphs=graphs,
                                               compile=mode.removesuffix(FUSED).endswith("_compiled"))
                        if graphs and not decoder.uses_graphs:
                            raise ValueError(f"bench mode {mode!r} needs the model on a CUDA device")
                        r = bench_static(decoder, c, b, decode_tokens)  # untimed: compiles, autotunes, captures
                        if "error" not in r:  # (a failed warm-up is the row: the timed pass would capture)
                            r = bench_static(decoder, c, b, decode_tokens)
                        if dev.type == "cuda" and "error" not in r:
                            r["peak_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
                        # sliding-window layers held at full length (no rings: attention other than sdpa/eager)
                        # read all max_len keys (masked): such rows overstate what a windowed cache would cost
                        r["static_full_kv_sliding_layers"] = decoder.full_kv_sliding_layers
                        r["decode_step_keys"] = decoder.cache_len  # (its attention reads the whole static cache,
                        # masked: cache_len keys, the context and decode rounded up, not the context alone)
                        decoder.release()  # (its caches and graph pool go now, before the next, larger row is
                        del decoder       # measured: it refers to itself through its bound step until released)
                        gc.collect()
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                    if "error" not in r:  # the bytes a step must move, and the bandwidth the measured step reached
                        keys = r.setdefault("decode_step_keys", c)
                        # (sliding layers held at full length read every key, masked: counted so)
                        windowed = not r.get("static_full_kv_sliding_layers")
                        step = decode_step_bytes(model, b, keys, next(model.parameters()).element_size(),
                                                 windowed=windowed).total
                        r["decode_step_gb"] = step / 1e9
                        r["decode_gb_per_s"] = step * r["decode_tokens_per_s"] / b / 1e9
                    r["model"], r["mode"] = name, mode
                    rows.append(r)
                    if on_row is not None:
                        on_row(r)
                    if fused:
                        model.unfuse_input_projections()
                    # each row as it lands: a run stopped part way (a lease's time limit) keeps what it measured
                    print("bench-infer row", json.dumps(r, default=str), flush=True)
    return rows
