"""Layer selections: the selection.json format, rankings, top-K, agreement between rankings, simple selectors.

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
from ds_hybrid.layers import k_for_ratio, uniform_layers

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


def chosen_sets(ranking: Sequence[int], num_layers: int, ks: Sequence[int] = (), ratios: Sequence[float] = ()) -> dict:
    out = {}
    for k in ks:
        out[f"k={k}"] = sorted(ranking[:k])
    for r in ratios:
        out[f"ratio={r:g}"] = sorted(ranking[:k_for_ratio(r, num_layers)])
    return out


def smart_layers(num_layers: int, k: int) -> list[int]:
    """Zebra-Llama's "smart" spacing: near-even, anchored at the last layer (L-1, L-1-L/K, ...)."""
    if k <= 0:
        return []
    return sorted({max(0, round(num_layers - 1 - i * num_layers / k)) for i in range(k)})


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


def make_selection(method: str, scores: Mapping[int, float], lower_is_better: bool, num_layers: int,
                   ks: Sequence[int], ratios: Sequence[float], **extra: Any) -> dict[str, Any]:
    for l, v in scores.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"layer {l} has a non-finite score {v}")
    ranking = rank_layers(scores, lower_is_better)
    if sorted(ranking) != list(range(num_layers)):
        raise ValueError(f"scores cover layers {sorted(ranking)}, expected 0..{num_layers - 1}")
    return {"format": FORMAT_VERSION, "method": method, "lower_is_better": lower_is_better,
            "scores": {str(l): float(scores[l]) for l in sorted(scores)}, "ranking": ranking,
            "chosen": chosen_sets(ranking, num_layers, ks, ratios), "num_layers": num_layers,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


def ranking_only_selection(method: str, ranking: Sequence[int], num_layers: int, ks, ratios, **extra) -> dict:
    """For selectors that give an order rather than scores (uniform, smart): score = position."""
    return make_selection(method, {l: i for i, l in enumerate(ranking)}, True, num_layers, ks, ratios, **extra)


def uniform_ranking(num_layers: int) -> list[int]:
    """An order whose every prefix of length K is as close to uniform_layers(L, K) as a nested order allows:
    ds-hybrid's uniform selector uses uniform_layers(L, K) itself for each K; this order is for the plot only."""
    order: list[int] = []
    for k in range(1, num_layers + 1):
        for l in uniform_layers(num_layers, k):
            if l not in order:
                order.append(l)
    return order


def write_selection(path: str | Path, selection: dict[str, Any]) -> None:
    from ds_hybrid.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(selection, indent=1))


def read_selection(path: str | Path, field: str = "softmax_layers.selection") -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, str(path), "no such file; run stage select first (it writes <out_dir>/select/selection.json)")
    try:
        sel = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(field, str(path), f"not a selection.json ({e})") from None
    if sel.get("format") != FORMAT_VERSION or "ranking" not in sel:
        raise ConfigError(field, str(path), "not a ds-hybrid selection.json (no format/ranking)")
    return sel


def layers_from_selection(spec: dict, num_layers: int, field: str = "softmax_layers") -> list[int]:
    """``{selection: path, k: K}`` or ``{selection: path, ratio: r}`` -> the top-K layers of that ranking.

    With method "uniform" or "smart" the spacing rule is applied for K (those are not nested orders)."""
    extra = set(spec) - {"selection", "k", "ratio"}
    if extra or ("k" in spec) == ("ratio" in spec):
        raise ConfigError(field, spec, "write {selection: <path>, k: <K>} or {selection: <path>, ratio: <r>}")
    sel = read_selection(spec["selection"], f"{field}.selection")
    if sel["num_layers"] != num_layers:
        raise ConfigError(f"{field}.selection", spec["selection"],
                          f"ranks {sel['num_layers']} layers, the teacher has {num_layers}")
    k = int(spec["k"]) if "k" in spec else k_for_ratio(float(spec["ratio"]), num_layers, f"{field}.ratio")
    if not 0 <= k <= num_layers:
        raise ConfigError(f"{field}.k", k, f"choose between 0 and {num_layers}")
    if sel["method"] == "uniform":
        return uniform_layers(num_layers, k)
    if sel["method"] == "smart":
        return smart_layers(num_layers, k)
    return sorted(sel["ranking"][:k])


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
