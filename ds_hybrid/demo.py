"""The end of the README's main job: the distilled hybrid next to its teacher.

    launchers/run_local.sh runs/smollm2_quickstart.yaml align,kl      # what `make demo` runs first
    python -m ds_hybrid.demo --run outputs/smollm2_quickstart          # then this

Prints each stage's held-out result (align loss, KL to the teacher, perplexity) and greedy generations of the
teacher and the hybrid for a few prompts; with ``--recall 2048`` also both models' score on RULER's niah_single_1
at that length (``--recall-prompts`` of them, with 95 % intervals: what ``make demo`` prints on a GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ds_hybrid  # noqa: F401  (registers the hybrid with the Auto classes)

PROMPTS = ("The capital of France is", "A Python list is", "To open a file for reading, use")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="outputs/smollm2_quickstart", help="the run's out_dir")
    ap.add_argument("--stage", default="kl", help="whose export to load (align, kl, finetune)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--recall", type=int, default=0, help="also score niah_single_1 at this many tokens (0: no)")
    ap.add_argument("--recall-prompts", type=int, default=100)
    args = ap.parse_args()
    run = Path(args.run)
    if args.recall < 0 or args.recall_prompts < 1 or args.max_new_tokens < 1:
        ap.error("--recall takes a length >= 0 (0: none), --recall-prompts and --max-new-tokens 1 or more")
    if not (run / args.stage / "hf" / "config.json").is_file():
        ap.error(f"--run {run} --stage {args.stage}: no export at {run / args.stage / 'hf'}; run the stages first "
                 "(launchers/run_local.sh <config> align,kl) or point --run at the run's out_dir")
    for stage in ("align", "kl", "finetune"):
        done = run / stage / "DONE"
        if done.is_file():
            info = json.loads(done.read_text())
            val = {k: round(v, 4) for k, v in info["val"].items() if not k.startswith("layer")}
            print(f"{stage:>9}: {info['steps']} steps, {int(info['tokens'])} tokens, held-out {val}")
    hybrid_dir = run / args.stage / "hf"
    hybrid = AutoModelForCausalLM.from_pretrained(hybrid_dir).eval()
    tok = AutoTokenizer.from_pretrained(hybrid_dir)
    from ds_hybrid.teacher import load_teacher

    import yaml

    teacher_spec = yaml.safe_load((run / args.stage / "config.yaml").read_text())["teacher"]
    teacher, _ = load_teacher(teacher_spec)
    print(f"hybrid: {hybrid.config.mixer} mixers, softmax layers {hybrid.config.softmax_layers} "
          f"of {hybrid.config.num_hidden_layers}")
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        for name, model in (("teacher", teacher), ("hybrid", hybrid)):
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
            print(f"  {name:>7} | {prompt}{text!r}")
    if args.recall:
        recall(hybrid_dir, str(teacher_spec), args.recall, args.recall_prompts, run / "demo_recall")


def recall(hybrid_dir: Path, teacher: str, length: int, prompts: int, out: Path) -> dict:
    """niah_single_1 at ``length`` tokens for the teacher and the hybrid (``ds-hybrid eval``), printed side by side.
    All prompts go in one batch (up to 128): eager decoding is bound by the host, so a step costs about the same at
    batch 100 as at 32, and one batch instead of four saves most of the decoding time.
    Returns {model: (score, prompts scored)}."""
    from ds_hybrid.cli import build_parser
    from ds_hybrid.evaluation.report import wilson_interval
    from ds_hybrid.evaluation.run import run_eval

    args = build_parser().parse_args([
        "eval", "--model", f"hybrid={hybrid_dir}", "--teacher", teacher, "--tasks", "niah_single_1",
        "--lengths", str(length), "--limit", str(prompts), "--no-quality", "--batch-size", str(min(prompts, 128)),
        "--out", str(out), "--overwrite"])  # (a re-run of the demo scores its models again)
    payload = run_eval(args)
    got = {}
    print(f"\nRULER niah_single_1 at {length} tokens (95 % interval):")
    for name in ("teacher", "hybrid"):
        v = payload["scores"][name]["niah_single_1"][str(length)]
        n = payload["prompts"][name]["niah_single_1"][str(length)]
        lo, hi = wilson_interval(v, n)
        print(f"  {name:>7}: {v:.2f} [{lo:.2f}, {hi:.2f}] of {n} prompts")
        got[name] = (v, n)
    return got


if __name__ == "__main__":
    main()
