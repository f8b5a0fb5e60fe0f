"""The ``ds-hybrid`` command.

    ds-hybrid convert --out out/hybrid --ratio 0.25                 # stage 0 on the embedded teacher, uniform layers
    ds-hybrid convert --teacher ./Qwen2.5-3B --softmax-layers 3,7,20 --mixer gla --out out/h
    ds-hybrid generate --model out/hybrid --prompt "The capital of France is"
    ds-hybrid generate --model out/hybrid --prompt "..." --device cuda --cuda-graphs [--compile]  # static cache, graph
    ds-hybrid eval --model out/kl/hf --teacher embedded --suite recall --lengths 2048,4096 --swde swde.jsonl
    ds-hybrid bench-infer --model out/kl/hf --teacher embedded --contexts 4096,16384,32768 [--cuda-graphs [--compile]]
    ds-hybrid plan --config runs/llama3_70b_gdn.yaml --nodes 4 --gpus-per-node 8     # memory per GPU
    ds-hybrid corpus build | stats | pack --out DIR                                  # the embedded corpus
    ds-hybrid select-compare gdn=a/selection.json gla=b/selection.json --ks 4,8     # top-K overlap, Kendall tau
    ds-hybrid eval-merge out/eval_a out/eval_b --out out/merged                     # one table from many evals
    ds-hybrid recall-vs-k out/merged --selection ga_s2=sel.json --out out/by_k      # selector x K x task, plot

Training stages run through ``ds_hybrid/train.py`` (under deepspeed / torchrun); see the README.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ds_hybrid.errors import ConfigError, out_folder


def _add_layer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--softmax-layers", default=None, help="comma-separated layer indices kept softmax, e.g. 3,7,11")
    g.add_argument("--ratio", type=float, default=None, help="fraction of layers kept softmax, spaced uniformly")


def cmd_convert(args: argparse.Namespace) -> int:
    from ds_hybrid.layers import k_for_ratio, parse_layer_list, uniform_layers
    from ds_hybrid.modeling.mixers import MixerOptions, check_mixer
    from ds_hybrid.modeling.families import head_dim
    from ds_hybrid.teacher import load_teacher, load_teacher_config, resolve_teacher, teacher_generation_config
    from ds_hybrid.transfer import build_hybrid
    from ds_hybrid.modeling.configuration import check_softmax_layers

    # Validate everything before the teacher's weights are loaded.
    out = out_folder(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:  # e.g. the teacher's own folder, or a kl export
        raise ConfigError("--out", args.out, "the folder is not empty (convert would replace what it holds): give "
                          "another --out, or add --overwrite to replace it")
    config = load_teacher_config(args.teacher)
    teacher_dir = Path(resolve_teacher(args.teacher)).expanduser()
    holds_teacher = out.resolve() == teacher_dir.resolve() or out.resolve() in teacher_dir.resolve().parents
    if teacher_dir.is_dir() and holds_teacher:
        raise ConfigError("--out", args.out, f"it holds the teacher ({teacher_dir}), which writing the hybrid there "
                          "would replace: give another --out")
    L = config.num_hidden_layers
    if args.softmax_layers is not None:
        layers = check_softmax_layers(parse_layer_list(args.softmax_layers, "--softmax-layers"), L, "--softmax-layers")
    else:
        layers = uniform_layers(L, k_for_ratio(args.ratio if args.ratio is not None else 0.25, L, "--ratio"))
    check_mixer(args.mixer, head_dim(config), "--mixer")
    options = {"use_short_conv": args.short_conv, "qkv_bias": args.qkv_bias}
    MixerOptions.from_dict(options, "--short-conv/--qkv-bias")
    import torch

    from ds_hybrid.distributed import parse_device

    parse_device(args.device)  # checked before the teacher is read

    # fp32 by default (exact transfer); bf16 halves host memory and disk for large teachers (8B: 16 GB vs 32 GB)
    teacher, tok = load_teacher(args.teacher, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
                                device=args.device)
    student = build_hybrid(teacher, layers, args.mixer, options)
    from ds_hybrid.selection import tensors_fingerprint

    student.config.teacher_weights = tensors_fingerprint(teacher_dir)  # (a stage started from it checks its teacher)
    generation = teacher_generation_config(resolve_teacher(args.teacher))
    if generation is not None:  # the teacher's stop tokens and sampling defaults, not HF's default from the config
        student.generation_config = generation
    from ds_hybrid.folders import atomic_folder

    # whole or not at all: a crash leaves --out as it was; filled meanwhile by another writer, kept unless --overwrite
    try:
        with atomic_folder(out, "convert", refuse_existing=not args.overwrite) as tmp:
            student.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except FileExistsError as e:
        raise ConfigError("--out", args.out, str(e)) from None
    print(f"saved {args.mixer} hybrid with softmax layers {layers} of {L} to {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ds_hybrid  # noqa: F401  (registers the model type)
    from ds_hybrid.distributed import parse_device

    device = parse_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise ConfigError("--cuda-graphs", True, "CUDA graphs need a GPU: add --device cuda, or drop --cuda-graphs")
    if args.compile and not args.cuda_graphs:
        raise ConfigError("--compile", True, "it compiles the CUDA-graph decode step: add --cuda-graphs")
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "generate at least 1 token")
    if args.max_len is not None and not args.cuda_graphs:
        raise ConfigError("--max-len", args.max_len, "sets the static cache of --cuda-graphs: add --cuda-graphs, or "
                          "drop --max-len (eager decoding grows its cache)")
    from ds_hybrid.teacher import resolve_teacher

    path = resolve_teacher(args.model, "--model")  # a folder, 'embedded', or a hub id where the hub is reachable
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError("--model", args.model, f"no model there ({str(e).splitlines()[0][:200]}); give an HF model "
                                                 "folder (a stage's hf/ export) or 'embedded'") from None
    ids = tok(args.prompt, return_tensors="pt")
    need = ids["input_ids"].shape[1] + args.max_new_tokens
    if args.max_len is not None and args.max_len < need:  # (before the model loads)
        raise ConfigError("--max-len", args.max_len, f"shorter than the prompt's {ids['input_ids'].shape[1]} tokens + "
                          f"--max-new-tokens {args.max_new_tokens}; use --max-len >= {need}")
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    if args.fuse_projections:
        if hasattr(model, "fuse_input_projections"):
            model.fuse_input_projections()
        else:
            print(f"note: --fuse-projections: {args.model} is not a ds_hybrid hybrid; nothing to fuse", file=sys.stderr)
    ids = ids.to(device)
    if args.cuda_graphs:  # any causal LM (a hybrid or its teacher): greedy, as generate() would return it
        from ds_hybrid.graph_decode import GraphDecoder, generate_static

        if args.max_len or args.compile:  # (checked above: generate_static would replace a short decoder)
            max_len = args.max_len or need
            object.__setattr__(model, "_graph_decoder",
                               GraphDecoder(model, max_len=max_len, cuda_graphs=True, compile=args.compile))
        with torch.no_grad():
            # (greedy as the eager path below: a teacher's generation config may ask for sampling)
            out = generate_static(model, ids["input_ids"], model.generation_config, do_sample=False,
                                  attention_mask=ids["attention_mask"], max_new_tokens=args.max_new_tokens)
    else:
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ds_hybrid.evaluation.run import run_eval

    run_eval(args)
    return 0


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from ds_hybrid.evaluation.run import run_bench_infer

    run_bench_infer(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-hybrid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="stage 0: build a hybrid from a teacher and save it (HF format)")
    p.add_argument("--teacher", default=None, help="HF model folder or hub id (default: the embedded SmolLM2-135M)")
    _add_layer_args(p)
    p.add_argument("--mixer", default="gdn", help="gdn (Gated DeltaNet) or gla")
    p.add_argument("--short-conv", action="store_true", help="add fla's short convolution to the mixer")
    p.add_argument("--qkv-bias", action="store_true", help="keep the teacher's q/k/v biases in the linear mixers "
                   "(Qwen2/2.5; dropped by default, as in the paper's code: mixer_options.qkv_bias, docs/METHOD.md)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="load the teacher and save the hybrid in")
    p.add_argument("--device", default="cpu", help="where the teacher is loaded and the hybrid built (cuda: fast "
                   "for large teachers that fit one GPU)")
    p.add_argument("--out", required=True, help="an empty or new folder")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds (written aside "
                   "first, swapped in when complete)")
    p.set_defaults(fn=cmd_convert)

    from ds_hybrid.evaluation.run import add_bench_args, add_eval_args

    p = sub.add_parser("eval", help="recall (RULER, SWDE, FDA via lm-eval) and held-out quality, models side by side")
    add_eval_args(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench-infer", help="prefill/decode speed and cache memory, hybrid vs teacher")
    add_bench_args(p)
    p.set_defaults(fn=cmd_bench_infer)

    sub.add_parser("plan", help="memory per GPU for a config and cluster shape (see: ds-hybrid plan -h)")
    sub.add_parser("corpus", help="build, count or pack the embedded corpus (see: ds-hybrid corpus -h)")
    sub.add_parser("select-compare", help="agreement of selection.json files (see: ds-hybrid select-compare -h)")
    sub.add_parser("eval-merge", help="one table from several eval outputs (see: ds-hybrid eval-merge -h)")
    sub.add_parser("recall-vs-k", help="selector x K x task table and recall-vs-K plot (see: ds-hybrid recall-vs-k -h)")
    sub.add_parser("extract-text", help="a multimodal Gemma 3 checkpoint's language model as a teacher folder (see: "
                   "ds-hybrid extract-text -h)")

    p = sub.add_parser("generate", help="greedy generation from a saved model")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--cuda-graphs", action="store_true", help="static cache, decode step replayed as a CUDA graph "
                   "(needs --device cuda; greedy; same tokens as without)")
    p.add_argument("--max-len", type=int, default=None, help="with --cuda-graphs: static cache length (default: prompt "
                   "+ new tokens, rounded up to a multiple of 256 so that nearby lengths share a graph; exactly that "
                   "with --compile)")
    p.add_argument("--compile", action="store_true", help="with --cuda-graphs: torch.compile the decode step before "
                   "capturing it (fewer, fused kernels; compiling takes a minute or more; same tokens)")
    p.add_argument("--fuse-projections", action="store_true", help="a hybrid's linear layers read their input "
                   "projections as one GEMM (faster decode steps; same math, bf16 rounding may differ)")
    p.set_defaults(fn=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["plan"], ["corpus"], ["select-compare"], ["eval-merge"], ["recall-vs-k"], ["extract-text"]):
        from ds_hybrid.corpus.tools import main as corpus_main
        from ds_hybrid.evaluation.by_k import main as by_k_main
        from ds_hybrid.evaluation.merge import main as merge_main
        from ds_hybrid.plan import main as plan_main
        from ds_hybrid.select_compare import main as compare_main
        from ds_hybrid.text_extract import main as extract_main

        try:
            return {"plan": plan_main, "corpus": corpus_main, "select-compare": compare_main,
                    "eval-merge": merge_main, "recall-vs-k": by_k_main, "extract-text": extract_main}[argv[0]](argv[1:])
        except ConfigError as e:
            print(f"ds-hybrid: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"ds-hybrid: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
