"""Where a decode step's host time goes: random-init models built in-process (no files, no tokenizer needed).

A SmolLM2-135M-shaped Llama teacher, its 1/4 GDN hybrid (softmax layers 0, 3, 7, 11, 15, 18, 22, 26) and its
all-linear student, bf16 on one GPU, prefill --context tokens then --steps decode steps. For each model:
- ``plain``: ms per token, no sync inside the loop (what bench-infer measures);
- ``sync_each_step``: a device sync after every step;
- ``no_gc``: Python's cyclic garbage collector off;
- ``host_ms_in``: host (wall, unsynchronised) ms per token spent inside each decoder part: the linear-attention op
  (``ops.gated_delta_rule``), linear mixers, softmax attention, MLPs, and the whole decoder stack;
- ``torch_mixer_ops``: the mixers' torch reference ops instead of fla's kernels.

    python bench/decode_host_overhead.py --out decode_host.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=65536, rope_theta=100000.0,
               tie_word_embeddings=True, rms_norm_eps=1e-5)
HYBRID_LAYERS = [0, 3, 7, 11, 15, 18, 22, 26]


DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _prefill(model, context: int, batch: int):
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=DEVICE)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def _steps(model, cache, nxt, n: int, sync: bool = False) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        if sync:
            _sync()
    _sync()
    return (time.perf_counter() - t0) * 1e3 / n


@contextmanager
def _host_timers(model, totals: dict[str, float]):
    """Unsynchronised wall time inside modules (host time when the step is host bound)."""
    from ds_hybrid.modeling import ops
    from ds_hybrid.modeling.mixers import LinearMixer

    handles, starts = [], {}

    def watch(mod, name):
        def pre(m, a):
            starts[id(m)] = time.perf_counter()

        def post(m, a, o):
            totals[name] += time.perf_counter() - starts[id(m)]

        handles.extend([mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)])

    for layer in model.model.layers:
        watch(layer.self_attn, "linear_mixer" if isinstance(layer.self_attn, LinearMixer) else "softmax_attention")
        watch(layer.mlp, "mlp")
    watch(model.model, "decoder_stack")
    original = ops.gated_delta_rule

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            totals["gated_delta_rule_op"] += time.perf_counter() - t

    ops.gated_delta_rule = timed
    try:
        yield
    finally:
        ops.gated_delta_rule = original
        for h in handles:
            h.remove()


@torch.no_grad()
def measure(model, context: int, steps: int) -> dict:
    cache, nxt = _prefill(model, context, 1)
    _steps(model, cache, nxt, 4)  # compile / autotune the decode kernels
    res = {}
    cache, nxt = _prefill(model, context, 1)
    res["plain"] = _steps(model, cache, nxt, steps)
    cache, nxt = _prefill(model, context, 1)
    res["sync_each_step"] = _steps(model, cache, nxt, steps, sync=True)
    cache, nxt = _prefill(model, context, 1)
    gc.disable()
    try:
        res["no_gc"] = _steps(model, cache, nxt, steps)
    finally:
        gc.enable()
    totals: dict[str, float] = defaultdict(float)
    cache, nxt = _prefill(model, context, 1)
    with _host_timers(model, totals):
        res["plain_with_timers"] = _steps(model, cache, nxt, steps)
    res["host_ms_in"] = {k: v * 1e3 / steps for k, v in sorted(totals.items())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (fp32, torch ops)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device

    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_hybrid.monitor import versions
    from ds_hybrid.transfer import build_hybrid

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    teacher.eval()
    models = {"teacher": teacher,
              "hybrid_1_4": build_hybrid(teacher, HYBRID_LAYERS).eval(),
              "all_linear": build_hybrid(teacher, []).eval()}
    out = {"versions": versions(), "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None, "context": args.context,
           "steps": args.steps, "results": {}}
    for name in ("hybrid_1_4", "all_linear", "teacher", "hybrid_1_4"):  # the hybrid twice: first vs later in a process
        key = name if name not in out["results"] else name + "_again"
        out["results"][key] = measure(models[name], args.context, args.steps)
        print(key, json.dumps(out["results"][key]), flush=True)
        with open(args.out, "w") as f:  # after every model: a cut run still leaves what it measured
            json.dump(out, f, indent=1)
    for name in ("hybrid_1_4", "all_linear"):
        m = models[name]
        for mod in m.modules():
            if hasattr(mod, "options") and hasattr(mod.options, "backend"):
                mod.options.backend = "torch"
        with torch.no_grad():
            cache, nxt = _prefill(m, args.context, 1)
            _steps(m, cache, nxt, 2)
            cache, nxt = _prefill(m, args.context, 1)
            out["results"][name]["torch_mixer_ops"] = _steps(m, cache, nxt, args.steps)
        print(name, "torch_mixer_ops", out["results"][name]["torch_mixer_ops"], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
