"""Checkpoint manifests: every file of a checkpoint with its size and SHA-256, so that a resume can tell a good
checkpoint from one damaged after it was written (a truncated or corrupted file, a missing one).

    write_manifest(ckpt_dir)            # all ranks, after every rank has saved; rank 0 writes MANIFEST.json
    problems = verify_manifest(ckpt_dir)  # all ranks; [] when every file is there with its size and checksum

The files are hashed in parallel, each by the rank that wrote it (``owner``): DeepSpeed's per-rank shards
(``zero_pp_rank_<r>_...``) and our RNG states (``rng_rank<r>.pt``) by rank r, the rest (rank 0 writes those) by rank 0.
So a rank reads back what is still in its own node's page cache, and it fsyncs its own writes: on a shared file system
an fsync flushes only the calling node's cached data, so another node's fsync would not vouch for them. At a resume
each rank checks its own shards (the optimizer's, and ZeRO-3's parameters), which it then loads; the files every
rank loads (ZeRO 0-2's model states) are checked by rank 0.
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
_RANK_DIR = re.compile(r"^rank(\d+)$")  # DeepSpeed's NVMe-offloaded tensors: offloaded_tensors/rank<NN>/...


def owner(rel: str, world_size: int) -> int:
    """The rank that wrote (and so hashes and fsyncs) a checkpoint file: the rank in its name (or in a ``rank<N>``
    folder of its path) where it has one, else 0 (modulo ``world_size``, for a checkpoint checked by fewer ranks
    than wrote it)."""
    p = Path(rel)
    m = _RANKED.search(p.name) or next((d for d in map(_RANK_DIR.match, p.parent.parts) if d), None)
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
    # each rank lists the folder itself and takes the files it owns: a listing from another node (NFS caches
    # directories for up to a minute) could miss this rank's shards, which would then go unhashed and unvouched
    mine: dict[str, dict] = {}
    error = None
    try:  # (an error here is gathered, so that every rank raises it instead of the others waiting for this one)
        files = _my_share(checkpoint_files(ckpt))
        for rel in files:
            fsync_file(ckpt / rel)
            mine[rel] = {"size": (ckpt / rel).stat().st_size, "sha256": file_digest(ckpt / rel)}
        for folder in sorted({(ckpt / rel).parent for rel in files}):
            fsync_dir(folder)
        if D.is_main():
            fsync_dir(ckpt.parent)  # the checkpoint folder's own entry
    except OSError as e:
        error = f"rank {D.rank()}: {type(e).__name__}: {e}"
    entries: dict[str, dict] = {}
    errors = []
    for part, err in D.all_gather((mine, error)):
        entries.update(part)
        errors += [err] if err else []
    if errors:
        raise OSError(f"checkpoint {ckpt}: its files could not be read back and forced to disk ({'; '.join(errors)})")
    manifest = {"files": dict(sorted(entries.items())), "bytes": sum(e["size"] for e in entries.values())}
    if D.is_main():
        atomic_write_text(ckpt / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, f"{path} is missing (no file list to check the checkpoint against)"
    try:
        return json.loads(path.read_text())["files"], None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"


def verify_manifest(ckpt: Path) -> list[str]:
    """What is wrong with the checkpoint, as sentences naming the file ([] = every listed file intact). Every rank
    returns the same list: the manifest is the main rank's reading, and each rank's check of its own files is
    gathered (a file it cannot read is a problem named, never an exception that would leave the others waiting)."""
    ckpt = Path(ckpt)
    files, problem = D.main_reads(lambda: _read_manifest(ckpt / MANIFEST))
    if files is None:
        return [problem]
    problems = []
    for rel in _my_share(sorted(files)):
        want, p = files[rel], ckpt / rel
        try:
            if not p.is_file():
                problems.append(f"{p} is missing")
            elif p.stat().st_size != want["size"]:
                problems.append(f"{p} is {p.stat().st_size} bytes, the manifest says {want['size']} (truncated or "
                                "overwritten)")
            elif file_digest(p) != want["sha256"]:
                problems.append(f"{p} has the right size but not the recorded SHA-256 (corrupted)")
        except OSError as e:
            problems.append(f"{p} could not be read on rank {D.rank()} ({type(e).__name__}: {e})")
    return sorted(x for part in D.all_gather(problems) for x in part)
