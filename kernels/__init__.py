"""Fused Triton kernels (installed as ``fastmlp.kernels``)."""
