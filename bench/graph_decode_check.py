"""GPU check of CUDA-graph decoding (issue 18): same greedy tokens as eager decoding, and what it gains per step.

For the teacher (default: the embedded SmolLM2) and a hybrid folder, on random prompts (ids, no tokenizer):
1. exactness, per model and case (batch 1, batch 4, a left-padded batch of 4 with 4 prompt lengths):
   - graphs vs the same static step run eagerly: must be equal (same kernels, only the launch differs);
   - graphs vs the dynamic-cache path (``model.generate``, what bench-infer's eager rows time): must be equal;
   the first differing (row, token) is reported; any difference makes the script exit 1;
2. timing, per model, context and batch: ms per decode step of eager/dynamic (today's path), eager/static and
   cuda_graphs (and with ``--compile`` cuda_graphs_compiled), each after an untimed pass over the same shapes (compilation, autotuning, capture); ``host_ms`` is
   the time until Python has issued all the steps (before the final sync): close to the wall time when the step is
   host bound, small when the GPU is the bottleneck.

    python bench/graph_decode_check.py --model out/kl/hf --teacher embedded --out graph_check.json
    python bench/graph_decode_check.py --model /tmp/h --teacher /tmp/t --device cpu --contexts 32 --out /tmp/c.json

On CPU there are no graphs: the "cuda_graphs" rows are the static step run eagerly (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load(path: str, dev: torch.device, dtype: torch.dtype):
    import ds_hybrid  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    from ds_hybrid.teacher import is_embedded, resolve_teacher

    local = resolve_teacher(None) if is_embedded(path) else path
    if not (Path(local) / "config.json").is_file():
        sys.exit(f"graph_decode_check: {path} is not an HF model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to(dev).eval()
    model.generation_config.eos_token_id = None  # raw greedy choices: no EOS stop or suppression
    return model


def prompts(vocab: int, batch: int, length: int, seed: int, dev: torch.device, padded: bool):
    """[batch, length] random ids; with ``padded``, row i has ``length - 7 * i`` tokens, left padded with 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i in range(batch):
            mask[i, : min(7 * i, length - 1)] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids.to(dev), mask.to(dev)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> dict | None:
    if a.shape != b.shape:
        return {"shapes": [list(a.shape), list(b.shape)]}
    diff = (a != b).nonzero()
    if len(diff) == 0:
        return None
    row, col = diff[0].tolist()
    return {"row": row, "token": col, "got": int(a[row, col]), "expected": int(b[row, col])}


@torch.no_grad()
def check_model(
    model, name: str, prompt_len: int, new_tokens: int, batches: list[int], dev: torch.device, compiled: bool = False
) -> list[dict]:
    from ds_hybrid.graph_decode import GraphDecoder

    vocab = model.config.vocab_size
    max_len = prompt_len + new_tokens
    graphs = GraphDecoder(model, max_len=max_len, cuda_graphs=True)
    static = GraphDecoder(model, max_len=max_len, cuda_graphs=False)
    fused = GraphDecoder(model, max_len=max_len, cuda_graphs=True, compile=True) if compiled else None
    cases = [(f"batch{b}", b, False) for b in batches] + [("batch4_left_padded", 4, True)]
    rows = []
    for case, b, padded in cases:
        ids, mask = prompts(vocab, b, prompt_len, seed=b + 100 * padded, dev=dev, padded=padded)
        got = graphs.generate(ids, mask, new_tokens)
        again = graphs.generate(ids, mask, new_tokens)  # second call: replay only, cache reset in place
        eager_static = static.generate(ids, mask, new_tokens)
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        r = {"model": name, "case": case, "batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
             "graphs_used": graphs.uses_graphs,
             "graphs_vs_static_eager": first_difference(got, eager_static),
             "graphs_second_call_vs_first": first_difference(again, got),
             "graphs_vs_dynamic_eager": first_difference(got, dynamic)}
        r["ok"] = all(r[k] is None for k in ("graphs_vs_static_eager", "graphs_second_call_vs_first",
                                             "graphs_vs_dynamic_eager"))
        if fused is not None:  # reported, not part of "ok": Inductor's fused kernels round differently, so a
            # near-tie between two tokens may go the other way (then every later token differs too)
            r["compiled_graphs_vs_static_eager"] = first_difference(fused.generate(ids, mask, new_tokens),
                                                                    eager_static)
        print(f"{name:>8} {case:<20} {'OK' if r['ok'] else 'MISMATCH'}"
              + ("" if r["ok"] else f"  {json.dumps({k: v for k, v in r.items() if k.startswith('graphs_v')})}"),
              flush=True)
        rows.append(r)
    return rows


