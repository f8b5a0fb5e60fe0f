"""Where a profiled step's GPU time went, read from a torch.profiler Chrome trace (``traceEvents``).

Used by ``bench/train_throughput.py`` on its profiled steps; plain functions over the trace's events, tested on
synthetic traces (tests/test_throughput.py):

    from trace_analysis import analyse_trace
    summary = analyse_trace(Path("trace.json"), steps=3)  # kernel ms by phase and category, syncs, GEMMs by shape

- :func:`analyse_trace`: kernel time per step by phase (a kernel belongs to the innermost ``phase::<name>`` host range
  holding its launch), by category (:func:`kernel_category`), the longest kernels, host synchronisations;
- :func:`matmuls_by_shape`: every GEMM's time and TFLOP/s by operator and input shapes (needs ``record_shapes``);
- :func:`kernels_by_launching_op`: the longest kernels with the operator that launched them.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from pathlib import Path

KERNEL_CATEGORIES = (  # first match wins; names of flash/cuDNN attention, cuBLAS/CUTLASS, fla and our kernels
    # (attention first: cuDNN's SDPA kernels are named "cudnn_generated_..._sdpa_sm90_flash_...", which the gemm
    # keys' "sm90_" also matches; until 2026-12-03 they were counted as gemm)
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "splitk")),
    ("kl_kernel", ("_row_loss_kernel",)),
    ("linear_attention", ("chunk_", "fused_recurrent", "recompute_w_u", "solve_tril", "l2norm", "kkt", "wy_",
                          "cumsum", "merge_16x16", "_fwd_kernel", "_bwd_kernel")),
    ("optimizer", ("multi_tensor", "adam")),  # (not "lamb": it matches every "lambda" in elementwise kernel names)
    ("nccl", ("nccl",)),
    ("copy", ("memcpy", "memset", "copy_kernel", "catarraybatched", "fill")),
    ("compiled", ("triton_poi", "triton_red", "triton_per")),  # torch.compile's generated kernels
    ("elementwise", ("elementwise", "vectorized", "reduce", "unrolled", "softmax", "norm", "index")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
              "cuCtxSynchronize", "cuEventSynchronize")


def analyse_trace(trace_path: Path, steps: int) -> dict:
    """Kernel time by phase (launch timestamp inside the innermost phase range) and by category; syncs."""
    ev = json.loads(trace_path.read_text())["traceEvents"]
    ranges = []  # (start, end, name) on the host
    launches = {}  # correlation id -> host timestamp of the launch
    sync = {"count": 0, "host_ms": 0.0}
    memcpy_blocking = {"count": 0, "host_ms": 0.0}
    for e in ev:
        cat, name = e.get("cat", ""), e.get("name", "")
        if cat == "user_annotation" and name.startswith("phase::"):
            ranges.append((e["ts"], e["ts"] + e.get("dur", 0), name[7:]))
        elif cat in ("cuda_runtime", "cuda_driver"):
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches[corr] = e["ts"]
            if name in SYNC_CALLS:
                sync["count"] += 1
                sync["host_ms"] += e.get("dur", 0) / 1e3
            elif name in ("cudaMemcpy", "cudaMemcpyAsync") and e.get("dur", 0) > 50:  # > 50 us: it waited
                memcpy_blocking["count"] += 1
                memcpy_blocking["host_ms"] += e.get("dur", 0) / 1e3
    ranges.sort()
    starts = [r[0] for r in ranges]
    by_phase = defaultdict(float)
    by_cat = defaultdict(float)
    top = defaultdict(float)
    n_kernels = 0
    gpu_first, gpu_last = None, None
    for e in ev:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        dur = e.get("dur", 0) / 1e3
        n_kernels += e.get("cat") == "kernel"
        gpu_first = e["ts"] if gpu_first is None else min(gpu_first, e["ts"])
        gpu_last = max(gpu_last or 0, e["ts"] + e.get("dur", 0))
        name = e.get("name", "")
        by_cat[kernel_category(name)] += dur
        top[name[:90]] += dur
        ts = launches.get(e.get("args", {}).get("correlation"))
        phase = "step_end"
        if ts is not None:
            i = bisect.bisect_right(starts, ts) - 1
            while i >= 0:  # innermost range containing ts: the latest-starting one that has not ended
                s, t, n = ranges[i]
                if s <= ts <= t:
                    phase = n
                    break
                i -= 1
        by_phase[phase] += dur
    per = max(steps, 1)
    launched = kernel_ops(ev)
    return {
        "kernel_ms_per_step_by_phase": {k: round(v / per, 3) for k, v in sorted(by_phase.items())},
        "kernel_ms_per_step_by_category": {k: round(v / per, 3) for k, v in sorted(by_cat.items(), key=lambda x: -x[1])},
        "kernel_ms_per_step": round(sum(by_cat.values()) / per, 3),
        "kernels_per_step": round(n_kernels / per, 1),
        "host_syncs_per_step": round(sync["count"] / per, 2),
        "host_sync_ms_per_step": round(sync["host_ms"] / per, 3),
        "blocking_memcpy_per_step": round(memcpy_blocking["count"] / per, 2),
        "blocking_memcpy_ms_per_step": round(memcpy_blocking["host_ms"] / per, 3),
        "gpu_span_ms_per_step": round(((gpu_last or 0) - (gpu_first or 0)) / 1e3 / per, 3),
        "top_kernels_ms_per_step": {k: round(v / per, 3) for k, v in sorted(top.items(), key=lambda x: -x[1])[:30]},
        "matmuls_by_shape": matmuls_by_shape(launched, steps),
        "top_kernels_by_launching_op": kernels_by_launching_op(launched, steps),
    }


#: ATen's leaf matmul operators (they do not nest in one another); their input shapes give their FLOPs
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
              "aten::_scaled_mm")


def matmul_flops(op: str, dims: list) -> float | None:
    """2 x the multiply-adds of one call from its input shapes (the profiler's "Input Dims"), or None."""
    try:
        first = 1 if op in ("aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_") else 0  # (self first)
        a, b = dims[first], dims[first + 1]
        batch = a[0] if len(a) == 3 else 1
        return 2.0 * batch * a[-2] * a[-1] * b[-1]
    except (IndexError, TypeError, KeyError):
        return None


def matmuls_by_shape(launched: list[tuple[dict, dict | None, object]], steps: int, top: int = 30) -> list[dict]:
    """GPU time per step of every matmul by operator and input shapes (the profiler's ``record_shapes``): each kernel
    charged to the leaf matmul operator that launched it (:func:`innermost_ops`; cuBLAS's split-K reductions
    included), with its TFLOP/s. Shows which GEMMs run below the GPU's rate, e.g. the loss's [chunk x hidden] x
    [hidden x vocab] logits or a mixer's narrow projections. ``launched``: :func:`kernel_ops`. Empty without
    shapes."""
    ms: dict[tuple[str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str], set] = defaultdict(set)
    for e, op, tid in launched:
        dims = op.get("args", {}).get("Input Dims") if op else None
        if op is None or op.get("name") not in MATMUL_OPS or dims is None:
            continue
        key = (op["name"], json.dumps(dims))
        ms[key] += e.get("dur", 0) / 1e3
        calls[key].add((tid, op["ts"]))
    per = max(steps, 1)
    rows = []
    for key, total in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
        n = len(calls[key])
        flops = matmul_flops(key[0], json.loads(key[1]))
        rows.append({"op": key[0], "input_dims": json.loads(key[1]), "ms_per_step": round(total / per, 3),
                     "calls_per_step": round(n / per, 2),
                     "tflops": round(flops * n / (total * 1e-3) / 1e12, 1) if flops and total else None})
    return rows


def kernel_ops(ev: list[dict]) -> list[tuple[dict, dict | None, object]]:
    """(kernel event, the operator that launched it or None, the launching host thread) for every kernel of a trace:
    the innermost ``cpu_op`` on that thread whose range holds the launch (:func:`innermost_ops`)."""
    find = innermost_ops(ev)
    launch = {}
    for e in ev:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launch[corr] = (e.get("tid"), e["ts"])
    out = []
    for e in ev:
        if e.get("cat") == "kernel":
            at = launch.get(e.get("args", {}).get("correlation"))
            out.append((e, find(*at) if at is not None else None, at[0] if at is not None else None))
    return out


def innermost_ops(ev: list[dict]):
    """A lookup (tid, ts) -> the innermost ``cpu_op`` event on that host thread whose range holds ts, or None. The
    ranges of one thread nest; each keeps its parent, so a lookup is a bisection and a short walk up."""
    by_tid: dict[object, list[dict]] = defaultdict(list)
    for e in ev:
        if e.get("cat") == "cpu_op":
            by_tid[e.get("tid")].append(e)
    index = {}
    for tid, evs in by_tid.items():
        # a parent before a child that starts with it (same start and length: the one created first, the parent)
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0), e.get("args", {}).get("External id", 0)))
        parent, stack = [], []
        for j, e in enumerate(evs):
            while stack and evs[stack[-1]]["ts"] + evs[stack[-1]].get("dur", 0) < e["ts"]:
                stack.pop()
            parent.append(stack[-1] if stack else -1)
            stack.append(j)
        index[tid] = ([e["ts"] for e in evs], evs, parent)

    def find(tid, ts):
        if tid not in index:
            return None
        starts, evs, parent = index[tid]
        i = bisect.bisect_right(starts, ts) - 1
        while i >= 0 and evs[i]["ts"] + evs[i].get("dur", 0) < ts:
            i = parent[i]
        return evs[i] if i >= 0 else None

    return find


def kernels_by_launching_op(launched: list[tuple[dict, dict | None, object]], steps: int,
                            top: int = 30) -> list[dict]:
    """The longest kernels (by name, ms per step) with the operator that launched them (``launched``:
    :func:`kernel_ops`) and its input shapes: names a kernel's source where its own name does not (a cuBLAS tile, a
    fill, a copy)."""
    ms: dict[tuple[str, str, str], float] = defaultdict(float)
    n: dict[tuple[str, str, str], int] = defaultdict(int)
    for e, op, _ in launched:
        key = (e.get("name", "")[:90], op["name"] if op else "-",
               json.dumps(op.get("args", {}).get("Input Dims")) if op else "null")
        ms[key] += e.get("dur", 0) / 1e3
        n[key] += 1
    per = max(steps, 1)
    return [{"kernel": k[0], "op": k[1], "input_dims": json.loads(k[2]), "ms_per_step": round(v / per, 3),
             "launches_per_step": round(n[k] / per, 2)}
            for k, v in sorted(ms.items(), key=lambda kv: -kv[1])[:top]]
