"""Layer selections: rankings (plain and distance-regularized), agreement between rankings, the selection.json format.

Turning a selection (or any other ``softmax_layers`` spec) into a list of layers is :mod:`ds_hybrid.layers`'s job.

selection.json (written by stage select, read by stage kl through ``softmax_layers: {selection: <path>, k: 8}``):

    {"method": "ga_s2", "score": "heldout_kl", "lower_is_better": true,
     "scores": {"0": 1.93, ...}, "baseline": 2.41,           # the all-linear probe: score reductions read against it
     "ranking": [20, 4, ...],                                # most important first
     "chosen": {"k=4": [...], "ratio=0.25": [...]},
     "budget": {...}, "tokens_spent": 123456,
     "teacher": {"path": ..., "fingerprint": ..., "content": ...}, "align": {...},
     "config_hash": ..., "created": ...}

Stage kl refuses a selection whose teacher or align checkpoint differs from its own run's: by ``content`` (samples of
every tensor's bytes: a retrained align export of the same shapes differs) where the selection records it, else by
``fingerprint`` (config and file sizes: selections written before ``content`` existed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ds_hybrid.errors import ConfigError
from ds_hybrid.folders import atomic_write_text

FORMAT_VERSION = 1
log = logging.getLogger("ds_hybrid")


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


def content_fingerprint(folder: str | Path, sample: int = 64) -> str:
    """Identity of an HF folder's weights: :func:`folder_fingerprint` plus, for every tensor of its safetensors
    files, its name, dtype, shape and ``sample`` bytes at its start, middle and end. A retrained export of the same
    shapes differs (its trained tensors do; sampling every tensor, not the files, catches one whose copied layers
    are most of the file), a copy does not; it reads a few hundred bytes a tensor, seconds for a 70B folder."""
    folder = Path(folder)
    h = hashlib.sha256(folder_fingerprint(folder).encode())
    for path in sorted(folder.glob("*.safetensors")):
        _hash_tensors(h, path, sample)
    return h.hexdigest()[:16]


def tensors_fingerprint(folder: str | Path, sample: int = 64) -> str | None:
    """Identity of an HF model's tensors alone, as :func:`content_fingerprint` samples them, in name order: the
    same for a copy resharded or with another config.json (a teacher folder written again by another transformers
    version). Only the files the model reads (its index's, else model.safetensors; not a hub repo's other copies,
    e.g. Mistral's consolidated.safetensors); None where it has neither."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    headers: dict[str, tuple[Path, int, dict]] = {}
    for name in files:
        with open(folder / name, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            headers.update({k: (folder / name, 8 + n, t) for k, t in json.loads(f.read(n)).items()
                            if k != "__metadata__"})
    if not headers:
        return None
    h = hashlib.sha256()
    for name in sorted(headers):
        path, base, t = headers[name]
        with open(path, "rb") as f:
            _hash_tensor(h, f, base, name, t, sample)
    return h.hexdigest()[:16]


def _hash_tensors(h, path: Path, sample: int) -> None:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for name in sorted(k for k in header if k != "__metadata__"):
            _hash_tensor(h, f, 8 + n, name, header[name], sample)


def _hash_tensor(h, f, base: int, name: str, t: dict, sample: int) -> None:
    """A tensor's name, dtype, shape and ``sample`` bytes at its start, middle and end."""
    lo, hi = t["data_offsets"]
    h.update(f"{name}|{t['dtype']}|{t['shape']}".encode())
    for at in sorted({lo, max(lo, (lo + hi) // 2 - sample // 2), max(lo, hi - sample)}):
        f.seek(base + at)
        h.update(f.read(min(sample, hi - at)))


def folder_identity(folder: str | Path) -> dict[str, str]:
    """What a selection records of a folder it depends on (the teacher, the align export)."""
    return {"path": str(folder), "fingerprint": folder_fingerprint(folder), "content": content_fingerprint(folder)}


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


def ranking_tau(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    """Kendall's tau between two selections' rankings, or None when either is a spacing rule (uniform, smart,
    keep_global: their "ranking" is an order for the chart, e.g. smart's later layers first, not an importance)."""
    from ds_hybrid.config import SPACING_METHODS

    if a.get("method") in SPACING_METHODS or b.get("method") in SPACING_METHODS:
        return None
    return kendall_tau(a["ranking"], b["ranking"])


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


#: halving's default first round, as a fraction of a GA-S2 probe (``select.halving_first_tokens`` unset): a quarter.
#: Layers whose worth as softmax shows only after training rank low in a short probe: on SmolLM2-135M GA-S2's best
#: layer (18) ranks 25th of 30 after 2 steps and 17th after 6 of its 40, so a first round of 1/8 stopped it at once;
#: a replay of halving on those probes' curves keeps GA-S2's top-4 from 8 steps and its top-8 from 10 (docs/SELECT.md)
HALVING_FIRST_FRACTION = 4


def halving_first_steps(first_tokens: int | None, probe_steps: int, step_tokens: int) -> int:
    """The first round's probe steps: ``first_tokens`` (``select.halving_first_tokens``) or, unset, a
    ``1/HALVING_FIRST_FRACTION`` of a full probe's ``probe_steps``; at least one step, never past a full probe."""
    first = first_tokens or (probe_steps * step_tokens) // HALVING_FIRST_FRACTION
    return max(1, min(first // step_tokens, probe_steps))


def halving_next(alive: Sequence[int], round_scores: Mapping[int, float], steps: int, max_steps: int,
                 keep: int) -> tuple[list[int], int] | None:
    """Successive halving's rule after a round of probes of ``steps`` steps (lower score = more important): the
    survivors (the better half, never fewer than ``keep``) and their next probe length (twice as long, at most
    ``max_steps``), or None when this round was the last (``keep`` or fewer were alive, or the probes had the full
    length)."""
    if len(alive) <= keep or steps >= max_steps:
        return None
    ranked = rank_layers({l: round_scores[l] for l in alive}, lower_is_better=True)
    return ranked[:max(keep, len(alive) // 2)], min(steps * 2, max_steps)


def halving_order(rounds: Sequence[Mapping[str, Any]], num_layers: int) -> dict[int, float]:
    """Halving's final scores from its rounds (each ``{"alive": [...], "scores": {layer: score}}``, a layer's score
    from the last round it ran in): layers that stopped in an earlier round rank below every layer that went
    further (their scores carry an offset per round missed, so ranking them lower-is-better gives that order)."""
    scores: dict[int, float] = {}
    for rd in rounds:
        scores.update({int(l): float(v) for l, v in rd["scores"].items()})
    offset = max(scores.values()) - min(scores.values()) + 1.0
    depth = {l: max(i for i, rd in enumerate(rounds) if l in rd["alive"]) for l in range(num_layers)}
    return {l: scores[l] + offset * (len(rounds) - 1 - depth[l]) for l in range(num_layers)}


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


def recorded_vs_now(rec: dict, folder: str | Path) -> tuple[str | None, str]:
    """(the identity a selection recorded of a folder, the folder's now), by content where it was recorded."""
    if rec.get("content") is not None:
        return rec["content"], content_fingerprint(folder)
    return rec.get("fingerprint"), folder_fingerprint(folder)


def check_selection_origin(spec: Any, teacher_path: str, align_dir: str | Path | None, field: str = "softmax_layers") -> None:
    """Refuse a selection computed from another teacher or another align checkpoint than this run's."""
    if not (isinstance(spec, dict) and "selection" in spec):
        return
    if spec.get("check_origin", True) is False:  # the user knows: e.g. a selection of an earlier run of the recipe
        log.warning("%s.selection %s: its teacher and align checkpoint are not checked (check_origin: false)", field,
                    spec["selection"])
        return
    sel = read_selection(spec["selection"], f"{field}.selection")
    rec = sel.get("teacher", {})
    want, have = recorded_vs_now(rec, teacher_path)
    if want is not None and want != have:
        raise ConfigError(f"{field}.selection", spec["selection"],
                          f"was computed for teacher {rec.get('path')} ({want}), this run's teacher {teacher_path} "
                          f"is {have}; run stage select for this teacher")
    if sel.get("align") and not (align_dir is not None and Path(align_dir).is_dir()):
        log.warning("%s.selection %s was computed from align checkpoint %s; this run starts elsewhere (%s), so its "
                    "origin there is not checked", field, spec["selection"], sel["align"].get("path"), align_dir)
    if align_dir is not None and Path(align_dir).is_dir():
        want, have = recorded_vs_now(sel.get("align", {}), align_dir)
        if want is not None and want != have:
            raise ConfigError(f"{field}.selection", spec["selection"],
                              f"was computed from align checkpoint {sel['align'].get('path')} ({want}), this run "
                              f"starts from {align_dir} ({have}); rerun stage select on this align checkpoint "
                              "(with --force: the selection file is kept otherwise)")
