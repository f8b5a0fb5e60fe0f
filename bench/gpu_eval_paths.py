"""GPU check of eval's held-out quality paths in bf16: the fast path (decoder hidden states times the LM head in fp32,
chunked) against the reference path (the models' own logits), on a teacher and a hybrid, per row.

The CPU tests hold the two paths equal in fp32; in bf16 the model's own logits are rounded to bf16 where the fast path
keeps fp32, so the two differ by that rounding. This says by how much (CE and KL), and which path ``auto`` picks.

    python bench/gpu_eval_paths.py --model /tmp/h --teacher /tmp/dsh/smollm2-135m-instruct-v2 --out paths.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    import ds_hybrid  # noqa: F401  (registers the hybrid)
    from ds_hybrid.evaluation.quality import fast_path_ok, heldout_quality
    from ds_hybrid.evaluation.run import _heldout_rows, load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tok, _ = load_model(args.model, dev, dtype)
    teacher, _, _ = load_model(args.teacher, dev, dtype)
    rows, _ = _heldout_rows(argparse.Namespace(data="embedded", run_config=None, heldout_seq_len=args.seq_len,
                                            heldout_sequences=args.rows), tok)
    out: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dtype": args.dtype,
                 "rows": len(rows), "seq_len": args.seq_len,
                 "auto_fast": {"model": fast_path_ok(model, rows[0].to(dev)),
                               "teacher": fast_path_ok(teacher, rows[0].to(dev))}}
    with torch.inference_mode():
        for name, m, t in (("teacher", teacher, None), ("model", model, teacher)):
            for path in ("fast", "reference"):
                t0 = time.perf_counter()
                out[f"{name}_{path}"] = {**heldout_quality(m, rows, teacher=t, path=path),
                                         "s": round(time.perf_counter() - t0, 3)}
    for name in ("teacher", "model"):
        f, r = out[f"{name}_fast"], out[f"{name}_reference"]
        out[f"{name}_rel_diff"] = {k: abs(f[k] - r[k]) / max(abs(r[k]), 1e-12) for k in ("ce", "kl_to_teacher")
                                   if k in f}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
