"""Training checkpoints: DeepSpeed's own (model, optimizer, scheduler shards), plus per-rank RNG, made atomic.

A checkpoint is ``<dir>/step00000123/`` written by ``engine.save_checkpoint`` on every rank, then each rank's RNG
state, then (after a barrier) a ``COMPLETE`` marker written by rank 0 through a temp file and rename. Resume takes
the newest folder that has the marker, so a crash in the middle of a save never yields a checkpoint that looks
complete; folders without the marker are deleted at the next resume. The data position needs no state: the rows
of step s are a pure function of (seed, s) (:func:`ds_hybrid.data.step_rows`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_hybrid import distributed as D

MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step(\d{8})$")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain containers, so they load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = max(1, keep)

    def complete_tags(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = TAG_RE.match(p.name)
            if m and (p / MARKER).is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> tuple[int, Path] | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def save(self, engines: dict[str, Any], step: int, client_state: dict[str, Any]) -> Path:
        """Save every engine in ``engines`` (name -> DeepSpeedEngine) at optimizer step ``step``."""
        tag = f"step{step:08d}"
        path = self.dir / tag
        for name, engine in engines.items():
            engine.save_checkpoint(str(path), tag=name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), path / f"rng_rank{D.rank()}.pt")
        D.barrier()
        if D.is_main():
            info = {"step": step, "time": time.time(), "world_size": D.world_size(), "engines": list(engines)}
            atomic_write_text(path / MARKER, json.dumps(info))
            for _, old in self.complete_tags()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        return path

    def load(self, engines: dict[str, Any]) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint into ``engines``; returns its client state, or None if none."""
        if D.is_main() and self.dir.is_dir():  # leftovers of interrupted saves
            for p in self.dir.iterdir():
                if TAG_RE.match(p.name) and not (p / MARKER).is_file():
                    shutil.rmtree(p, ignore_errors=True)
        D.barrier()
        found = self.latest()
        if found is None:
            return None
        step, path = found
        info = json.loads((path / MARKER).read_text())
        if info["world_size"] != D.world_size():
            raise RuntimeError(
                f"checkpoint {path} was written by {info['world_size']} ranks, this job has {D.world_size()}; "
                "resume with the same number of ranks (or export with zero_to_fp32 and start a new stage)"
            )
        client_state: dict[str, Any] = {}
        for name, engine in engines.items():
            _, cs = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
            client_state = cs or client_state
        set_rng_state(torch.load(path / f"rng_rank{D.rank()}.pt", weights_only=True))
        return client_state
