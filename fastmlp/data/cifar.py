"""CIFAR-10 python batches read without running code from the files.

The batch files of ``cifar-10-python.tar.gz`` are pickles: a plain ``pickle.load``
runs whatever callable a crafted file names (``os.system`` ...). Here they are read
by a restricted unpickler that builds only what those files hold, dicts, lists,
strings and numbers plus numeric numpy arrays, and refuses any other global with a
:class:`UnsafeDatasetFile` error naming it. The result is then checked against the
format: ``data`` a uint8 array ``[N, 3072]`` (channel-major rows), ``labels`` ``N``
integers in ``0..9``; ``batches.meta`` holds ten ``label_names``.

Any file in that format loads (official, re-packed or hand-made, protocol 2 to 5,
written by numpy 1 or 2); nothing else does.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafeDatasetFile", "read_batch", "read_label_names", "safe_unpickle"]

PIXELS = 3 * 32 * 32
CLASSES = 10


class UnsafeDatasetFile(ValueError):
    """A dataset file that is not in the expected format (or asks to run code)."""


def _dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(obj, align=align, copy=copy)
    if dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
        raise pickle.UnpicklingError(f"array of dtype {dt} (only plain numeric arrays are read)")
    return dt


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subclass {subtype!r} (only numpy.ndarray is read)")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(buf, bytes | bytearray | memoryview):
        raise pickle.UnpicklingError("array buffer is not bytes")
    return np.frombuffer(buf, dtype=_dtype(dtype)).reshape(shape, order=order).copy()


def _encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError("bytes must be pickled as latin1 text")
    return codecs.encode(text, encoding)


# The only globals a CIFAR-10 pickle needs (numpy 1 names ``numpy.core``, numpy 2
# ``numpy._core``); each is replaced by a checked constructor.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}") from None


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` building only dicts, lists, strings, numbers and numeric arrays.

    Raises:
        UnsafeDatasetFile: the file names any other global (code would run) or is not
            a pickle; the message names the file and what was found.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return _Unpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise UnsafeDatasetFile(
            f"{path} was refused: {err}; only CIFAR-10 python batches (dicts of numpy "
            "arrays and lists) are loaded, nothing in them is run"
        ) from None
    except Exception as err:  # truncated or not a pickle at all
        raise UnsafeDatasetFile(
            f"{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err})"
        ) from None


def _get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise UnsafeDatasetFile(f"{path} is not a CIFAR-10 batch: expected a dict, got {type(d)}")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise UnsafeDatasetFile(f"{path} is not a CIFAR-10 batch: it has no {key!r} entry")


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: uint8 images ``[N, 3072]`` (R plane, G, B) and int64 labels ``[N]``."""
    path = Path(path)
    d = safe_unpickle(path)
    x, y = _get(d, "data", path), _get(d, "labels", path)
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2):
        raise UnsafeDatasetFile(f"{path}: 'data' must be a uint8 array [N, {PIXELS}]")
    if x.shape[1] != PIXELS:
        raise UnsafeDatasetFile(f"{path}: 'data' has {x.shape[1]} values per image, not {PIXELS}")
    if isinstance(y, np.ndarray):
        y = y.tolist()
    if not (isinstance(y, list) and all(isinstance(v, int) for v in y)):
        raise UnsafeDatasetFile(f"{path}: 'labels' must be a list of integers")
    labels = np.asarray(y, dtype=np.int64)
    if labels.shape != (x.shape[0],):
        raise UnsafeDatasetFile(f"{path}: {x.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise UnsafeDatasetFile(f"{path}: labels must lie in 0..{CLASSES - 1}")
    return np.ascontiguousarray(x), labels


def read_label_names(path: str | os.PathLike) -> list[str]:
    """The ten class names of ``batches.meta``."""
    path = Path(path)
    names = _get(safe_unpickle(path), "label_names", path)
    if not (isinstance(names, list) and len(names) == CLASSES):
        raise UnsafeDatasetFile(f"{path}: 'label_names' must list {CLASSES} names")
    out = []
    for n in names:
        if isinstance(n, bytes):
            n = n.decode("utf-8", "replace")
        if not isinstance(n, str):
            raise UnsafeDatasetFile(f"{path}: 'label_names' must be strings")
        out.append(n)
    return out
