"""Triton kernels of ds-hybrid, shipped as ``ds_hybrid.kernels`` (the repository folder is kernels/)."""

from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter: ``TRITON_INTERPRET`` is 1, true or on (any case), the values
    Triton takes for on. Triton reads it when a kernel is defined (on import), so set it before Triton is imported.
    Interpreted kernels run on host copies of their tensors: on CPU that is the tests' way, on a GPU it is slow, and
    a CUDA graph cannot capture it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
