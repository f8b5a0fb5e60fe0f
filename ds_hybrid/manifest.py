"""Checkpoint manifests: every file of a checkpoint with its size and SHA-256, so that a resume can tell a good
checkpoint from one damaged after it was written (a truncated or corrupted file, a missing one).

    write_manifest(ckpt_dir)            # all ranks, after every rank has saved; rank 0 writes MANIFEST.json
    problems = verify_manifest(ckpt_dir)  # all ranks; [] when every file is there with its size and checksum

The files are hashed in parallel, each by the rank that wrote it (``owner``): DeepSpeed's per-rank shards
(``zero_pp_rank_<r>_...``) and our RNG states (``rng_rank<r>.pt``) by rank r, the rest (rank 0 writes those) by rank 0.
So a rank reads back what is still in its own node's page cache, and it fsyncs its own writes: on a shared file system
an fsync flushes only the calling node's cached data, so another node's fsync would not vouch for them. At a resume
each rank checks the shards it is about to load (its page cache then serves the load).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ds_hybrid import distributed as D
from ds_hybrid.folders import atomic_write_text, fsync_dir, fsync_file

MANIFEST = "MANIFEST.json"
SKIP = {MANIFEST, "COMPLETE"}
CHUNK = 16 * 2**20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                  if p.is_file() and p.name not in SKIP and not p.name.startswith("."))


_RANKED = re.compile(r"(?:^|_)(?:zero_pp_rank_|rng_rank)(\d+)(?:_|\.pt$)")


def owner(rel: str, world_size: int) -> int:
    """The rank that wrote (and so hashes and fsyncs) a checkpoint file: the rank in its name where it has one,
    else 0 (modulo ``world_size``, for a checkpoint checked by fewer ranks than wrote it)."""
    m = _RANKED.search(Path(rel).name)
    return int(m.group(1)) % world_size if m else 0


def _my_share(items: list[str]) -> list[str]:
    me, n = D.rank(), D.world_size()
    return [rel for rel in items if owner(rel, n) == me]


def write_manifest(ckpt: Path) -> dict:
    """Hash this rank's share of the checkpoint's files, each forced to disk first (DeepSpeed's writes are not: the
    COMPLETE marker written after this vouches for them, and older checkpoints are pruned on its word); rank 0 writes
    the manifest (temp file + rename). A rank's share is the files it wrote (``owner``), so its fsync flushes its
    own node's cache."""
    ckpt = Path(ckpt)
    files = D.broadcast_object(checkpoint_files(ckpt) if D.is_main() else None)
    mine = {}
    for rel in _my_share(files):
        fsync_file(ckpt / rel)
        mine[rel] = {"size": (ckpt / rel).stat().st_size, "sha256": file_digest(ckpt / rel)}
    for folder in sorted({(ckpt / rel).parent for rel in _my_share(files)}):
        fsync_dir(folder)
    if D.is_main():
        fsync_dir(ckpt.parent)  # the checkpoint folder's own entry
    entries: dict[str, dict] = {}
    for part in D.all_gather(mine):
        entries.update(part)
    manifest = {"files": dict(sorted(entries.items())), "bytes": sum(e["size"] for e in entries.values())}
    if D.is_main():
        atomic_write_text(ckpt / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(ckpt: Path) -> list[str]:
    """What is wrong with the checkpoint, as sentences naming the file ([] = every listed file intact)."""
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.is_file():
        return [f"{path} is missing (no file list to check the checkpoint against)"]
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return [f"{path} is unreadable ({e})"]
    problems = []
    for rel in _my_share(sorted(files)):
        want, p = files[rel], ckpt / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{p} is {p.stat().st_size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif file_digest(p) != want["sha256"]:
            problems.append(f"{p} has the right size but not the recorded SHA-256 (corrupted)")
    return sorted(x for part in D.all_gather(problems) for x in part)
