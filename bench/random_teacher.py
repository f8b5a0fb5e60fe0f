"""Write a random-init teacher as a HF folder (config.json + sharded safetensors + tokenizer), for memory and
throughput measurements at shapes nobody can download here (docs/SCALE.md).

    python bench/random_teacher.py --config runs/configs/llama3_8b/config.json --out /tmp/llama3_8b_random

Weights follow HF's Llama init (normal(0, initializer_range) for matrices, ones for norms), drawn on the GPU when
there is one; one shard is built and written at a time, so the host never holds the model whole. The tokenizer is
the embedded SmolLM2 one (its ids are a subset of any larger vocab); bos/eos ids in config.json are set from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def parameter_shapes(config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: p.shape for name, p in model.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a HF config.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default="embedded", help="a folder with tokenizer files (default: the embedded "
                    "SmolLM2 one; a folder lets a machine without the SmolLM2 GGUF run this)")
    args = ap.parse_args()

    from ds_hybrid.teacher import load_tokenizer

    out = Path(args.out)
    if (out / "model.safetensors.index.json").is_file():
        print(f"{out} exists; nothing to do")
        return
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(args.config)
    tok = load_tokenizer("embedded") if args.tokenizer == "embedded" else AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tok) > config.vocab_size:
        raise SystemExit(f"--config: vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tok)}")
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.dtype = "bfloat16"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    std = getattr(config, "initializer_range", 0.02)
    shapes = parameter_shapes(config)
    limit = int(args.shard_gib * 2**30)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    files: list[Path] = []

    def flush() -> None:
        nonlocal size
        name = out / f"part-{len(files):05d}.safetensors"
        save_file(shards[-1], str(name), metadata={"format": "pt"})
        files.append(name)
        for k in shards[-1]:
            weight_map[k] = name.name
        shards[-1] = {}
        size = 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=gen).cpu()
        nbytes = t.numel() * 2
        if size and size + nbytes > limit:
            flush()
        shards[-1][name] = t
        size += nbytes
    flush()
    n = len(files)
    for i, f in enumerate(files):  # HF's naming, now that the count is known
        final = out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        f.rename(final)
        for k, v in list(weight_map.items()):
            if v == f.name:
                weight_map[k] = final.name
    total = sum(int(torch.Size(s).numel()) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}: {sum(int(torch.Size(s).numel()) for s in shapes.values()) / 1e9:.2f}B parameters in {n} "
          f"shards, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
