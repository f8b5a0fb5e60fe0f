"""Errors that tell the user what to fix.

Every user-facing validation raises :class:`ConfigError` naming the field, the value and the fix, before any model
is built or any accelerator memory is taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad setting: says which field, what value it had, and how to fix it."""

    def __init__(self, field: str, value: Any, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}={value!r}: {fix}")

    def __reduce__(self):  # rebuilt from its three fields in another process (a tokenizer worker's error)
        return type(self), (self.field, self.value, self.fix)


def out_folder(path: str | Path, field: str = "--out") -> Path:
    """An output folder a command may write into: refused (before any work) where it, or a folder above it, is a
    file."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise ConfigError(field, str(path), f"{q} is a file, not a folder: give a folder to write into")
    return p
