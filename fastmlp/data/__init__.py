"""Datasets of the paper: Shapeset-3x2, MNIST, CIFAR-10 and image folders.

``shapeset(n, seed=...)`` generates Shapeset-3x2 images directly; ``load(name)``
returns a :class:`Splits` (validation and test tensors on a device plus a
deterministic, resumable training stream) for any of ``DATASETS``.
"""

from fastmlp.data.loaders import DATASETS, load
from fastmlp.data.shapes import (
    SHAPE_TYPES,
    SHAPESET_CLASSES,
    ShapesetSample,
    shapeset,
    shapeset_sample,
)
from fastmlp.data.splits import Splits, derive_seed
from fastmlp.data.throughput import shapeset_throughput

__all__ = [
    "DATASETS",
    "SHAPESET_CLASSES",
    "SHAPE_TYPES",
    "ShapesetSample",
    "Splits",
    "derive_seed",
    "load",
    "shapeset",
    "shapeset_sample",
    "shapeset_throughput",
]
