"""Benchmarks: fastmlp vs hooks vs plain PyTorch (installed as ``fastmlp.bench``)."""
