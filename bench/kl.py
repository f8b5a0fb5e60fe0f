"""Benchmark of the vocabulary-wide KL loss (forward + backward), every implementation in ONE run on one card.

    python bench/kl.py [--shapes all|small] [--out results.json]
    python bench/kl.py --report results.json   # issue 21's verdict per shape from a run's JSON (no GPU)

For each shape (N tokens, hidden H, vocab V; bf16 hidden states and lm_heads):
- naive: torch with materialized fp32 logits (log_softmax + kl_div, batchmean), autograd
- fla: flash-linear-attention's FusedKLDivLoss
- chunked: ds-hybrid's torch reference (chunks of 1024 tokens, fp32, gradients formed in the forward)
- ours: ds-hybrid's fused kernel (cuBLAS bf16->fp32 GEMMs + Triton row kernel) as training calls it, dL/dz written
  over the student logits (8 bytes a logit of extra memory); ours_buffer: the same with dL/dz in a buffer of its own
  (``in_place=False``: 10 bytes a logit; the default until 2026-12-03, whose rows called the in-place one
  ours_inplace); ours_bf16: the same with bf16 logits (``fp32_logits=False``, ``kl.fp32_logits: false``: 10 bytes a
  logit in the row kernel instead of 18, each logit rounded to bf16 once, so its errors are bf16 logits' own);
  ours_bf16_dw2, ours_bf16_dw4: the same with dW's GEMM over 2 or 4 chunks at once (``dw_chunk``: their dz kept in
  one logit buffer, up to 1 or 3 chunks' logits more memory (fewer where N is shorter than the group: dw4 at
  2 x chunk >= N is dw2), the [V, H] dW read and written once per group)
  (every ``ours`` row sums dW over chunks in fp32, ``dw_fp32``, the default since 2026-12-06); ours_bf16_sum16: ours_bf16
  with dW summed in bf16 (``dw_fp32=False``, ``kl.dw_fp32: false``, the path before: no fp32 [V, H] accumulator)
- liger: Liger-Kernel's LigerFusedLinearJSD with jsd_beta = 0 (its forward KL(teacher || student); `pip install
  ".[bench]"`), timed only after a small fp32 case shows it equals forward KL (else the row records the mismatch)
- torchtune: torchtune's chunked forward-KL algorithm written plainly (torchtune itself does not install beside our
  pins: it wants torchao): the LM heads applied per chunk of tokens (8 chunks) in bf16, each chunk's loss in fp32 by
  autograd, so every chunk's logits stay saved for the backward. torchtune's loss is the cross-entropy
  -sum p_t log p_s; the teacher's entropy (no gradient) is added here so that the loss is the KL and comparable
Prints the median of 10 timed iterations after 3 warm-ups (CUDA events), effective TFLOP/s (8 N H V / time), extra
peak memory over the inputs and their gradients (written by every implementation alike), and the errors against an
fp64 reference (chunked, fp64 on the GPU) of the loss (relative), dx and dW (relative L2 norm). Also prints the
card, versions and the bf16 matmul ceiling measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "qwen2.5-3b": (8192, 2048, 151936),
    "llama3-70b": (4096, 8192, 128256),
    "smollm2-135m": (16384, 576, 49152),
    "gemma3-270m": (16384, 640, 262144),  # V = 262,144 (issue 17: the Gemma 3 vocabulary)
}
TORCHTUNE_CHUNKS = 8  # torchtune's num_output_chunks default


def torchtune_chunked(hs, ws, ht, wt):
    """torchtune's ForwardKLWithChunkedOutputLoss, plainly: per chunk bf16 logits, fp32 softmax terms, autograd."""
    total = hs.new_zeros((), dtype=torch.float32)
    for h_s, h_t in zip(hs.chunk(TORCHTUNE_CHUNKS), ht.chunk(TORCHTUNE_CHUNKS)):
        zs = h_s @ ws.t()
        with torch.no_grad():
            zt = h_t @ wt.t()
            p_t = F.softmax(zt, -1, dtype=torch.float32)
            neg_entropy = (p_t * F.log_softmax(zt, -1, dtype=torch.float32)).sum()
        log_ps = F.log_softmax(zs, -1, dtype=torch.float32)
        total = total + neg_entropy - (p_t * log_ps).sum()
    return total / hs.shape[0]


