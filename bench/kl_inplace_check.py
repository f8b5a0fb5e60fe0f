"""GPU check of the KL row kernel's in-place gradient (issue 21): dz written over the student logits must equal,
bit for bit, dz written to a buffer of its own, at vocabularies and tiles where warps could race.

    python bench/kl_inplace_check.py --out kl_inplace_check.json

``in_place=True`` stores bf16 dz column c in the bytes of fp32 z_s column c // 2, columns an earlier tile (or this
one, read by another warp) has read; a barrier orders each tile's loads before its stores. Triton's interpreter runs
a tile at once and cannot show a race, so this runs the compiled kernel: for each vocabulary (the project's shapes
and an odd one) and vocab tile, with and without the CE term, fp32 logits (bf16 dz in half of their bytes) and bf16
logits (``kl.fp32_logits: false``: dz over them element for element, the CE's label logit read before any store by a
barrier), both placements on the same logits; dz, the per-token KL and CE must be equal. Exit 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

VOCABS = (49_152, 128_256, 151_936, 262_144, 50_257)
TILES = (1024, 2048, 4096)


def check(V: int, block_v: int, with_ce: bool, logits: torch.dtype = torch.float32, rows: int = 256, seed: int = 0,
          device: str = "cuda") -> dict:
    from ds_hybrid.kernels.fused_kl import run_row_kernel

    g = torch.Generator(device=device).manual_seed(seed)
    zs = (torch.randn(rows, V, device=device, generator=g) * 4).to(logits)
    zt = (torch.randn(rows, V, device=device, generator=g) * 4).to(logits)
    kl_w = torch.ones(rows, device=device)
    labels = torch.randint(0, V, (rows,), device=device, generator=g) if with_ce else None
    scales = torch.tensor([0.3, 0.7 if with_ce else 0.0], device=device)
    ref, kl_ref, ce_ref = run_row_kernel(zs.clone(), zt, kl_w, labels, 1.0, scales, torch.bfloat16, block_v=block_v)
    got, kl_got, ce_got = run_row_kernel(zs, zt, kl_w, labels, 1.0, scales, torch.bfloat16, block_v=block_v,
                                         in_place=True)
    diff = (got.float() - ref.float()).abs()
    bad = (got != ref).nonzero()
    same = len(bad) == 0 and torch.equal(kl_got, kl_ref) and torch.equal(ce_got, ce_ref)
    return {"V": V, "block_v": block_v, "ce": with_ce, "logits": str(logits).removeprefix("torch."),
            "equal": bool(same),
            "differing": int(len(bad)), "first": bad[0].tolist() if len(bad) else None,
            "max_abs_diff": float(diff.max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kl_inplace_check: needs a CUDA device (the interpreter cannot race; tests/test_kernels.py covers it)")
    rows = []
    for V in VOCABS:
        for block_v in TILES:
            for with_ce, logits in ((c, d) for c in (False, True) for d in (torch.float32, torch.bfloat16)):
                r = check(V, block_v, with_ce, logits)
                print(json.dumps(r), flush=True)
                rows.append(r)
    ok = all(r["equal"] for r in rows)
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "ok": ok, "rows": rows}, indent=1))
    print("in-place dz equals the buffer's everywhere" if ok else "DIFFERENCES: see " + args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
