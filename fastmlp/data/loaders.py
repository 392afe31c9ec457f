"""``load(name)``: Shapeset-3x2, MNIST, CIFAR-10 and image folders as :class:`Splits`."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from fastmlp.data import cifar
from fastmlp.data.shapes import SHAPESET_CLASSES, SIZE, shapeset
from fastmlp.data.splits import ArrayStream, ShapesetStream, Splits, derive_seed

__all__ = ["DATASETS", "load"]

DATASETS = ("shapeset", "mnist", "cifar10", "imagefolder")
"""Names accepted by :func:`load`."""

SHAPESET_EVAL_SIZE = 10000
"""Default size of the Shapeset validation and test sets."""
HOLDOUT = 10000
"""MNIST / CIFAR-10: validation examples held out from the end of the training file."""
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_CLASSES = 10
"""MNIST labels lie in ``0 .. MNIST_CLASSES - 1``."""
CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


def _torchvision():
    try:
        import torchvision.datasets as tvd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MNIST, CIFAR-10 and image folders need torchvision and pillow: "
            "pip install 'fastmlp[vision]'"
        ) from err
    return tvd


def _floats(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device).float().div_(255.0)


def _check_size(what: str, value: int | None, name: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r} ({what})")


def _holdout_splits(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    class_names: list[str],
    device: torch.device,
    valid_size: int | None,
    test_size: int | None,
) -> Splits:
    """Paper splits: the last ``valid_size`` training examples validate, the rest train.

    ``train_x``/``test_x`` are uint8 ``[N, F]``. ``test_size`` keeps the first examples of
    the official test set (all of them by default).
    """
    valid_size = HOLDOUT if valid_size is None else valid_size
    n = train_x.shape[0]
    if valid_size >= n:
        raise ValueError(
            f"{name}: the training file holds {n} examples, too few to hold out "
            f"valid_size={valid_size} for validation and still train; pass a smaller valid_size"
        )
    if test_size is not None and test_size > test_x.shape[0]:
        raise ValueError(
            f"{name}: test_size={test_size} but the test file holds only {test_x.shape[0]} examples"
        )
    test_size = test_x.shape[0] if test_size is None else test_size
    cut = n - valid_size
    return Splits(
        name=name,
        in_features=train_x.shape[1],
        num_classes=len(class_names),
        class_names=class_names,
        valid=(_floats(train_x[cut:], device), train_y[cut:].to(device)),
        test=(_floats(test_x[:test_size], device), test_y[:test_size].to(device)),
        train_size=cut,
        _train=ArrayStream(train_x[:cut].to(device), train_y[:cut].to(device)),
    )


def _load_shapeset(device: torch.device, valid_size: int | None, test_size: int | None) -> Splits:
    """Validation and test sets are generated on the CPU from fixed seeds (the same for
    every run, seed and device) and moved to ``device``; training data is generated
    online on ``device``."""
    valid_size = SHAPESET_EVAL_SIZE if valid_size is None else valid_size
    test_size = SHAPESET_EVAL_SIZE if test_size is None else test_size
    sets = []
    for split, size in (("valid", valid_size), ("test", test_size)):
        x, y = shapeset(size, seed=derive_seed("shapeset", split), device="cpu")
        sets.append((x.view(size, SIZE * SIZE).to(device), y.to(device)))
    return Splits(
        name="shapeset",
        in_features=SIZE * SIZE,
        num_classes=len(SHAPESET_CLASSES),
        class_names=list(SHAPESET_CLASSES),
        valid=sets[0],
        test=sets[1],
        train_size=None,
        _train=ShapesetStream(device),
    )


def _load_mnist(
    data_dir: Path, download: bool, device: torch.device, valid_size, test_size
) -> Splits:
    """MNIST through ``torchvision.datasets.MNIST`` (files under ``data_dir/MNIST/raw``).

    The raw IDX files may be present decompressed (as torchvision leaves them after a
    download) or only as ``.gz``: gzipped files are decompressed next to themselves
    first, as torchvision's own download does.
    """
    tvd = _torchvision()
    raw = data_dir / "MNIST" / "raw"
    for base in MNIST_FILES:
        if not (raw / base).is_file() and (raw / f"{base}.gz").is_file():
            _gunzip(raw / f"{base}.gz", raw / base)
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing and not download:
        raise FileNotFoundError(
            f"MNIST not found: expected {', '.join(missing)} (or the same names with .gz) "
            f"in {raw}. Pass --download (download=True in Python) to download it into "
            f"{data_dir}, or copy the four IDX files there."
        )
    if missing:
        for train in (True, False):  # (torchvision downloads and md5-checks the files)
            tvd.MNIST(str(data_dir), train=train, download=True)
    sets = {}
    for images_file, labels_file in (MNIST_FILES[:2], MNIST_FILES[2:]):
        x = _read_idx(raw / images_file, 3, "images")
        y = _read_idx(raw / labels_file, 1, "labels")
        if len(x) != len(y):
            raise ValueError(
                f"MNIST: {raw / images_file} holds {len(x)} images but {raw / labels_file} "
                f"holds {len(y)} labels: expected one label per image"
            )
        if y.max(initial=0) >= MNIST_CLASSES:
            i = int(np.argmax(y >= MNIST_CLASSES))
            raise ValueError(
                f"MNIST: {raw / labels_file} holds label {y[i]} (at index {i}): expected "
                f"labels 0 to {MNIST_CLASSES - 1}"
            )
        sets[images_file] = x
        sets[labels_file] = y
    train_x, test_x = sets[MNIST_FILES[0]], sets[MNIST_FILES[2]]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"MNIST: the training images in {raw / MNIST_FILES[0]} are "
            f"{'x'.join(map(str, train_x.shape[1:]))} pixels but the test images in "
            f"{raw / MNIST_FILES[2]} are {'x'.join(map(str, test_x.shape[1:]))}: expected "
            "the same size"
        )
    flat = [torch.from_numpy(x.reshape(len(x), -1)) for x in (train_x, test_x)]
    labels = [torch.from_numpy(sets[f].astype(np.int64)) for f in MNIST_FILES[1::2]]
    return _holdout_splits(
        "mnist",
        flat[0],
        labels[0],
        flat[1],
        labels[1],
        list(tvd.MNIST.classes),
        device,
        valid_size,
        test_size,
    )


def _read_idx(path: Path, ndim: int, what: str) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions (MNIST's format), checked:
    magic number, dimensions and length; errors name the file and what was expected."""
    data = path.read_bytes()
    magic = 0x0800 + ndim  # two zero bytes, type 0x08 (unsigned byte), the dimension count
    where = f"MNIST {what} file {path}"
    got = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if got != magic:
        found = "an empty file" if not data else f"0x{data[:4].hex()}"
        raise ValueError(
            f"{where} is not an IDX file of {what}: expected the magic number 0x{magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s)), got {found}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{where} is truncated: its header should give {ndim} dimension(s) but the file "
            f"ends after {len(data)} bytes"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)
    if size == 0:
        raise ValueError(
            f"{where} holds no {what} (dimensions {'x'.join(map(str, dims))}): expected the "
            f"MNIST {what}"
        )
    if len(data) - header != size:
        raise ValueError(
            f"{where} does not match its header: dimensions {'x'.join(map(str, dims))} "
            f"mean {size} bytes of data, but the file holds {len(data) - header} "
            "(truncated, or not an MNIST file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _gunzip(src: Path, dst: Path) -> None:
    """Decompress ``src`` to ``dst`` atomically (temporary file, then rename)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(
            f"{src} is not a valid gzip file ({err}): expected {dst.name} gzipped (or "
            f"{dst.name} itself, decompressed, next to it)"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _load_cifar10(
    data_dir: Path, download: bool, device: torch.device, valid_size, test_size
) -> Splits:
    """CIFAR-10's python batches in ``data_dir/cifar-10-batches-py``.

    The batch files are pickles; they are read by :mod:`fastmlp.data.cifar`'s
    restricted unpickler, which builds only the arrays, lists and dicts of the format
    and refuses anything else (no code from the files ever runs), so official,
    re-packed and hand-made copies all load. ``download`` fetches the official archive
    (md5-checked by torchvision) when files are missing. Images are flattened
    channel-major (R plane, G, B: 3072 values).
    """
    folder = data_dir / CIFAR10_FOLDER
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: expected {', '.join(missing)} in {folder} (the python "
                "version, cifar-10-python.tar.gz, extracted). Pass --download (download=True "
                f"in Python) to download it into {data_dir}."
            )
        _torchvision()
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(
            CIFAR10_URL, str(data_dir), filename=CIFAR10_ARCHIVE, md5=CIFAR10_ARCHIVE_MD5
        )
    class_names = cifar.read_label_names(folder / "batches.meta")
    sets = {}
    for train, names in ((True, CIFAR10_FILES[:5]), (False, CIFAR10_FILES[5:6])):
        parts = [cifar.read_batch(folder / name) for name in names]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        sets[train] = (x, y)
    return _holdout_splits(
        "cifar10", *sets[True], *sets[False], class_names, device, valid_size, test_size
    )


def _read_grey(path: str, size: int) -> np.ndarray:
    """Image file -> uint8 ``[size, size]``: grey, centre-cropped to a square, resized."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("L", (size, size))  # JPEG: decode at reduced scale when possible
        im = im.convert("L")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.resize(
            (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
        )
        return np.asarray(im, dtype=np.uint8)


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() for f in folder.rglob("*"))


def _load_imagefolder(
    data_dir: Path, device: torch.device, seed: int, valid_size, test_size, image_size: int
) -> Splits:
    """Small-ImageNet-style data: ``data_dir/<class name>/<image files>``.

    Every image is converted to grey, centre-cropped to a square and resized to
    ``image_size x image_size`` (bilinear). The examples are shuffled with ``seed``
    (CPU generator) and cut into test (first ``test_size``), validation (next
    ``valid_size``) and training (the rest); both default to 10% of the images
    (rounded, at least one each), which is also what sizes too large to leave a training
    set fall back to, with a warning. Files that cannot be read as images, or that exceed
    PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), are skipped, and a
    warning counts them and names the first five; a class folder without any image (or
    without any readable one) is an error naming it.
    """
    tvd = _torchvision()
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"image folder {data_dir} does not exist: imagefolder expects data_dir to hold one "
            "sub-folder of images per class (e.g. data_dir/cat/001.png, data_dir/dog/002.jpg)"
        )
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    class_dirs = sorted(d for d in data_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise FileNotFoundError(
            f"image folder {data_dir} has no class sub-folder: imagefolder expects one "
            "sub-folder of images per class (e.g. data_dir/cat/001.png, data_dir/dog/002.jpg)"
        )
    empty = [d.name for d in class_dirs if not _has_images(d)]
    if empty:
        raise ValueError(
            f"imagefolder: class folder(s) {', '.join(empty)} in {data_dir} hold no images "
            f"(expected files ending {', '.join(IMAGE_EXTENSIONS)}); add images or remove them"
        )
    from PIL import Image

    folder = tvd.DatasetFolder(str(data_dir), loader=lambda p: p, extensions=IMAGE_EXTENSIONS)
    images, labels, bad = [], [], []
    with warnings.catch_warnings():
        # An image over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS) is
        # skipped like any unreadable one: PIL's warning (over the limit) and error (over
        # twice it) name no file, and decoding it could exhaust the memory.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for path, label in folder.samples:
            try:
                images.append(_read_grey(path, image_size))
            except (
                OSError,  # not an image, truncated, ...
                ValueError,
                SyntaxError,
                Image.DecompressionBombError,
                Image.DecompressionBombWarning,
            ) as err:
                bad.append((path, err))
                continue
            labels.append(label)
    if bad:
        named = "; ".join(f"{path}: {' '.join(str(err).split())}" for path, err in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(
            f"imagefolder: skipped {len(bad)} unreadable image(s) of {len(folder.samples)} "
            f"in {data_dir} ({named}{more})",
            stacklevel=3,
        )
    lost = sorted(set(range(len(folder.classes))) - set(labels))
    if lost:
        names = ", ".join(folder.classes[c] for c in lost)
        raise ValueError(f"imagefolder: no readable image in class folder(s) {names} of {data_dir}")
    n = len(images)
    tenth = max(1, round(0.1 * n))
    valid_size = tenth if valid_size is None else valid_size
    test_size = tenth if test_size is None else test_size
    if valid_size + test_size >= n and 2 * tenth < n:
        # (e.g. fastmlp train's 2000 and 2000, sized for Shapeset, on a small folder)
        warnings.warn(
            f"imagefolder: {n} images in {data_dir} are too few for valid_size={valid_size} "
            f"plus test_size={test_size} and a training set: using the default 10% split, "
            f"valid_size={min(valid_size, tenth)} and test_size={min(test_size, tenth)} "
            "(pass smaller sizes to choose them)",
            stacklevel=3,
        )
        valid_size, test_size = min(valid_size, tenth), min(test_size, tenth)
    if valid_size + test_size >= n:
        raise ValueError(
            f"imagefolder: {n} images in {data_dir}, too few for valid_size={valid_size} plus "
            f"test_size={test_size} and a training set (expected at least 3 images)"
        )
    x = torch.from_numpy(np.stack(images)).reshape(n, image_size * image_size)
    y = torch.tensor(labels, dtype=torch.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("split", seed)))
    test_idx, valid_idx = perm[:test_size], perm[test_size : test_size + valid_size]
    train_idx = perm[test_size + valid_size :]
    return Splits(
        name="imagefolder",
        in_features=image_size * image_size,
        num_classes=len(folder.classes),
        class_names=list(folder.classes),
        valid=(_floats(x[valid_idx], device), y[valid_idx].to(device)),
        test=(_floats(x[test_idx], device), y[test_idx].to(device)),
        train_size=len(train_idx),
        _train=ArrayStream(x[train_idx].to(device), y[train_idx].to(device)),
    )


def load(
    name: str,
    *,
    data_dir: str | os.PathLike = "data",
    download: bool = False,
    seed: int = 0,
    device: torch.device | str | None = "cpu",
    valid_size: int | None = None,
    test_size: int | None = None,
    image_size: int = 37,
) -> Splits:
    """Load a dataset as train stream + validation and test tensors on ``device``.

    Args:
        name: one of ``DATASETS``:

            - ``"shapeset"``: Shapeset-3x2 (1024 inputs, 9 classes), generated: an
              infinite online training stream on ``device`` and fixed validation and
              test sets (``valid_size``/``test_size``, 10000 each by default, the same
              for every run and device).
            - ``"mnist"``: ``torchvision.datasets.MNIST`` under ``data_dir`` (784
              inputs): 50k train / 10k valid (the last 10k of the training file) /
              10k test.
            - ``"cifar10"``: the python batches under ``data_dir/cifar-10-batches-py``
              (3072 inputs, channel-major), read without running code from the files
              (:mod:`fastmlp.data.cifar`): 40k / 10k (last 10k of the training
              batches) / 10k.
            - ``"imagefolder"``: ``data_dir`` holds one sub-folder of images per class
              (a Small-ImageNet stand-in); grey ``image_size x image_size``; split at
              random with ``seed`` into train / valid / test.

        data_dir: dataset root (the folder of class folders for ``imagefolder``).
        download: download MNIST / CIFAR-10 into ``data_dir`` if missing. Without it a
            missing dataset raises ``FileNotFoundError`` saying where files were expected.
        seed: seed of the image-folder split (other datasets have fixed splits; the
            training order is seeded in ``Splits.train_batches``).
        device: where the tensors live and Shapeset training data is generated.
        valid_size: validation examples (MNIST / CIFAR-10: held out from the end of
            the training file, default 10000; imagefolder: default 10%, also used, with a
            warning, where ``valid_size`` and ``test_size`` would leave no training set).
        test_size: test examples (MNIST / CIFAR-10: the first ``test_size`` of the
            official test set, default all of it; imagefolder: default 10%).
        image_size: image-folder side length in pixels (the paper's Small-ImageNet: 37).

    Returns:
        A :class:`Splits`; inputs are float32, flattened, scaled to [0, 1].
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    _check_size(name, valid_size, "valid_size")
    _check_size(name, test_size, "test_size")
    device = torch.get_default_device() if device is None else torch.device(device)
    data_dir = Path(data_dir).expanduser()
    if name == "shapeset":
        return _load_shapeset(device, valid_size, test_size)
    if name == "mnist":
        return _load_mnist(data_dir, download, device, valid_size, test_size)
    if name == "cifar10":
        return _load_cifar10(data_dir, download, device, valid_size, test_size)
    return _load_imagefolder(data_dir, device, seed, valid_size, test_size, image_size)
