"""Triton's interpreter switch, read without importing Triton or the kernels (``ds_hybrid.kernels`` exists only in
an installed package: a checkout run without ``pip install -e .`` still imports the stages and the decoder, and the
kl stage then says the kernel is missing and falls back to the torch reference)."""

from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter: ``TRITON_INTERPRET`` is 1, true or on (any case), the values
    Triton takes for on. Triton reads it when a kernel is defined (on import), so set it before Triton is imported.
    Interpreted kernels run on host copies of their tensors: on CPU that is the tests' way, on a GPU it is slow, and
    a CUDA graph cannot capture it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
