"""Run one stage of a conversion.

    deepspeed ds_hybrid/train.py --stage align --config runs/smollm2_paper.yaml    # GPUs of this node
    torchrun --nproc_per_node 8 ds_hybrid/train.py --stage kl --config runs/x.yaml kl.tokens=2e8
    srun python ds_hybrid/train.py --stage kl --config runs/x.yaml                  # one task per rank
    python ds_hybrid/train.py --stage align --config runs/smollm2_quickstart.yaml   # one process (CPU or GPU)
    python ds_hybrid/train.py --stage align --config runs/x.yaml --prepare-data     # token cache only (CPU node)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 ds_hybrid/train.py ...          # 2 CPU ranks, gloo

Stages: align (RADLADS stage 1), select (layer selection), kl (stage 2), finetune (stage 3).
Anything after the options is a ``key=value`` override of the run config (``seed=1``, ``kl.lr=2e-4``).
Bad settings are reported (field, value, fix) before any model is built; exit code 2. No intact checkpoint to resume
from, or a checkpoint that does not fit on the disk: exit code 4 (the message says what to do).
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts this file's folder (ds_hybrid/) first on sys.path; drop it so that package modules
# never shadow top-level ones.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402

from ds_hybrid.checkpoint import EXIT_CHECKPOINT, CheckpointError  # noqa: E402
from ds_hybrid.config import STAGES, load_config  # noqa: E402
from ds_hybrid.errors import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--config", default=None, help="run YAML (runs/*.yaml); omitted: all defaults")
    ap.add_argument("--force", action="store_true", help="rerun a stage that already has its DONE marker")
    ap.add_argument("--prepare-data", action="store_true", help="only tokenize what the stage reads into the token "
                    "cache, print where it is and exit (no model, no GPU: run it on a CPU node before the GPU job)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    return ap.parse_intermixed_args(argv)  # options may follow the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.prepare_data:
            import json

            from ds_hybrid.trainer import prepare_data

            print(json.dumps(prepare_data(cfg, args.stage), indent=1))
        elif args.stage == "select":
            from ds_hybrid.stages.select import run_select

            run_select(cfg, force=args.force)
        else:
            from ds_hybrid.trainer import run_stage

            run_stage(cfg, args.stage, force=args.force)
    except ConfigError as e:
        print(f"ds-hybrid: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"ds-hybrid: error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except SystemExit as e:  # StopRequested carries the exit code
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as e:
        from ds_hybrid.trainer import EXIT_NONFINITE, NonFiniteLoss

        if isinstance(e, NonFiniteLoss):
            print(f"ds-hybrid: error: {e}", file=sys.stderr)
            code = EXIT_NONFINITE
        else:
            raise
    if code == 0:  # (after a failure a peer may be stuck in a collective: no teardown that could wait on it)
        from ds_hybrid.distributed import shutdown

        shutdown()
    sys.exit(code)
