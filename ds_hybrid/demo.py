"""The main job on the embedded default: SmolLM2-135M teacher -> 1/4 GDN hybrid -> generate.

    python -m ds_hybrid.demo [--out outputs/demo]
"""

from __future__ import annotations

import argparse

import torch

from ds_hybrid.layers import k_for_ratio, uniform_layers
from ds_hybrid.teacher import load_teacher
from ds_hybrid.transfer import build_hybrid

PROMPT = "The capital of France is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo")
    args = ap.parse_args()
    teacher, tok = load_teacher(None)
    L = teacher.config.num_hidden_layers
    layers = uniform_layers(L, k_for_ratio(0.25, L))
    hybrid = build_hybrid(teacher, layers, "gdn").eval()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        for name, m in (("teacher", teacher), ("hybrid (stage 0 only)", hybrid)):
            out = m.generate(**ids, max_new_tokens=12, do_sample=False)
            print(f"{name:>24}: {tok.decode(out[0], skip_special_tokens=True)!r}")
    hybrid.save_pretrained(f"{args.out}/hybrid")
    tok.save_pretrained(f"{args.out}/hybrid")
    print(f"softmax layers {layers} of {L}; saved to {args.out}/hybrid")


if __name__ == "__main__":
    main()
