"""Which layers keep softmax attention: budgets (K from a ratio), spacing rules (uniform, smart), a user's layer list,
the top-K sets of a ranking, and every ``softmax_layers`` spec of the run config turned into a list of layers.

Rankings themselves, their agreement and the selection.json format are :mod:`ds_hybrid.selection`'s (this module
reads selection files through it; it never imports this one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ds_hybrid.errors import ConfigError


def k_for_ratio(ratio: float, num_layers: int, field: str = "ratio") -> int:
    """Round-half-up of ratio x L, as the paper's released configs (36 layers: 1/8 -> 5, 1/4 -> 9; 28: 1/8 -> 4)."""
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(field, ratio, "a softmax ratio lies in [0, 1] (e.g. 0.125 or 0.25)")
    return min(num_layers, math.floor(ratio * num_layers + 0.5 + 1e-9))


def uniform_layers(num_layers: int, k: int) -> list[int]:
    """Every (L/K)-th layer starting at layer 0, as the reference configs (36 layers, K=9: 0, 4, ..., 32)."""
    if not 0 <= k <= num_layers:
        raise ConfigError("k", k, f"choose between 0 and {num_layers} softmax layers")
    return sorted({math.floor(i * num_layers / k) for i in range(k)}) if k else []


def smart_layers(num_layers: int, k: int) -> list[int]:
    """Zebra-Llama's "smart" spacing: near-even, anchored at the last layer (L-1, L-1-L/K, ...)."""
    if k <= 0:
        return []
    return sorted({max(0, round(num_layers - 1 - i * num_layers / k)) for i in range(k)})


def uniform_ranking(num_layers: int) -> list[int]:
    """An order whose every prefix of length K is as close to uniform_layers(L, K) as a nested order allows:
    ds-hybrid's uniform selector uses uniform_layers(L, K) itself for each K; this order is for the plot only."""
    order: list[int] = []
    for k in range(1, num_layers + 1):
        for l in uniform_layers(num_layers, k):
            if l not in order:
                order.append(l)
    return order


def global_layers(layer_types: Sequence[str]) -> list[int]:
    """The teacher's global (full-attention) layers; Gemma 3's 270M: 5, 11, 17 (the others are sliding-window)."""
    return [l for l, t in enumerate(layer_types) if t == "full_attention"]


def global_layers_left_linear(chosen: dict[str, Sequence[int]], glob: Sequence[int]) -> dict[str, list[int]]:
    """For each chosen set ({"k=3": [5, 11, 12], ...}) with room for every global layer (K >= their number) that
    leaves some of them linear: those global layers. On Gemma-3-270M, GA-S2's K = 3 [5, 11, 12] leaves 17 linear, and
    the hybrid that kept all three recalled more at the same KL (docs/SELECT.md), so stage select says so."""
    return {name: sorted(set(glob) - set(layers)) for name, layers in chosen.items()
            if len(layers) >= len(glob) and set(glob) - set(layers)}


def _global_and_rest(layer_types: Sequence[str], field: str) -> tuple[list[int], list[int]]:
    glob = global_layers(layer_types)
    if not glob or len(glob) == len(layer_types):
        raise ConfigError(field, "keep_global", "needs a teacher with both sliding-window and global layers (Gemma 3; "
                          f"this one has {len(glob)} global of {len(layer_types)}): use uniform")
    return glob, [l for l in range(len(layer_types)) if l not in glob]


def keep_global_layers(layer_types: Sequence[str], k: int, field: str = "select.method") -> list[int]:
    """The ``keep_global`` baseline for K: the teacher's global layers (spread by :func:`uniform_layers` when K is
    smaller), then sliding-window layers spread by :func:`uniform_layers` over the sliding ones for the rest.
    Gemma-3-270M: K = 3 -> 5, 11, 17; K = 6 -> those and sliding layers 0, 6, 12."""
    glob, rest = _global_and_rest(layer_types, field)
    if k <= len(glob):
        return sorted(glob[i] for i in uniform_layers(len(glob), k))
    return sorted(glob + [rest[i] for i in uniform_layers(len(rest), k - len(glob))])


def keep_global_ranking(layer_types: Sequence[str], field: str = "select.method") -> list[int]:
    """keep_global as one order (for the chart and the rank comparisons): the global layers first, then the sliding
    ones, each group in :func:`uniform_ranking` order. Its chosen sets come from :func:`keep_global_layers` per K,
    as uniform's come from uniform_layers (a nested order cannot space every K evenly)."""
    glob, rest = _global_and_rest(layer_types, field)
    return [glob[i] for i in uniform_ranking(len(glob))] + [rest[i] for i in uniform_ranking(len(rest))]


def chosen_sets(ranking: Sequence[int], num_layers: int, ks: Sequence[int] = (), ratios: Sequence[float] = ()) -> dict:
    """The top-K layers of a ranking for each K and each ratio: {"k=4": [...], "ratio=0.25": [...]}."""
    out = {}
    for k in ks:
        out[f"k={k}"] = sorted(ranking[:k])
    for r in ratios:
        out[f"ratio={r:g}"] = sorted(ranking[:k_for_ratio(r, num_layers)])
    return out


def parse_layer_list(text: str, field: str = "softmax_layers") -> list[int]:
    """'3,7,11' or '' -> [3, 7, 11] / []."""
    text = text.strip()
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(field, text, "give comma-separated layer indices, e.g. 3,7,11") from None


