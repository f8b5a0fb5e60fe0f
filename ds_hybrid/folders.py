"""Files and folders written atomically.

Folders are built under a temporary name beside their place, then renamed into it, so a reader
(another rank, a job of the cluster, a rerun after a crash) sees the whole folder or none of it. Model exports,
converted teachers in a shared cache, extract-text's teachers and the embedded corpus are all written this way
(:func:`atomic_folder`), and end with the mode of a plain ``mkdir``: ``tempfile.mkdtemp`` makes them private (0700),
and they are read by other users and jobs.

Files (markers, ``DONE``, selections, token-cache shards) go through :func:`atomic_write_text` or
:func:`fsync_file` + rename + :func:`fsync_dir`: after a node's crash a reader finds the old file or the whole new
one, never an empty or short one under the final name."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


# file systems whose file locks (flock) hold for every process that shares them, for the messages that need them
FLOCK_FILE_SYSTEMS = "a local disk of a single-node run, NFS with its lock service, Lustre mounted with -o flock"


def fsync_file(path: str | Path) -> None:
    """Force ``path``'s data to disk (before it is renamed into place or a marker vouches for it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Force ``folder``'s entries (renames into it) to disk; a no-op where the file system has no directory handles."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # the rename is what such a file system promises
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write then rename, both on disk before return (fsync of the file and of its folder): after a node's crash the
    file holds the old text or the new, never an empty one."""
    path = Path(path)
    # (host and pid: ranks of other nodes may write the same marker on a shared file system, pids alike)
    tmp = path.with_name(f".{path.name}.tmp{socket.gethostname()}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(folder: str | Path) -> None:
    """Force every file under ``folder``, and its folders' entries, to disk (before a rename publishes the folder)."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):  # (a link's target is not this folder's to flush)
                fsync_file(os.path.join(root, name))
        fsync_dir(root)


def usual_mode(folder: str | Path) -> None:
    """Give ``folder`` the mode ``mkdir`` would give it under the process's umask (0755 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


@contextmanager
def atomic_folder(out: str | Path, prefix: str, keep: str | None = None, refuse_existing: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder ``.<prefix>-*`` beside ``out``; when the block ends without an error, the
    folder gets :func:`usual_mode`, its files are forced to disk and it takes ``out``'s place (the rename forced
    too), an existing ``out`` swapped out and removed (readers
    never see a half folder). ``keep``: a file name that marks a complete folder; an ``out`` holding it (another
    process's, e.g. ranks racing to convert one teacher) is kept and this one dropped. ``refuse_existing``: an ``out``
    that holds something by then (filled meanwhile by another writer) is kept and FileExistsError raised, instead of
    being swapped out and removed. On an error, or when kept, the temporary folder is removed and ``out`` is
    untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=out.parent))
    try:
        yield tmp
        usual_mode(tmp)
        if keep is not None and (out / keep).exists():
            return
        fsync_tree(tmp)  # its files on disk before the rename publishes them (a DONE beside it vouches for them)
        try:
            os.replace(tmp, out)  # out absent, or an empty folder
        except OSError:  # out holds something
            if keep is not None and (out / keep).exists():  # (put there meanwhile)
                return
            if refuse_existing:
                raise FileExistsError(f"{out} was filled while this was written; it is kept as it is, and nothing "
                                      "was written there: choose a new folder") from None
            old = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
