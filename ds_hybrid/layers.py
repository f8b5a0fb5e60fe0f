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