def _time(run, dev: torch.device, steps: int) -> tuple[float, float]:
    """(wall ms, host ms) per step of ``run()``, which issues ``steps`` decode steps."""
    _sync(dev)
    t0 = time.perf_counter()
    run()
    host = time.perf_counter() - t0
    _sync(dev)
    wall = time.perf_counter() - t0
    return 1e3 * wall / steps, 1e3 * host / steps


@torch.no_grad()
def time_model(model, name: str, context: int, batch: int, steps: int, dev: torch.device,
               compiled: bool = False) -> list[dict]:
    from ds_hybrid.evaluation.speed import decode, prefill, random_ids
    from ds_hybrid.graph_decode import GraphDecoder

    ids = random_ids(model, context, batch)
    rows = []
    try:
        for _ in range(2):  # untimed, then timed: every key length of the dynamic cache is met untimed first
            cache, nxt = prefill(model, ids)
            wall, host = _time(lambda c=cache, n=nxt: decode(model, c, n, steps), dev, steps)
        rows.append({"mode": "eager", "ms_per_step": wall, "host_ms_per_step": host})
        for mode in ("static", "cuda_graphs") + (("cuda_graphs_compiled",) if compiled else ()):
            decoder = GraphDecoder(model, max_len=context + steps + 1, cuda_graphs=mode.startswith("cuda_graphs"),
                                   compile=mode.endswith("_compiled"))
            for _ in range(2):  # untimed pass compiles, autotunes and captures; the timed one replays
                decoder.prefill(ids, None, steps + 1)
                wall, host = _time(lambda d=decoder: d.decode(batch, steps), dev, steps)
            rows.append({"mode": mode, "ms_per_step": wall, "host_ms_per_step": host,
                         "graphs_used": decoder.uses_graphs})
            del decoder
    except torch.OutOfMemoryError:
        rows.append({"mode": "all", "error": "out of memory"})
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    base = next((r["ms_per_step"] for r in rows if r.get("mode") == "eager"), None)
    for r in rows:
        r.update(model=name, context=context, batch=batch, steps=steps)
        if base and "ms_per_step" in r:
            r["speedup_vs_eager"] = base / r["ms_per_step"]
            r["host_fraction"] = min(1.0, r["host_ms_per_step"] / r["ms_per_step"])
        if "ms_per_step" in r:
            print(f"{name:>8} ctx {context:>6} batch {batch:>3} {r['mode']:<20} {r['ms_per_step']:8.2f} ms/step "
                  f"(host {r['host_ms_per_step']:.2f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the hybrid's HF folder")
    ap.add_argument("--teacher", default="embedded", help="HF folder or 'embedded' (SmolLM2-135M); 'none' to skip")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt length of the exactness checks")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per exactness check")
    ap.add_argument("--batches", default="1,4", help="batch sizes of the exactness checks and the timings")
    ap.add_argument("--contexts", default="4096,16384", help="contexts of the timings ('' for none)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per row")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (no graphs on cpu)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA, else fp32")
    ap.add_argument("--out", required=True, help="JSON file")
    ap.add_argument("--compile", action="store_true", help="also the step compiled by torch.compile before capture "
                    "(its tokens vs the eager static step reported as compiled_graphs_vs_static_eager)")
    args = ap.parse_args(argv)

    from ds_hybrid.monitor import versions

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("graph_decode_check: --device cuda but no CUDA device here; use --device cpu for a smoke test")
    auto = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, auto)
    batches = [int(x) for x in args.batches.split(",") if x]
    contexts = [int(x) for x in args.contexts.split(",") if x]
    if dev.type != "cuda":
        print("note: no CUDA device: the cuda_graphs rows run the static step eagerly", flush=True)
    paths = {"hybrid": args.model} | ({} if args.teacher == "none" else {"teacher": args.teacher})
    checks, timings = [], []
    for name, path in paths.items():
        model = load(path, dev, dtype)
        checks += check_model(model, name, args.prompt_len, args.new_tokens, batches, dev, args.compile)
        for c in contexts:
            for b in batches:
                timings += time_model(model, name, c, b, args.steps, dev, args.compile)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(r["ok"] for r in checks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(dev), "dtype": str(dtype),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "models": paths, "ok": ok,
        "checks": checks, "timings": timings,
    }, indent=1))
    print(f"{'all greedy tokens equal' if ok else 'MISMATCH: see checks in'} -> {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