def resolve_softmax_layers(spec, num_layers: int, field: str = "softmax_layers") -> list[int]:
    """The run config's softmax_layers -> a sorted list of layer indices.

    Forms: ``[3, 7, 11]``; ``{uniform: 0.25}`` (a ratio, round-half-up) or ``{uniform: 8}`` (K layers), spaced by
    :func:`uniform_layers`; ``{selection: <selection.json>, ratio: 0.25}`` or ``{..., k: 8}`` (stage select's ranking;
    ``check_origin: false`` uses it though it was made from another teacher or align checkpoint).
    """
    from ds_hybrid.modeling.configuration import check_softmax_layers

    check_softmax_spec(spec, field)
    if isinstance(spec, (list, tuple)):
        return check_softmax_layers(list(spec), num_layers, field)
    if "selection" in spec:
        return layers_from_selection(spec, num_layers, field)
    v = spec["uniform"]
    k = int(v) if isinstance(v, int) and v >= 1 else k_for_ratio(float(v), num_layers, f"{field}.uniform")
    if k > num_layers:
        raise ConfigError(f"{field}.uniform", v, f"the teacher has only {num_layers} layers")
    return uniform_layers(num_layers, k)


FORMS = ("use a list of layer indices, {uniform: <ratio or K>}, or {selection: <path to selection.json>, ratio: <r> | "
         "k: <K>}")


def check_softmax_spec(spec, field: str = "softmax_layers") -> None:
    """The form of softmax_layers, which needs neither the teacher nor a selection file (checked with the run config,
    before any stage: a misspelt key was taken by stage align, which does not read it, and refused at kl)."""
    if isinstance(spec, (list, tuple)):
        if any(isinstance(i, bool) or not isinstance(i, int) for i in spec):
            raise ConfigError(field, spec, "layer indices must be integers")
        return
    if isinstance(spec, dict) and set(spec) == {"uniform"}:
        v = spec["uniform"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{field}.uniform", v, "give a ratio in [0, 1) or a layer count K")
        if isinstance(v, float) and not 0 <= v < 1:  # (1.0 read as a ratio was every layer; 1 is one layer)
            raise ConfigError(f"{field}.uniform", v, "a ratio lies in [0, 1) (1.0 would keep every layer softmax: the "
                              "teacher itself); a layer count K is an integer, e.g. {uniform: 8}")
        if isinstance(v, int) and v < 0:
            raise ConfigError(f"{field}.uniform", v, "a layer count K is 0 or more (or a ratio in [0, 1))")
        return
    if isinstance(spec, dict) and "selection" in spec:
        check_selection_spec(spec, field)
        return
    if isinstance(spec, dict) and (set(spec) - {"uniform", "selection", "k", "ratio"}):
        unknown = sorted(set(spec) - {"uniform", "selection", "k", "ratio"})
        raise ConfigError(field, spec, f"unknown key(s) {unknown}: {FORMS}")
    raise ConfigError(field, spec, FORMS)


def check_selection_spec(spec: dict, field: str = "softmax_layers") -> None:
    """The keys of ``{selection: path, k: K | ratio: r[, check_origin: bool]}``: exactly one of k and ratio (their
    values are checked against the teacher by :func:`selection_k`); needs neither the file nor the teacher."""
    extra = set(spec) - {"selection", "k", "ratio", "check_origin"}
    if extra or ("k" in spec) == ("ratio" in spec):
        raise ConfigError(field, spec, "write {selection: <path>, k: <K>} or {selection: <path>, ratio: <r>} (and "
                                       "check_origin: false to use it from another teacher or align checkpoint)")
    if not isinstance(spec.get("check_origin", True), bool):
        raise ConfigError(f"{field}.check_origin", spec["check_origin"], "true (the default) or false")


def layers_from_selection(spec: dict, num_layers: int, field: str = "softmax_layers") -> list[int]:
    """``{selection: path, k: K}`` or ``{selection: path, ratio: r}`` -> the top-K layers of that ranking.

    With method "uniform", "smart" or "keep_global" the spacing rule is applied for K (those are not nested orders)."""
    from ds_hybrid.selection import read_selection

    check_selection_spec(spec, field)
    sel = read_selection(spec["selection"], f"{field}.selection")
    if sel["num_layers"] != num_layers:
        raise ConfigError(f"{field}.selection", spec["selection"],
                          f"ranks {sel['num_layers']} layers, the teacher has {num_layers}")
    return selection_top_k(sel, selection_k(spec, num_layers, field), f"{field}.selection")


def selection_k(spec: dict, num_layers: int, field: str = "softmax_layers") -> int:
    """K of ``{selection: ..., k: K}`` or ``{selection: ..., ratio: r}`` (round-half-up of r x L), checked."""
    if "k" in spec:
        k = spec["k"]
        if isinstance(k, bool) or not isinstance(k, int):
            raise ConfigError(f"{field}.k", k, "a whole number of softmax layers, e.g. k: 8 (or give ratio: 0.25)")
    else:
        r = spec["ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise ConfigError(f"{field}.ratio", r, "a fraction of the layers in [0, 1], e.g. ratio: 0.25")
        k = k_for_ratio(float(r), num_layers, f"{field}.ratio")
    if not 0 <= k <= num_layers:
        raise ConfigError(f"{field}.k", k, f"choose between 0 and {num_layers}")
    return k


def selection_top_k(sel: dict, k: int, field: str = "selection") -> list[int]:
    """The K layers a selection (a read selection.json) keeps softmax, sorted: its top-K, or for the spacing rules
    ("uniform", "smart", "keep_global", whose rankings are not nested) the rule applied for K."""
    L = sel["num_layers"]
    if sel["method"] == "uniform":
        return uniform_layers(L, k)
    if sel["method"] == "smart":
        return smart_layers(L, k)
    if sel["method"] == "keep_global":
        return keep_global_layers(sel["layer_types"], k, field)
    return sorted(sel["ranking"][:k])