def liger_forward_kl():
    """Liger's fused linear JSD at beta = 0, or (None, why) when it is missing or is not the forward KL."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as e:  # noqa: BLE001 - an optional baseline
        return None, f"liger-kernel unavailable: {e}"
    fn = LigerFusedLinearJSD(jsd_beta=0.0)
    # the check: a small fp32 case against the materialized forward KL (batchmean), loss and both gradients
    g = torch.Generator(device="cuda").manual_seed(1)
    n, h, v = 256, 64, 1000
    hs = torch.randn(n, h, device="cuda", generator=g).requires_grad_()
    ws = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).requires_grad_()
    ht, wt = torch.randn(n, h, device="cuda", generator=g), torch.randn(v, h, device="cuda", generator=g) * h**-0.5
    ref = naive(hs, ws, ht, wt)
    dref = torch.autograd.grad(ref, (hs, ws))
    got = fn(hs, ws, ht, wt, None)  # shift_labels = None: no ignored tokens
    dgot = torch.autograd.grad(got, (hs, ws))
    errs = [abs(float(got - ref)) / abs(float(ref))] + [float((a - b).norm() / b.norm()) for a, b in zip(dgot, dref)]
    print(f"liger jsd_beta=0 vs forward KL (fp32, N={n} V={v}): loss/dx/dW rel err {errs}")
    if max(errs) > 1e-4:
        return None, f"liger jsd_beta=0 is not the forward KL here: rel errors {errs}"
    return (lambda hs, ws, ht, wt: fn(hs, ws, ht, wt, None)), None


def naive(hs, ws, ht, wt):
    zs = (hs @ ws.t()).float()
    zt = (ht @ wt.t()).float()
    return F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="batchmean")


def make_impls(chunks: tuple[int, ...] = (1024,)):
    """The implementations by name; ours at each chunk of ``chunks`` (tokens per chunk: its logit blocks are chunk x V
    fp32, so the chunk sets its extra memory), named ``ours`` at 1024 and ``ours@C`` at any other C."""
    from ds_hybrid.kernels.fused_kl import fused_linear_loss
    from ds_hybrid.losses import chunked_linear_loss

    impls = {"naive": naive}
    try:
        from fla.modules import FusedKLDivLoss

        fla_loss = FusedKLDivLoss(reduction="batchmean")
        impls["fla"] = lambda hs, ws, ht, wt: fla_loss(hs, ht, ws, wt)
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
        print(f"fla FusedKLDivLoss unavailable: {e}")
    impls["chunked"] = lambda hs, ws, ht, wt: chunked_linear_loss(hs, ws, ht, wt, chunk=1024)[0]
    for c in chunks:
        impls["ours" if c == 1024 else f"ours@{c}"] = \
            lambda hs, ws, ht, wt, c=c: fused_linear_loss(hs, ws, ht, wt, chunk=c)[0]
        impls["ours_buffer" if c == 1024 else f"ours_buffer@{c}"] = \
            lambda hs, ws, ht, wt, c=c: fused_linear_loss(hs, ws, ht, wt, chunk=c, in_place=False)[0]
        impls["ours_bf16" if c == 1024 else f"ours_bf16@{c}"] = \
            lambda hs, ws, ht, wt, c=c: fused_linear_loss(hs, ws, ht, wt, chunk=c, fp32_logits=False)[0]
        impls["ours_bf16_sum16" if c == 1024 else f"ours_bf16_sum16@{c}"] = \
            lambda hs, ws, ht, wt, c=c: fused_linear_loss(hs, ws, ht, wt, chunk=c, fp32_logits=False,
                                                          dw_fp32=False)[0]
        for g in (2, 4):  # dW's GEMM over g chunks (their dz kept): g - 1 passes over the [V, H] dW fewer a group
            impls[f"ours_bf16_dw{g}" if c == 1024 else f"ours_bf16_dw{g}@{c}"] = \
                lambda hs, ws, ht, wt, c=c, g=g: fused_linear_loss(hs, ws, ht, wt, chunk=c, fp32_logits=False,
                                                                   dw_chunk=g * c)[0]
    impls["torchtune"] = torchtune_chunked
    liger, why = liger_forward_kl()
    if liger is not None:
        impls["liger"] = liger
    else:
        print(why)
    return impls


def matmul_ceiling(n=8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = []
    for _ in range(10):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        t.append(s.elapsed_time(e))
    return 2 * n**3 / (statistics.median(t) / 1e3) / 1e12


def reference(hs, ws, ht, wt):
    """fp64 chunked reference on the GPU: loss, dx, dW (kept on the CPU)."""
    from ds_hybrid.losses import chunked_linear_loss

    h = hs.detach().double().requires_grad_()
    w = ws.detach().double().requires_grad_()
    loss, _ = chunked_linear_loss(h, w, ht.double(), wt.double(), chunk=256)
    loss.backward()
    out = float(loss), h.grad.cpu(), w.grad.float().cpu()
    del h, w
    torch.cuda.empty_cache()
    return out


def bench_one(name, fn, hs, ws, ht, wt, ref, iters=10, warmup=3):
    def step():
        hs.grad = None
        ws.grad = None
        loss = fn(hs, ws, ht, wt)
        loss.backward()
        return loss

    # the gradients of the previous implementation are freed by step(): give the first one gradients too, so that
    # every row's extra memory excludes them alike (before 2026-12-03e the first row of each shape included them)
    for t in (hs, ws):
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        loss = step()
    except torch.OutOfMemoryError as e:
        return {"impl": name, "error": f"OOM: {e}"[:200]}
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ref_loss, ref_dx, ref_dw = ref
    err = {
        "loss_rel_err": abs(float(loss) - ref_loss) / abs(ref_loss),
        "dx_rel_err": float((hs.grad.double().cpu() - ref_dx).norm() / ref_dx.norm()),
        "dw_rel_err": float((ws.grad.float().cpu() - ref_dw).norm() / ref_dw.norm()),
    }
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return {"impl": name, "median_ms": statistics.median(times), "extra_peak_gib": peak / 2**30, **err}


BASELINES = ("naive", "fla", "torchtune", "liger")


def verdict(rows: list[dict], target_ms: dict[str, float] | None = None) -> list[dict]:
    """Per shape of one run: the baselines' time and extra memory, and our fastest row (any chunk, fp32 or 16-bit
    logits) whose extra memory is at most the leanest baseline's (issue 21: "beats every one in time at every shape,
    at no more extra memory than the leanest"); ``beats_all`` is False where no row of ours fits or one baseline is
    at least as fast. A baseline that failed (OOM, mismatch) is left out of both the time and the memory bar."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and "median_ms" in r]
        base = {r["impl"]: r for r in mine if r["impl"] in BASELINES}
        ours = [r for r in mine if r["impl"].startswith("ours")]
        if not base or not ours:
            out.append({"shape": shape, "error": "no baseline row" if not base else "no row of ours"})
            continue
        leanest = min(base.values(), key=lambda r: r["extra_peak_gib"])
        fits = [r for r in ours if r["extra_peak_gib"] <= leanest["extra_peak_gib"] + 1e-9]
        best = min(fits, key=lambda r: r["median_ms"]) if fits else None
        fastest_base = min(base.values(), key=lambda r: r["median_ms"])
        v = {"shape": shape, "leanest": leanest["impl"], "leanest_gib": leanest["extra_peak_gib"],
             "fastest_baseline": fastest_base["impl"], "fastest_baseline_ms": fastest_base["median_ms"],
             "ours": best["impl"] if best else None, "ours_ms": best["median_ms"] if best else None,
             "ours_gib": best["extra_peak_gib"] if best else None,
             "ours_fastest": min(ours, key=lambda r: r["median_ms"])["impl"],
             "ours_fastest_ms": min(r["median_ms"] for r in ours),
             "beats_all": best is not None and best["median_ms"] < fastest_base["median_ms"]}
        if target_ms and shape in target_ms:
            v["target_ms"] = target_ms[shape]
            v["target_met"] = best is not None and best["median_ms"] <= target_ms[shape]
        out.append(v)
    return out


