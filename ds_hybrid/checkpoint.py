"""Training checkpoints: DeepSpeed's own (model, optimizer, scheduler shards), plus per-rank RNG, made atomic and
verifiable.

A checkpoint is ``<dir>/step00000123/`` written by ``engine.save_checkpoint`` on every rank, then each rank's RNG
state, then (after a barrier) ``MANIFEST.json`` (every file with its size and SHA-256, :mod:`ds_hybrid.manifest`)
and last a ``COMPLETE`` marker, each written by rank 0 through a temp file and rename. A crash in the middle of a
save never yields a checkpoint that looks complete; folders without the marker are deleted at the next resume.

Resume checks the newest complete checkpoint against its manifest (``ckpt_verify``, default on) and falls back to
the newest one that checks out, with a warning naming the damaged file; damaged checkpoints are kept, never
deleted. With none intact it stops (:class:`CheckpointError`, exit code 4) and says what to do.

A save first checks the free space against the size of the previous checkpoint (or the memory plan's estimate) and
stops before writing anything when it would not fit; a save that fails anyway (the disk filled meanwhile) removes
its partial folder and says the disk is full. Either way the previous checkpoint stays the resume point.

The data position needs no state: the rows of step s are a pure function of (seed, s)
(:func:`ds_hybrid.data.step_rows`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_hybrid import distributed as D
from ds_hybrid.folders import atomic_write_text
from ds_hybrid.manifest import MANIFEST, verify_manifest, write_manifest

log = logging.getLogger("ds_hybrid")
MARKER = "COMPLETE"
EXIT_CHECKPOINT = 4
SPACE_MARGIN = 1.05  # a checkpoint is about the size of the last one; keep 5 % slack


def _marker_problem(path: Path) -> str | None:
    try:
        json.loads((path / MARKER).read_text())["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} marker ({type(e).__name__})"
    return None


class CheckpointError(RuntimeError):
    """No usable checkpoint to resume from, or a save that could not be written (the message says what to do)."""


def check_world_size(path: Path, written_by: int | None) -> None:
    """A checkpoint resumes only in a job of as many ranks as wrote it (each rank's shard and RNG state are its own)."""
    if written_by not in (None, D.world_size()):
        raise CheckpointError(f"checkpoint {path} was written by {written_by} ranks, this job has {D.world_size()}; "
                              f"resume in a job of {written_by} ranks (Slurm: --nodes times --ntasks-per-node, one "
                              f"rank a GPU), or move {path.parent.parent} away to start the stage again at this size")


TAG_RE = re.compile(r"^step(\d{8})$")


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
    def __init__(self, directory: str | Path, keep: int = 2, verify: bool = True, expected_bytes: int | None = None):
        self.dir = Path(directory)
        self.keep = max(1, keep)
        self.verify = verify
        self.expected_bytes = expected_bytes  # the plan's estimate, used until a first checkpoint gives the size

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

    def _needed_bytes(self) -> int | None:
        last = self.latest()
        if last is not None and (last[1] / MANIFEST).is_file():
            try:
                return int(json.loads((last[1] / MANIFEST).read_text()).get("bytes", 0)) or self.expected_bytes
            except (OSError, ValueError, AttributeError):  # a damaged manifest: the plan's estimate instead
                return self.expected_bytes
        return self.expected_bytes

    def _space_error(self, step: int, needed: int | None, cause: BaseException | None) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        last = self.latest()
        keep = f"the previous checkpoint {last[1]} stays the resume point" if last else "no earlier checkpoint exists"
        need = f"it needs about {needed / 2**30:.2f} GiB" if needed else "its size is not known yet"
        why = f" ({type(cause).__name__}: {str(cause)[:160]})" if cause else ""
        return (f"checkpoint at step {step} not written: the disk holding {self.dir} is full or nearly so, or the "
                f"quota there is spent ({free / 2**30:.2f} GiB free on the disk, quotas aside: `quota -s`, "
                f"`lfs quota -u $USER <dir>` on Lustre; {need}){why}; {keep}. Free space there, or set out_dir to a "
                "larger disk, then rerun the same command to resume")

    def save(self, engines: dict[str, Any], step: int, client_state: dict[str, Any],
             settings: dict[str, Any] | None = None) -> Path:
        """Save every engine in ``engines`` (name -> DeepSpeedEngine) at optimizer step ``step``; ``settings`` (what
        a resume must match: :func:`ds_hybrid.trainer.check_resume`) go into the marker."""
        tag = f"step{step:08d}"
        path = self.dir / tag
        needed = self._needed_bytes()
        short = None
        if D.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            short = bool(needed) and shutil.disk_usage(self.dir).free < needed * SPACE_MARGIN
        if D.broadcast_object(short):  # stop before writing a byte: nothing partial, the last checkpoint stays
            raise CheckpointError(self._space_error(step, needed, None))
        try:
            for name, engine in engines.items():
                engine.save_checkpoint(str(path), tag=name, client_state=client_state, save_latest=False)
            torch.save(rng_state(), path / f"rng_rank{D.rank()}.pt")
        except (OSError, RuntimeError) as e:  # ENOSPC, or torch's "unexpected pos" / "failed writing file"
            # No collective from here on: the other ranks may be inside DeepSpeed's own barriers of this save, where
            # an agreement call would pair with the wrong collective and hang the job. This rank's error ends the job
            # (the launcher stops the others); the folder has no marker, so the next resume removes it and takes the
            # previous checkpoint.
            if D.world_size() == 1:
                shutil.rmtree(path, ignore_errors=True)
            if not _disk_full(e, self.dir):
                raise
            raise CheckpointError(self._space_error(step, needed, e)) from e
        D.barrier()
        try:  # (fsync: where NFS or Lustre first report a full disk or a spent quota)
            manifest = write_manifest(path)
        except OSError as e:
            if not _disk_full(e, self.dir):
                raise
            raise CheckpointError(self._space_error(step, needed, e)) from e
        if D.is_main():
            info = {"step": step, "time": time.time(), "world_size": D.world_size(), "engines": list(engines),
                    "bytes": manifest["bytes"], "files": len(manifest["files"]), "settings": settings or {}}
            atomic_write_text(path / MARKER, json.dumps(info))
            # keep this one and the newest keep - 1 before it; never one of a later step (none should exist: resume
            # sets damaged later ones aside, _set_aside)
            older = [p for s_, p in self.complete_tags() if s_ < step]
            for old in older[:max(0, len(older) - (self.keep - 1))]:
                _remove(old)
        D.barrier()
        return path

    def load(self, engines: dict[str, Any]) -> dict[str, Any] | None:
        """Restore the newest intact checkpoint into ``engines``; returns its client state, or None if none."""
        return self.restore(engines, self.pick())

    def newest_marker(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint whose marker reads, and that marker, as the main rank reads them (every
        rank gets the same); None where there is none."""
        def read() -> tuple[Path, dict[str, Any]] | None:
            for _, path in reversed(self.complete_tags()):
                if _marker_problem(path) is None:  # (pick()'s test of a marker)
                    try:
                        return path, json.loads((path / MARKER).read_text())
                    except (OSError, ValueError):  # (gone since)
                        continue
            return None
        return D.main_reads(read)

    def pick(self, check: Callable[[Path, dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint a resume loads, chosen before any model is built: leftovers of interrupted saves removed,
        the newest checkpoint whose marker and (``verify``) files check out, the damaged ones newer than it set aside
        (renamed, not deleted); (its path, its marker) as the main rank reads them, or None where there is none.
        The world size, and ``check`` (the run's settings against a marker: it raises to refuse), are checked on the
        newest readable marker first, before any file is hashed (seconds, where a 70B checkpoint's verification
        reads a terabyte), and again on the one picked where that is older. A CheckpointError when every one is
        damaged or one was written by another world size."""
        newest = self.newest_marker()
        if newest is not None:
            check_world_size(newest[0], newest[1].get("world_size"))
            if check is not None:
                check(*newest)
        if D.is_main() and self.dir.is_dir():  # leftovers of interrupted saves
            for p in self.dir.iterdir():
                if (TAG_RE.match(p.name) and not (p / MARKER).is_file()) or p.name.startswith(".pruning-"):
                    shutil.rmtree(p, ignore_errors=True)  # (and prunes a kill cut short)
        D.barrier()
        # the tags and their markers as the main rank reads them, for every rank: ranks that saw different ones (a
        # directory listing cached on another node, a read error on one) would part in the collectives below
        tags = D.main_reads(self.complete_tags)
        if not tags:
            return None
        damaged: list[tuple[Path, list[str]]] = []
        found = None
        for step, path in reversed(tags):
            problems = verify_manifest(path) if self.verify else []
            marker = D.main_reads(lambda: _marker_problem(path))
            if marker:
                problems = [marker, *problems]
            if not problems:
                found = (step, path)
                break
            damaged.append((path, problems))
            log.warning("checkpoint %s is damaged: %s%s; falling back to the one before it", path, problems[0],
                        f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        if found is None:
            detail = "; ".join(f"{p.name}: {pr[0]}" for p, pr in damaged)
            raise CheckpointError(
                f"every checkpoint in {self.dir} is damaged ({detail}). Nothing was deleted. To start the stage "
                f"again from step 0, move {self.dir.parent} (the stage folder, its logs with it) away; to resume "
                "from one anyway (unverified), set "
                "<stage>.ckpt_verify: false")
        path = found[1]
        D.barrier()  # every rank has read the tags before any is renamed
        if damaged and D.is_main():
            self._set_aside([p for p, _ in damaged])
        D.barrier()
        info = D.main_reads(lambda: json.loads((path / MARKER).read_text()))
        if newest is None or path != newest[0]:
            check_world_size(path, info["world_size"])
            if check is not None:
                check(path, info)
        return path, info

    def restore(self, engines: dict[str, Any], picked: tuple[Path, dict[str, Any]] | None) -> dict[str, Any] | None:
        """Load the checkpoint :meth:`pick` chose into ``engines`` (built since), and this rank's RNG state; its
        client state, or None where none was picked."""
        if picked is None:
            return None
        path = picked[0]
        if not D.main_reads(lambda: (path / MARKER).is_file()):
            raise CheckpointError(f"checkpoint {path}, picked before the models were built, is gone (moved or deleted "
                                  "from outside this stage's lock since): rerun the command to resume from the "
                                  "checkpoints there are")
        client_state: dict[str, Any] = {}
        for name, engine in engines.items():
            loaded, cs = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
            if loaded is None:  # (DeepSpeed's answer where it found no checkpoint to load: never a silent step 0)
                raise CheckpointError(f"checkpoint {path} is complete by its marker, but DeepSpeed loaded no {name} "
                                      f"state from {path / name}: move {path} away to resume from the one before it")
            client_state = cs or client_state
        if "step" not in client_state:
            raise CheckpointError(f"checkpoint {path} holds no step count in its client state (not written by this "
                                  f"trainer?): move {path} away to resume from the one before it")
        set_rng_state(torch.load(path / f"rng_rank{D.rank()}.pt", weights_only=True))
        return client_state


    @staticmethod
    def _set_aside(paths: list[Path]) -> None:
        """Rename damaged checkpoints newer than the one resumed out of the tag namespace (``<tag>.damaged``, kept for
        inspection, nothing deleted): otherwise they would stay the newest "complete" tags, and the next saves would
        size themselves from their manifests and prune the good checkpoints before them."""
        for p in paths:
            dest = p.with_name(f"{p.name}.damaged")
            n = 1
            while dest.exists():
                n += 1
                dest = p.with_name(f"{p.name}.damaged{n}")
            os.replace(p, dest)
            log.warning("set the damaged checkpoint aside as %s (not deleted; remove it when inspected)", dest)


def _remove(old: Path) -> None:
    """Delete a pruned checkpoint: first renamed out of the tag namespace (``.pruning-<tag>``), so that a delete cut
    short (a kill, an NFS ``.nfs*`` leftover) never leaves a folder that still looks complete, its marker kept and its
    shards gone; a failure is said, not hidden (the disk would fill with no hint why)."""
    doomed = old.with_name(f".pruning-{old.name}")
    try:
        os.replace(old, doomed)
    except OSError as e:
        log.warning("could not prune checkpoint %s (%s): delete it by hand to free its space", old, e)
        return
    shutil.rmtree(doomed, ignore_errors=True)
    if doomed.exists():
        log.warning("pruning %s: %s could not be deleted whole; delete it by hand to free its space", old, doomed)


def _disk_full(e: BaseException, where: Path) -> bool:
    """Whether a failed save ran out of space: ENOSPC or EDQUOT (a user or project quota, common on cluster file
    systems) anywhere in the chain, torch's writer messages, or (almost) no space left where the checkpoint was
    going."""
    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cur)
        if any(m in text for m in ("No space left", "Disk quota exceeded", "unexpected pos", "failed writing file")):
            return True
        cur = cur.__cause__ or cur.__context__
    try:
        return shutil.disk_usage(where).free < 64 * 2**20
    except OSError:
        return False
