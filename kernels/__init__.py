"""Triton kernels of ds-hybrid, shipped as ``ds_hybrid.kernels`` (the repository folder is kernels/)."""
