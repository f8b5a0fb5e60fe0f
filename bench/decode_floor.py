"""The bandwidth floor of decoding: bytes a step moves for a teacher and its hybrid, and the speed-up they allow.

    python bench/decode_floor.py --config runs/configs/llama3_8b --softmax-layers 0,8,16,24 \
        --contexts 4096,32768 --batches 4 --measured docs/data/bench_infer_8b_compiled_h200_2026-12-03d.json

Builds both models on the meta device from a teacher config (no weights), counts what one decode step reads and
writes (ds_hybrid.evaluation.decode_floor: weights, KV cache, recurrent state) and prints per (context, batch) the
teacher / hybrid byte ratio: the hybrid's best decode speed-up where both are bandwidth bound. Columns for mixer
variants show what leaner mixers allow: without the output gate (``mixer_options.use_gate: false``), with k/v
projections at the teacher's KV-head count (``mixer_options.grouped_kv: true``), and both. ``--measured``: a ``ds-hybrid bench-infer`` JSON whose measured decode tokens/s ratios
(the model with these softmax layers and mixer / the teacher, per mode) are printed beside the floors, with the
bandwidth each model's step reached (in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(config_dir: str, layers: list[int], mixer: str, options: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_hybrid.modeling import HybridForCausalLM
    from ds_hybrid.transfer import hybrid_config

    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(cfg)
        hybrid = HybridForCausalLM(hybrid_config(cfg, layers, mixer, options))
    return teacher, hybrid


def main(argv: list[str] | None = None) -> int:
    from ds_hybrid.evaluation.decode_floor import decode_step_bytes
    from ds_hybrid.layers import parse_layer_list

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a teacher's config folder (config.json)")
    ap.add_argument("--softmax-layers", required=True, help="the hybrid's softmax layers, e.g. 0,8,16,24")
    ap.add_argument("--mixer", default="gdn")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--batches", default="4")
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--measured", default=None, help="a bench-infer JSON (rows of decode tokens/s) to set beside")
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args(argv)
    layers = parse_layer_list(args.softmax_layers, "--softmax-layers")
    b = args.dtype_bytes
    teacher, hybrid = build(args.config, layers, args.mixer, {})
    variants = {name: build(args.config, layers, args.mixer, opts)[1] for name, opts in (
        ("no_gate", {"use_gate": False}), ("grouped_kv", {"grouped_kv": True}),
        ("grouped_kv_no_gate", {"grouped_kv": True, "use_gate": False}))}
    measured = {}
    if args.measured:
        bench = json.loads(Path(args.measured).read_text())
        # the teacher's rows and those of the model with these softmax layers (not, e.g., an all-linear one)
        names = {"teacher": "teacher"} | {n: "hybrid" for n, m in bench.get("models", {}).items()
                                          if m.get("softmax_layers") == layers and m.get("mixer") == args.mixer}
        for r in bench["rows"]:
            if "decode_tokens_per_s" in r and r["model"] in names:
                measured[(names[r["model"]], r["mode"], r["context"], r["batch"])] = r["decode_tokens_per_s"]
    out = []
    print("| context | batch | teacher GB | hybrid GB | floor ratio | no output gate | grouped k/v | both | measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for T in [int(x) for x in args.contexts.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            t = decode_step_bytes(teacher, B, T, b)
            h = decode_step_bytes(hybrid, B, T, b)
            row = {"context": T, "batch": B, "teacher": t.to_dict(), "hybrid": h.to_dict(),
                   "floor_ratio": t.total / h.total, "measured": {}}
            for name, model in variants.items():
                v = decode_step_bytes(model, B, T, b)
                row[f"hybrid_{name}"] = v.to_dict()
                row[f"floor_ratio_{name}"] = t.total / v.total
            for mode in sorted({k[1] for k in measured}):
                ht, tt = measured.get(("hybrid", mode, T, B)), measured.get(("teacher", mode, T, B))
                if ht and tt:  # tokens/s -> ms a step -> GB/s reached
                    row["measured"][mode] = {"ratio": ht / tt, "teacher_gb_s": t.total / (B / tt) / 1e9,
                                             "hybrid_gb_s": h.total / (B / ht) / 1e9}
            out.append(row)
            meas = ", ".join(f"{m} {v['ratio']:.2f}x" for m, v in row["measured"].items()) or "-"
            print(f"| {T} | {B} | {t.total / 1e9:.2f} | {h.total / 1e9:.2f} | {row['floor_ratio']:.2f}x | "
                  f"{row['floor_ratio_no_gate']:.2f}x | {row['floor_ratio_grouped_kv']:.2f}x | "
                  f"{row['floor_ratio_grouped_kv_no_gate']:.2f}x | {meas} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "softmax_layers": layers, "mixer": args.mixer,
                                              "dtype_bytes": b, "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
