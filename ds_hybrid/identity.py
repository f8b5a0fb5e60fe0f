"""What makes two records name the same model: a teacher spec compared as what it names, mixer options compared as
options. Shared by the resume checks (trainer) and stage select's probe records (stages/probes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ds_hybrid.errors import ConfigError


def teacher_id(spec: Any) -> Any:
    """A teacher spec compared as what it names: the embedded model however written, a folder by its real path."""
    from ds_hybrid.teacher import is_embedded

    if is_embedded(spec):
        return "embedded"
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else spec


def mixer_option_change(was: dict[str, Any], now: dict[str, Any], mixer: str) -> tuple[str, Any, Any] | None:
    """The first mixer option whose value makes ``now`` another model than ``was`` (the run config's options and a
    checkpoint's record of them): (its field, the value now, the value then), or None. Values are compared as the
    options' types, defaults filled in, options the mixer never reads or ``backend`` left out; a record naming an
    option this version does not know is compared as written."""
    from ds_hybrid.modeling.mixers import MixerOptions

    try:
        a, b = MixerOptions.from_dict(now), MixerOptions.from_dict(was)
    except ConfigError:
        return None if was == now else ("mixer_options", now, was)
    if differ := a.differences(b, mixer):
        return f"mixer_options.{differ[0]}", getattr(a, differ[0]), getattr(b, differ[0])
    return None
