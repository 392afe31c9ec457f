"""MNIST, CIFAR-10 and image folders in their real on-disk formats, and the map-style stream.

The tests write tiny datasets to a temporary directory in the formats torchvision
reads (MNIST IDX files, gzipped; CIFAR-10 python pickles; a folder of PNG/JPEG
images) and load them through ``fastmlp.data.load``: no network. Tiny files need
small splits, so they pass ``valid_size`` (and ``test_size``) explicitly.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmlp.data import DATASETS, load
from fastmlp.data.splits import ArrayStream

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX (Lush / LeCun) encoding of a uint8 array: magic 0x0000 08 ndim, big-endian dims."""
    assert array.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.uint8)
    return x, y


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = _images(n, (28, 28), seed)
        data[prefix] = (x, y)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(raw / f"{name}.gz", "wb") as f:
                    f.write(_idx_bytes(arr))
            else:
                (raw / name).write_bytes(_idx_bytes(arr))
    return data


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 12):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{k}" for k in range(10)]
    train = []
    for b in range(1, 6):
        x, y = _images(per_batch, (3072,), 10 + b)
        train.append((x, y))
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"batch {b}", "labels": y.tolist(), "data": x}, f)
    x, y = _images(n_test, (3072,), 20)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "test", "labels": y.tolist(), "data": x}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f)
    tx = np.concatenate([t[0] for t in train])
    ty = np.concatenate([t[1] for t in train])
    return (tx, ty), (x, y), names


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as err:
        load("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "decompressed"])
def test_mnist_idx_files(tmp_path, gz):
    data = write_mnist(tmp_path, gz=gz)
    s = load("mnist", data_dir=tmp_path, valid_size=10)
    assert s.name == "mnist" and s.in_features == 784 and s.num_classes == 10
    assert len(s.class_names) == 10 and s.class_names[3].startswith("3")
    assert s.train_size == 50
    x_train, y_train = data["train"]
    x_test, y_test = data["t10k"]
    vx, vy = s.valid
    assert vx.shape == (10, 784) and vx.dtype == torch.float32 and vy.dtype == torch.int64
    # Validation is the last 10 of the training file, scaled to [0, 1].
    expected = torch.from_numpy(x_train[50:].reshape(10, 784).astype(np.float32) / 255)
    assert torch.allclose(vx, expected) and torch.equal(vy, torch.from_numpy(y_train[50:]).long())
    tx, ty = s.test
    assert tx.shape == (20, 784)
    assert torch.allclose(tx, torch.from_numpy(x_test.reshape(20, 784).astype(np.float32) / 255))
    assert torch.equal(ty, torch.from_numpy(y_test).long())
    # Training batches come from the first 50 only.
    xb, yb = next(s.train_batches(50, seed=0))
    train_rows = torch.from_numpy(x_train[:50].reshape(50, 784).astype(np.float32) / 255)
    assert xb.shape == (50, 784) and xb.min() >= 0 and xb.max() <= 1
    assert torch.equal(xb.sort(0).values, train_rows.sort(0).values), (
        "one epoch = each training example once"
    )
    match = (xb.unsqueeze(1) == train_rows.unsqueeze(0)).all(-1).float().argmax(1)
    assert torch.equal(yb, torch.from_numpy(y_train[:50]).long()[match])
    # test_size keeps the first examples of the official test set.
    s5 = load("mnist", data_dir=tmp_path, valid_size=10, test_size=5)
    assert torch.equal(s5.test[0], tx[:5])


def test_mnist_default_split_needs_enough_data(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(ValueError, match="valid_size"):
        load("mnist", data_dir=tmp_path)  # 10k validation examples out of 60
    with pytest.raises(ValueError, match="test_size"):
        load("mnist", data_dir=tmp_path, valid_size=10, test_size=21)


def test_mnist_missing_files_explain_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load("mnist", data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert "--download" in msg and str(tmp_path / "nowhere" / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg


def test_cifar10_pickled_batches(tmp_path):
    (train_x, train_y), (test_x, test_y), names = write_cifar10(tmp_path)
    s = load("cifar10", data_dir=tmp_path, valid_size=10)
    assert s.name == "cifar10" and s.in_features == 3072 and s.num_classes == 10
    assert s.class_names == names and s.train_size == 30
    # The pickle rows are channel-major (1024 R, 1024 G, 1024 B): flattening keeps that order.
    vx, vy = s.valid
    assert torch.allclose(vx, torch.from_numpy(train_x[30:].astype(np.float32) / 255))
    assert torch.equal(vy, torch.from_numpy(train_y[30:]).long())
    tx, ty = s.test
    assert torch.allclose(tx, torch.from_numpy(test_x.astype(np.float32) / 255))
    assert torch.equal(ty, torch.from_numpy(test_y).long())
    xb, _ = next(s.train_batches(30, seed=1))
    expected = torch.from_numpy(train_x[:30].astype(np.float32) / 255)
    assert torch.equal(xb.sort(0).values, expected.sort(0).values)


def test_cifar10_missing_files(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10", data_dir=tmp_path)
    assert "data_batch_3" in str(err.value) and "--download" in str(err.value)


class _RunsCode:
    """Unpickling this calls ``marker.touch()``: what a crafted batch file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batch_that_runs_code_is_refused(tmp_path, protocol):
    """A crafted data_batch_1 never runs: the load refuses it, naming the file and global."""
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    x, y = _images(8, (3072,), 11)
    payload = {"batch_label": "batch 1", "labels": y.tolist(), "data": x, "x": _RunsCode(marker)}
    batch.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(ValueError, match=r"data_batch_1 was refused: it names (pathlib|__bui)"):
        load("cifar10", data_dir=tmp_path, valid_size=10)
    assert not marker.exists(), "code from the batch file ran"


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_object_arrays_and_bad_shapes_are_refused(tmp_path, protocol):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    objects = np.array([1, "a"], dtype=object)
    batch.write_bytes(pickle.dumps({"labels": [1, 2], "data": objects}, protocol=protocol))
    with pytest.raises(ValueError, match="data_batch_2 was refused: array of dtype object"):
        load("cifar10", data_dir=tmp_path, valid_size=10)
    x, y = _images(8, (3071,), 12)
    batch.write_bytes(pickle.dumps({"labels": y.tolist(), "data": x}, protocol=protocol))
    with pytest.raises(ValueError, match="3071 values per image, not 3072"):
        load("cifar10", data_dir=tmp_path, valid_size=10)
    batch.write_bytes(b"")
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR-10 python batch"):
        load("cifar10", data_dir=tmp_path, valid_size=10)


def test_cifar10_python2_style_batches_load(tmp_path):
    """Batches with bytes keys and byte strings (protocol 2), as the official py2 pickles read."""
    (train_x, _), _, names = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for b in range(1, 6):
        x, y = train_x[8 * (b - 1) : 8 * b], list(range(8))
        d = {b"batch_label": b"training batch", b"labels": y, b"data": x, b"filenames": [b"a"]}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"label_names": [n.encode() for n in names], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    s = load("cifar10", data_dir=tmp_path, valid_size=10)
    assert s.class_names == names
    assert torch.equal(s.valid[1], torch.tensor([6, 7, 0, 1, 2, 3, 4, 5, 6, 7]))


def _write_image_folder(root: Path) -> dict[str, list[int]]:
    """Three classes of uniform-grey images of assorted sizes and modes."""
    levels = {"cat": [10, 20, 30, 40], "dog": [100, 110, 120, 130, 140], "emu": [200, 210, 220]}
    for cls, values in levels.items():
        (root / cls).mkdir(parents=True)
        for k, v in enumerate(values):
            size = (40 + 7 * k, 30 + 5 * k)
            if k % 2:
                Image.new("RGB", size, (v, v, v)).save(root / cls / f"{k}.png")
            else:
                Image.new("L", size, v).save(root / cls / f"{k}.jpg", quality=100)
    (root / "cat" / "notes.txt").write_text("not an image")
    return levels


def test_image_folder(tmp_path):
    levels = _write_image_folder(tmp_path)
    s = load("imagefolder", data_dir=tmp_path, valid_size=2, test_size=3, image_size=9, seed=4)
    assert s.class_names == ["cat", "dog", "emu"] and s.num_classes == 3
    assert s.in_features == 81 and s.train_size == 12 - 5
    xs = [s.valid[0], s.test[0], next(s.train_batches(s.train_size, seed=0))[0]]
    ys = [s.valid[1], s.test[1], next(s.train_batches(s.train_size, seed=0))[1]]
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (12, 81)
    # Every image once, each uniform at its grey level, with its class label.
    grey = (x.mean(1) * 255).round()
    assert (x.amax(1) - x.amin(1) < 2 / 255).all()
    got = sorted(zip(y.tolist(), grey.tolist(), strict=True))
    want = sorted((c, float(v)) for c, cls in enumerate(levels) for v in levels[cls])
    assert [g[0] for g in got] == [w[0] for w in want]
    assert np.allclose([g[1] for g in got], [w[1] for w in want], atol=1.5)
    # Same seed, same split; another seed, another split.
    again = load("imagefolder", data_dir=tmp_path, valid_size=2, test_size=3, image_size=9, seed=4)
    assert torch.equal(again.test[0], s.test[0]) and torch.equal(again.valid[1], s.valid[1])
    other = load("imagefolder", data_dir=tmp_path, valid_size=2, test_size=3, image_size=9, seed=5)
    assert not torch.equal(other.test[0], s.test[0])
    # Default sizes: 10% each, at least one.
    d = load("imagefolder", data_dir=tmp_path, image_size=5)
    assert len(d.valid[1]) == 1 and len(d.test[1]) == 1 and d.train_size == 10


def test_image_folder_resizes_content(tmp_path):
    """A left-dark / right-light image keeps its layout after crop and resize."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    img = np.zeros((60, 80), dtype=np.uint8)
    img[:, 40:] = 255
    for k in range(3):
        Image.fromarray(img).save(tmp_path / "a" / f"{k}.png")
        Image.fromarray(255 - img).save(tmp_path / "b" / f"{k}.png")
    s = load("imagefolder", data_dir=tmp_path, valid_size=1, test_size=1, image_size=8)
    x = torch.cat([s.valid[0], s.test[0]]).view(-1, 8, 8)
    y = torch.cat([s.valid[1], s.test[1]])
    for xi, yi in zip(x, y, strict=True):
        left, right = xi[:, :3].mean().item(), xi[:, 5:].mean().item()
        assert (left < 0.1 and right > 0.9) if yi == 0 else (left > 0.9 and right < 0.1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sub-folder"):
        load("imagefolder", data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="sub-folder"):
        load("imagefolder", data_dir=tmp_path / "empty")
    (tmp_path / "few" / "x").mkdir(parents=True)
    Image.new("L", (4, 4), 3).save(tmp_path / "few" / "x" / "0.png")
    with pytest.raises(ValueError, match="too few"):
        load("imagefolder", data_dir=tmp_path / "few")


def test_image_folder_skips_and_counts_unreadable_images(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "emu" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 14") as w:
        s = load("imagefolder", data_dir=tmp_path, valid_size=2, test_size=3, image_size=9)
    assert "broken.png" in str(w[0].message) or "empty.jpg" in str(w[0].message)
    assert s.num_classes == 3 and s.train_size == 12 - 5  # the 12 readable images


def test_image_folder_empty_class_folder_is_named(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "fox").mkdir()
    (tmp_path / "fox" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="class folder\\(s\\) fox in .* hold no images"):
        load("imagefolder", data_dir=tmp_path, valid_size=2, test_size=3)
    (tmp_path / "fox" / "0.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable image .* fox"):
        load("imagefolder", data_dir=tmp_path, valid_size=2, test_size=3)


def _stream(n: int = 50) -> ArrayStream:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1).repeat(1, 3)
    return ArrayStream(x, torch.arange(n))


def test_array_stream_epochs_and_resume():
    stream = _stream(50)
    it = stream.batches(7, seed=3)
    batches = [next(it) for _ in range(50)]  # 350 examples = 7 epochs, straddling
    ys = torch.cat([b[1] for b in batches])
    assert torch.equal(torch.bincount(ys, minlength=50), torch.full((50,), 7))
    for e in range(7):  # each epoch is a permutation
        assert torch.equal(ys[50 * e : 50 * (e + 1)].sort().values, torch.arange(50))
    assert not torch.equal(ys[:50], ys[50:100]), "epochs reshuffle"
    x0 = batches[0][0]
    assert x0.dtype == torch.float32 and torch.allclose(x0[:, 0] * 255, batches[0][1].float())
    for start in (1, 7, 13, 49):
        resumed = stream.batches(7, seed=3, start_step=start)
        for k in range(start, min(start + 5, 50)):
            xb, yb = next(resumed)
            assert torch.equal(yb, batches[k][1]) and torch.equal(xb, batches[k][0])
    other = torch.cat([next(stream.batches(50, seed=4))[1]])
    assert not torch.equal(other, ys[:50])


def test_array_stream_ranks_are_disjoint():
    stream = _stream(51)  # not divisible: one example per epoch is dropped
    per_rank = 51 // 3
    seen = []
    for rank in range(3):
        it = stream.batches(per_rank, seed=0, rank=rank, world_size=3)
        seen.append(next(it)[1])
    union = torch.cat(seen)
    assert len(union) == 3 * per_rank and len(union.unique()) == len(union)
    with pytest.raises(ValueError, match="rank"):
        stream.batches(4, seed=0, rank=3, world_size=3)
    with pytest.raises(ValueError, match="too small"):
        _stream(2).batches(1, seed=0, world_size=3)