def plot(rows: list[dict], out: str) -> None:
    """Time (bars) of each baseline and of our fastest row under the leanest baseline's memory (hatched: our fastest
    row, where none fits), per shape, each bar labelled with its extra GiB; one run's rows, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verdicts = [v for v in verdict(rows) if "error" not in v]
    fig, ax = plt.subplots(figsize=(2.6 * max(len(verdicts), 1) + 2, 4.2))
    n = len(BASELINES) + 1
    width = 0.8 / n
    for i, v in enumerate(verdicts):
        by_impl = {r["impl"]: r for r in rows if r["shape"] == v["shape"] and "median_ms" in r}
        bars = [(name, by_impl[name], f"C{j}", None) for j, name in enumerate(BASELINES) if name in by_impl]
        if v["ours"]:
            bars.append(("ours, under the leanest's memory", by_impl[v["ours"]], f"C{n - 1}", None))
        else:
            bars.append(("ours, fastest (over the leanest's memory)", by_impl[v["ours_fastest"]], f"C{n - 1}", "//"))
        for j, (label, r, color, hatch) in enumerate(bars):
            x = i + (j - (len(bars) - 1) / 2) * width
            ax.bar(x, r["median_ms"], width, color=color, hatch=hatch, label=label)
            ax.text(x, r["median_ms"], f"{r['extra_peak_gib']:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(verdicts)), [v["shape"] for v in verdicts])
    ax.set_yscale("log")
    ax.set_ylabel("ms, forward + backward (label: extra GiB)")
    ax.set_title("Fused linear + KL loss, one run (bench/kl.py)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per label
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def report(path: str, plot_out: str | None = None) -> None:
    rows = json.loads(Path(path).read_text())["rows"]
    if plot_out:
        plot(rows, plot_out)
    print("| shape | fastest baseline (ms) | leanest baseline (extra GiB) | ours under the leanest's memory (ms / GiB) "
          "| beats every baseline | ours fastest at any memory (ms) | target |\n|---|---|---|---|---|---|---|")
    for v in verdict(rows, {"llama3-70b": 55.0}):
        if "error" in v:
            print(f"| {v['shape']} | {v['error']} |")
            continue
        ours = f"{v['ours']} {v['ours_ms']:.1f} / {v['ours_gib']:.2f}" if v["ours"] else "none fits"
        target = (f"<= {v['target_ms']:g}: {'met' if v['target_met'] else 'missed'}" if "target_ms" in v else "")
        print(f"| {v['shape']} | {v['fastest_baseline']} {v['fastest_baseline_ms']:.1f} | {v['leanest']} "
              f"{v['leanest_gib']:.2f} | {ours} | {'yes' if v['beats_all'] else 'no'} | {v['ours_fastest']} "
              f"{v['ours_fastest_ms']:.1f} | {target} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="all", help="all, or comma-separated names of " + ", ".join(SHAPES))
    ap.add_argument("--impls", default="all", help="all, or comma-separated names (naive, fla, chunked, ours, "
                    "ours_buffer, ours_bf16, ours_bf16_sum16, ours_bf16_dw2, ours_bf16_dw4, torchtune, liger)")
    ap.add_argument("--chunks", default="1024", help="our kernel's tokens per chunk, comma-separated (e.g. 256,512,1024: "
                    "its time and extra memory at each; rows ours@C, ours at 1024)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None, metavar="JSON", help="print the verdict table of an earlier run's --out "
                    "and exit (no GPU)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="with --report: a bar chart of the same (time and "
                    "extra memory of each baseline and of our row under the leanest's memory, per shape)")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.plot)
        return
    try:
        chunks = tuple(int(c) for c in args.chunks.split(","))
    except ValueError:
        ap.error(f"--chunks {args.chunks!r}: give positive integers, comma-separated (e.g. 256,512,1024)")
    if any(c < 1 for c in chunks):
        ap.error(f"--chunks {args.chunks!r}: every chunk must be >= 1 token")
    import triton

    import fla

    try:
        import liger_kernel  # noqa: F401

        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except Exception:  # noqa: BLE001
        liger_version = None
    info = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fla": getattr(fla, "__version__", "?"), "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
            "liger_kernel": liger_version, "bf16_matmul_tflops": matmul_ceiling()}
    print(json.dumps(info))
    names = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    impls = make_impls(chunks)
    if args.impls != "all":  # "ours" selects every chunk of --chunks
        impls = {k: v for k, v in impls.items() if k.split("@")[0] in args.impls.split(",")}
    rows = []
    for shape in names:
        N, H, V = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        hs = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
        ws = (torch.randn(V, H, device="cuda", generator=g) * H**-0.5).bfloat16().requires_grad_()
        ht = torch.randn(N, H, device="cuda", generator=g).bfloat16()
        wt = (torch.randn(V, H, device="cuda", generator=g) * H**-0.5).bfloat16()
        ref = reference(hs, ws, ht, wt)
        flops = 8 * N * H * V
        for name, fn in impls.items():
            r = bench_one(name, fn, hs, ws, ht, wt, ref)
            r.update(shape=shape, N=N, H=H, V=V)
            if "median_ms" in r:
                r["tflops"] = flops / (r["median_ms"] / 1e3) / 1e12
            rows.append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
        print(f"floor at the measured ceiling: {flops / (info['bf16_matmul_tflops'] * 1e12) * 1e3:.1f} ms")
        del hs, ws, ht, wt, ref
        torch.cuda.empty_cache()
    print("\n| shape | impl | ms | TFLOP/s | extra GiB | loss err | dx err | dW err |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "median_ms" in r:
            print(f"| {r['shape']} | {r['impl']} | {r['median_ms']:.1f} | {r['tflops']:.0f} | {r['extra_peak_gib']:.2f} | "
                  f"{r['loss_rel_err']:.1e} | {r['dx_rel_err']:.1e} | {r['dw_rel_err']:.1e} |")
        else:
            print(f"| {r['shape']} | {r['impl']} | {r['error']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
