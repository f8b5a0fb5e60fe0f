"""Errors that tell the user what to fix.

Every user-facing validation raises :class:`ConfigError` naming the field, the value and the fix, before any model
is built or any accelerator memory is taken.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad setting: says which field, what value it had, and how to fix it."""

    def __init__(self, field: str, value: Any, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}={value!r}: {fix}")
