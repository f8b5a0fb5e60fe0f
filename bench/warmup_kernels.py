"""Compile (and autotune) the Triton kernels a run will use, at its shapes, before the run: fla's linear-attention
forward/backward for one mixer and the fused linear+KL loss. On a fresh GPU machine the first fla call spends
minutes compiling; with a shared TRITON_CACHE_DIR, warming several shapes in parallel processes (one per GPU) while
other jobs start hides most of it.

    python bench/warmup_kernels.py --hidden 4096 --heads 32 --head-dim 128 --seq 4096 --vocab 128256
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixer", default="gdn")
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--seq", type=int, nargs="+", required=True, help="sequence lengths to run")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=0, help="also the fused KL at this vocab (0: skip)")
    args = ap.parse_args()

    from ds_hybrid.kernels.fused_kl import fused_linear_loss
    from ds_hybrid.modeling.mixers import MixerOptions, build_mixer

    dev, dt = torch.device("cuda"), torch.bfloat16
    mixer = build_mixer(args.mixer, args.hidden, args.heads, args.head_dim, 0, MixerOptions.from_dict({}))
    mixer = mixer.to(dev, dt)
    for seq in args.seq:
        t0 = time.perf_counter()
        x = torch.randn(args.batch, seq, args.hidden, device=dev, dtype=dt, requires_grad=True)
        out, _ = mixer(x)
        out.float().square().mean().backward()
        with torch.no_grad():
            mixer(x[:, : seq // 2])  # a second length: kernels specialised on T get built too
        torch.cuda.synchronize()
        print(f"{args.mixer} hidden {args.hidden} seq {seq}: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.vocab:
            t0 = time.perf_counter()
            n = args.batch * seq
            h_s = torch.randn(n, args.hidden, device=dev, dtype=dt, requires_grad=True)
            w_s = (torch.randn(args.vocab, args.hidden, device=dev, dtype=dt) * 0.02).requires_grad_()
            h_t = torch.randn(n, args.hidden, device=dev, dtype=dt)
            w_t = torch.randn(args.vocab, args.hidden, device=dev, dtype=dt) * 0.02
            loss, _ = fused_linear_loss(h_s, w_s, h_t, w_t)
            loss.backward()
            torch.cuda.synchronize()
            print(f"fused KL vocab {args.vocab} tokens {n}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
