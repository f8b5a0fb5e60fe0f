"""Triton kernels of ds-hybrid, shipped as ``ds_hybrid.kernels`` (the repository folder is kernels/)."""

from __future__ import annotations


def __getattr__(name: str):
    # ds_hybrid.triton_env's, on first use: nothing imported here at import time (transformers imports a top-level
    # `kernels` package where one is importable, which this folder is from the repository root: importing ds_hybrid
    # here made transformers import itself)
    if name == "triton_interpreted":
        from ds_hybrid.triton_env import triton_interpreted

        return triton_interpreted
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
