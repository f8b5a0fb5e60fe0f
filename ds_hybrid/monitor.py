"""What a run shows and records: TensorBoard events, metrics.jsonl, a progress bar, one log line per interval.

Rank 0 writes; other ranks only log errors. The run folder also gets the resolved config, package versions and the
git commit at start (``run_info.json``; every start and resume of a stage a line of ``runs.jsonl``), so every
number can be traced to what produced it.

    tensorboard --logdir <out_dir>
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from ds_hybrid import distributed as D
from ds_hybrid.folders import atomic_write_text

log = logging.getLogger("ds_hybrid")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def setup_logging() -> None:
    level = logging.INFO if D.is_main() else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{D.rank()}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    # from the installed metadata: importing fla alone costs ~9 s of CPU (it loads every layer and model)
    for name, dist in (("torch", "torch"), ("transformers", "transformers"), ("deepspeed", "deepspeed"),
                       ("fla", "flash-linear-attention"), ("triton", "triton"), ("datasets", "datasets"),
                       ("lm_eval", "lm-eval")):  # (RULER's prompts are lm-eval's: eval.json records which)
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unavailable (not installed)"
    import ds_hybrid

    out["ds_hybrid"] = ds_hybrid.__version__
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda or "?"
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (r.stdout.strip() + ("+dirty" if dirty else "")) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_tflops(configured: float | None) -> float | None:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def drop_rows_after(path: Path, step: int, val_at_step: bool = False) -> None:
    """Rewrite the metrics file ``path`` (atomically) without the rows a run resumed at ``step`` logs again: those of
    later steps, with ``val_at_step`` the held-out rows at ``step`` itself (the resumed run scores them again), and a
    torn last line (no newline: a run killed, or a full disk, mid-write; the resumed run's first row would be glued
    onto it). ``step`` -1: every row (a run that starts at step 0 again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
            at = int(row.get("step", 0))
            again = at > step or (val_at_step and at == step and row.get("split") == "val")
        except (ValueError, TypeError, AttributeError):
            again = False  # (a line no run of ours writes: kept as it is)
        if not again:
            keep.append(line)
    if "".join(keep) != path.read_text():
        atomic_write_text(path, "".join(keep))


class Monitor:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, log_every: int, stage: str,
                 scores_start: bool = False):
        """``scores_start``: the run logs held-out scores at ``start_step`` again (a resume at an evaluation step,
        or at the last one): the interrupted run's rows there are dropped (TensorBoard keeps its point too: two at
        that step)."""
        self.run_dir = run_dir
        self.start_step = start_step
        self.log_every = log_every
        self.stage = stage
        self.writer = None
        self.bar = None
        self.jsonl = None
        if D.is_main():
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            run_dir.mkdir(parents=True, exist_ok=True)
            # a resume from step k: what the interrupted run logged after k is dropped (TensorBoard's purge_step,
            # the jsonl's later rows), since the resumed run logs those steps again; a start at step 0 (a run killed
            # before its first checkpoint) drops all of it
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step
                                        else 0)
            drop_rows_after(run_dir / "metrics.jsonl", start_step if start_step else -1, scores_start)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True,
                            disable=not sys.stderr.isatty() and os.environ.get("DS_HYBRID_PROGRESS") != "1")

    def record_run(self, config: dict[str, Any], extra: dict[str, Any]) -> None:
        if not D.is_main():
            return
        """This start's provenance: ``run_info.json`` and ``config.yaml`` (this run's, replaced atomically: the
        evaluation reads them), and a line in ``runs.jsonl`` for every start and resume of the stage (a resumed run's
        record would otherwise replace the ones before it: their commits, versions and hosts)."""
        info = {"stage": self.stage, "versions": versions(), "git_commit": git_commit(), "world_size": D.world_size(),
                "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        atomic_write_text(self.run_dir / "run_info.json", json.dumps(info, indent=1, default=str))
        with open(self.run_dir / "runs.jsonl", "a") as f:
            f.write(json.dumps({"start_step": self.start_step, **info, "config": config}, default=str) + "\n")
        import yaml

        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not D.is_main():
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self.jsonl.flush()

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if D.is_main() and values.numel():
            self.writer.add_histogram(name, values.detach().float().cpu(), step)

    def step(self, step: int, values: dict[str, float]) -> None:
        if not D.is_main():
            return
        self.bar.update(1)
        if step % self.log_every == 0:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "kl", "ce", "lr")})
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items()
                             if not k.startswith("layer") and not (k == "skipped_steps" and v == 0))
            log.info("%s step %d %s", self.stage, step, shown)

    def close(self) -> None:
        if D.is_main():
            self.bar.close()
            self.writer.flush()
            self.writer.close()
            self.jsonl.close()


def memory_stats() -> dict[str, float]:
    out = {"rss_gib": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
