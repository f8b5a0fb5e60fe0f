"""Softmax-layer budgets: K from a ratio, and the parse of a user's layer list."""

from __future__ import annotations

import math

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
    :func:`uniform_layers`; ``{selection: <selection.json>, ratio: 0.25}`` or ``{..., k: 8}`` (stage select's ranking).
    """
    from ds_hybrid.modeling.configuration import check_softmax_layers

    if isinstance(spec, (list, tuple)):
        return check_softmax_layers(list(spec), num_layers, field)
    if isinstance(spec, dict) and set(spec) == {"uniform"}:
        v = spec["uniform"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{field}.uniform", v, "give a ratio in [0, 1) or a layer count K")
        k = int(v) if isinstance(v, int) and v >= 1 else k_for_ratio(float(v), num_layers, f"{field}.uniform")
        if k > num_layers:
            raise ConfigError(f"{field}.uniform", v, f"the teacher has only {num_layers} layers")
        return uniform_layers(num_layers, k)
    if isinstance(spec, dict) and "selection" in spec:
        from ds_hybrid.selection import layers_from_selection

        return layers_from_selection(spec, num_layers, field)
    raise ConfigError(field, spec, "use a list of layer indices, {uniform: <ratio or K>}, or "
                                   "{selection: <path to selection.json>, ratio: <r> | k: <K>}")
