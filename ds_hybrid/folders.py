"""Folders written atomically (built under a temporary name by ``tempfile.mkdtemp``, then renamed) get the mode of a
plain ``mkdir``: mkdtemp makes them private (0700), and a model folder, a converted teacher in a shared cache or the
embedded corpus is read by other users and jobs of a cluster."""

from __future__ import annotations

import os
from pathlib import Path


def usual_mode(folder: str | Path) -> None:
    """Give ``folder`` the mode ``mkdir`` would give it under the process's umask (0755 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
