"""Layer selections: rankings (plain and distance-regularized), agreement between rankings, the selection.json format.

Turning a selection (or any other ``softmax_layers`` spec) into a list of layers is :mod:`ds_hybrid.layers`'s job.

selection.json (written by stage select, read by stage kl through ``softmax_layers: {selection: <path>, k: 8}``):

    {"method": "ga_s2", "score": "heldout_kl", "lower_is_better": true,
     "scores": {"0": 1.93, ...}, "baseline": 2.41,           # the all-linear probe: score reductions read against it
     "ranking": [20, 4, ...],                                # most important first
     "chosen": {"k=4": [...], "ratio=0.25": [...]},
     "budget": {...}, "tokens_spent": 123456,
     "teacher": {"path": ..., "fingerprint": ...}, "align": {"path": ..., "fingerprint": ...},
     "config_hash": ..., "created": ...}

Stage kl refuses a selection whose teacher or align-checkpoint fingerprint differs from its own run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ds_hybrid.errors import ConfigError
from ds_hybrid.folders import atomic_write_text

FORMAT_VERSION = 1


def folder_fingerprint(folder: str | Path) -> str:
    """Identity of an HF folder: hash of its config.json and safetensors index / file sizes (cheap, no weights read)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")):
        p = folder / name
        if name.endswith(".safetensors"):
            h.update(f"{name}:{p.stat().st_size}".encode())
        elif name in ("config.json", "model.safetensors.index.json"):
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def rank_layers(scores: Mapping[int, float], lower_is_better: bool) -> list[int]:
    """Most important first; ties broken by layer index."""
    return sorted(scores, key=lambda l: ((scores[l] if lower_is_better else -scores[l]), l))


def topk_overlap(a: Sequence[int], b: Sequence[int], k: int) -> float:
    return len(set(a[:k]) & set(b[:k])) / k if k else 1.0


def kendall_tau(a: Sequence[int], b: Sequence[int]) -> float:
    """Kendall's tau-a between two rankings of the same items (1 = same order, -1 = reversed)."""
    pos_b = {x: i for i, x in enumerate(b)}
    items = [x for x in a if x in pos_b]
    n = len(items)
    if n < 2:
        return 1.0
    conc = disc = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = pos_b[items[i]] - pos_b[items[j]]
            if s < 0:
                conc += 1
            elif s > 0:
                disc += 1
    return (conc - disc) / (n * (n - 1) / 2)


def regularized_order(scores: Mapping[int, float], lower_is_better: bool, distance_reg: float) -> list[int]:
    """The distance-regularized ranking (``select.distance_reg``): greedily, the layer with the highest
    ``importance(l) - distance_reg * proximity(l, taken)``, where importance is the score rescaled to [0, 1] (1 = the
    best layer, 0 = the worst) and proximity(l, taken) = max over taken layers t of 1 / |l - t| (1 for a neighbour,
    1/2 two layers away, 0 before the first pick). Every prefix is that greedy top-K, so one order serves every K;
    ``distance_reg = 0`` gives the plain ranking (ties by layer index)."""
    if distance_reg < 0:
        raise ValueError("distance_reg must be >= 0")
    plain = rank_layers(scores, lower_is_better)
    if distance_reg == 0:
        return plain
    vals = [scores[l] for l in plain]
    best, worst = vals[0], vals[-1]
    span = abs(worst - best) or 1.0
    importance = {l: abs(worst - scores[l]) / span for l in scores}
    order: list[int] = []
    left = list(plain)
    while left:
        def value(l: int) -> float:
            near = max((1.0 / abs(l - t) for t in order), default=0.0)
            return importance[l] - distance_reg * near

        pick = max(left, key=lambda l: (value(l), -l))
        order.append(pick)
        left.remove(pick)
    return order


def make_selection(method: str, scores: Mapping[int, float], lower_is_better: bool, num_layers: int,
                   distance_reg: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A selection record (without ``chosen``: :func:`ds_hybrid.layers.chosen_sets` adds the top-K sets)."""
    for l, v in scores.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"layer {l} has a non-finite score {v}")
    plain = rank_layers(scores, lower_is_better)
    if sorted(plain) != list(range(num_layers)):
        raise ValueError(f"scores cover layers {sorted(plain)}, expected 0..{num_layers - 1}")
    sel = {"format": FORMAT_VERSION, "method": method, "lower_is_better": lower_is_better,
           "scores": {str(l): float(scores[l]) for l in sorted(scores)},
           "ranking": regularized_order(scores, lower_is_better, distance_reg), "num_layers": num_layers,
           "created": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    if distance_reg:
        sel.update(distance_reg=float(distance_reg), ranking_plain=plain)
    return sel


def write_selection(path: str | Path, selection: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(selection, indent=1))


def read_selection(path: str | Path, field: str = "softmax_layers.selection") -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, str(path), "no such file; run stage select first (it writes "
                                            "<out_dir>/select/<method>/selection.json)")
    try:
        sel = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(field, str(path), f"not a selection.json ({e})") from None
    if sel.get("format") != FORMAT_VERSION or "ranking" not in sel:
        raise ConfigError(field, str(path), "not a ds-hybrid selection.json (no format/ranking)")
    return sel


def check_selection_origin(spec: Any, teacher_path: str, align_dir: str | Path | None, field: str = "softmax_layers") -> None:
    """Refuse a selection computed from another teacher or another align checkpoint than this run's."""
    if not (isinstance(spec, dict) and "selection" in spec):
        return
    sel = read_selection(spec["selection"], f"{field}.selection")
    teacher_fp = folder_fingerprint(teacher_path)
    if sel.get("teacher", {}).get("fingerprint") not in (None, teacher_fp):
        raise ConfigError(f"{field}.selection", spec["selection"],
                          f"was computed for teacher {sel['teacher'].get('path')} (fingerprint "
                          f"{sel['teacher']['fingerprint']}), this run's teacher {teacher_path} is {teacher_fp}; "
                          "run stage select for this teacher")
    want = sel.get("align", {}).get("fingerprint")
    if want is not None and align_dir is not None and Path(align_dir).is_dir():
        have = folder_fingerprint(align_dir)
        if want != have:
            raise ConfigError(f"{field}.selection", spec["selection"],
                              f"was computed from align checkpoint {sel['align'].get('path')} ({want}), this run "
                              f"starts from {align_dir} ({have}); rerun stage select on this align checkpoint")
