"""Exclusive places: a folder that one job at a time may write, held through an ``flock`` on a lock file.

The main rank takes the lock and every rank learns its verdict (one broadcast), so a refusal ends all ranks alike. The
lock goes with the process: a job killed leaves nothing to clean up (except where a crashed node's lock outlives it
on a shared file system until the server lets it go; the refusal says how to clear it). Re-entrant in one process.
Used by the training stages (a stage's run folder) and the selection's probe tasks (stages.probes.task_held).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ds_hybrid import distributed as D
from ds_hybrid.errors import ConfigError

log = logging.getLogger("ds_hybrid")

Refusal = tuple[str, Any, str]  # a ConfigError's field, value and fix
_HELD: dict[str, int] = {}  # the locks this process holds, by path, with their re-entry counts


@contextlib.contextmanager
def held(path: Path, busy: Callable[[str], Refusal], cannot_lock: Callable[[OSError], Refusal] | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (its folder made first) while the block runs. ``busy(holder)``: the
    refusal when another process holds it (``holder``: the host, pid and start time it wrote there).
    ``cannot_lock(error)``: the refusal where the file system has no locks or the folder cannot be made; ``None``:
    a warning there, and the block runs unlocked."""
    key = str(path.resolve())
    # (counted on every rank alike: a re-entry must skip the broadcast below on all of them, or none)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    refusal: Refusal | None = None
    unlocked: OSError | None = None
    f = None
    if D.is_main():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            f = None
            refusal = busy(holder)
        except OSError as e:
            if f is not None:
                f.close()
                f = None
            if cannot_lock is None:
                unlocked = e
            else:
                refusal = cannot_lock(e)
        else:
            try:  # (who holds it, for a second copy's message: a full disk here must not end this rank alone)
                f.seek(0)
                f.truncate()
                f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n")
                f.flush()
                os.fsync(f.fileno())  # (a copy on another node reads who holds it)
            except OSError as e:
                log.warning("could not write who holds %s (%s); the lock is held", path, e)
    refusal = D.broadcast_object(refusal)  # (every rank reaches this, whatever the main rank met)
    if refusal is not None:
        raise ConfigError(*refusal)
    if unlocked is not None:
        log.warning("cannot lock %s (%s): a second copy of this job started while it runs would not be refused; "
                    "the file system has no flock", path, unlocked)
    _HELD[key] = 1
    try:
        yield
    finally:
        _HELD.pop(key, None)
        if f is not None:
            f.close()  # (closing the file lets the lock go)
