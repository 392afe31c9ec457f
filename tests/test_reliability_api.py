"""Issue 27, part B: the Python API and the data loaders say what was expected.

``MLP`` and ``diagnose`` arguments of the wrong kind, TorchScript of instrumented models,
``instrument()`` called twice or on a TorchScript module, corrupted MNIST files (written
here in the real IDX / gzip formats), decompression-bomb images and the image-folder
split of a small folder (real PNG files).
"""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fastmlp
from fastmlp.cli import main
from fastmlp.data import load

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------------------- MLP arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"in_features": np.zeros(3)}, TypeError, ["in_features", "int", "ndarray"]),
        ({"width": "16"}, TypeError, ["width", "'16'", "int"]),
        ({"width": [16, "a"]}, TypeError, ["width[1]", "'a'", "int"]),
        ({"width": [16, 0]}, ValueError, ["width[1]", ">= 1", "0"]),
        ({"width": 2.5}, TypeError, ["width", "2.5", "int"]),
        ({"depth": "3"}, TypeError, ["depth", "'3'", "int"]),
        ({"depth": -1}, ValueError, ["depth", ">= 0", "-1"]),
        ({"out_features": 0}, ValueError, ["out_features", ">= 1", "0"]),
        ({"bias": "no"}, TypeError, ["bias", "'no'", "True or False"]),
        ({"seed": "1"}, TypeError, ["seed", "'1'", "int"]),
        ({"dtype": torch.int32}, TypeError, ["dtype", "torch.int32", "float"]),
        ({"dtype": "float32"}, TypeError, ["dtype", "'float32'", "torch.float32"]),
    ],
)
def test_mlp_arguments_name_the_value_and_what_was_expected(kwargs, error, words) -> None:
    args = {"in_features": 6, "out_features": 3, "depth": 2, "width": 8, **kwargs}
    with pytest.raises(error) as err:
        fastmlp.MLP(**args)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_mlp_takes_integer_likes_as_the_ints_they_are() -> None:
    """NumPy integers and tuples of widths build the same network as plain ints."""
    x = torch.randn(5, 6)
    want = fastmlp.MLP(6, 3, depth=2, width=8, seed=3)
    for width in (np.int64(8), (8, 8), [np.int32(8), 8], iter([8, 8])):
        got = fastmlp.MLP(np.int64(6), 3, depth=np.int8(2), width=width, seed=np.int64(3))
        assert got.widths == [8, 8] and all(type(w) is int for w in got.widths)
        torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [np.zeros((2, 6), dtype=np.float32), [[0.0] * 6], None])
def test_mlp_input_must_be_a_tensor(bad) -> None:
    model = fastmlp.MLP(6, 3, depth=1, width=4)
    with pytest.raises(TypeError, match=r"MLP input must be a torch\.Tensor \[n, 6\]") as err:
        model(bad)
    if isinstance(bad, np.ndarray):
        assert "torch.from_numpy" in str(err.value)


# ----------------------------------------------------------------------------- diagnose


def test_diagnose_says_a_snapshot_was_expected() -> None:
    model = fastmlp.MLP(6, 3, depth=1, width=4)
    cases = [(None, "Snapshot.from_rows"), (model, "model.stats.snapshot()"),
             (model.stats, ".snapshot()"), ([{"layer": 1}], "Snapshot.from_rows")]  # fmt: skip
    for bad, hint in cases:
        with pytest.raises(TypeError, match="diagnose expects a fastmlp.Snapshot") as err:
            fastmlp.diagnose(bad)
        assert hint in str(err.value)
    # The advice given works: the model's snapshot is diagnosed.
    model(torch.randn(8, 6)).sum().backward()
    assert isinstance(fastmlp.diagnose(model.stats.snapshot()), list)


# ----------------------------------------------------------------------------- TorchScript


def _instrumented_sequential() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return fastmlp.instrument(model)


def _mlp() -> fastmlp.MLP:
    return fastmlp.MLP(6, 3, depth=2, width=8)


@pytest.mark.parametrize("make", [_mlp, _instrumented_sequential], ids=["MLP", "instrumented"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_naming_the_alternatives(make, how) -> None:
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (TorchScript's deprecation)
        with pytest.raises(RuntimeError) as err:
            if how == "script":
                torch.jit.script(model)
            else:
                torch.jit.trace(model, torch.randn(4, 6))
    text = str(err.value)
    for word in ("TorchScript", f"torch.jit.{how}", "torch.compile", "torch.export"):
        assert word in text, (word, text)


def test_the_tracing_check_costs_torch_compile_no_graph_break() -> None:
    """What TorchScript is refused in favour of still works: one graph, the eager values."""
    for model in (fastmlp.MLP(6, 3, depth=2, width=8, seed=0), _instrumented_sequential()):
        x = torch.randn(5, 6)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), model(x))


# ----------------------------------------------------------------------------- instrument()


def test_instrument_twice_keeps_the_report_and_the_layers() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    fastmlp.instrument(model, bins=32)
    first = str(model.fastmlp_report)
    layers = list(model)
    assert model.fastmlp_report.instrumented == ["0", "2"]
    assert fastmlp.instrument(model) is model
    assert str(model.fastmlp_report) == first and model.fastmlp_report.instrumented == ["0", "2"]
    assert list(model) == layers  # the same modules: nothing wrapped twice
    # Statistics are still recorded once a pass, exactly.
    x = torch.randn(4, 6)
    model(x)
    snap = fastmlp.stats_of(model).snapshot()
    assert [snap[i]["preactivation"].count for i in (1, 2)] == [4 * 8, 4 * 3]
    z = x.double() @ model[0].weight.double().T + model[0].bias.double()
    assert snap[1]["preactivation"].mean == pytest.approx(z.mean().item(), rel=1e-6, abs=1e-9)
    # A layer added since is instrumented and numbered after the others.
    model.append(nn.Linear(3, 2))
    fastmlp.instrument(model, bins=32)  # (the value the others have: accepted)
    r = model.fastmlp_report
    assert r.instrumented == ["0", "2", "3"] and str(r).startswith(first)
    assert [m.layer_index for m in model if isinstance(m, fastmlp.InstrumentedDense)] == [1, 2, 3]
    # An option that would change the instrumented layers is refused, naming it.
    with pytest.raises(ValueError, match=r"layer 0 is already instrumented with bins=32, not 16"):
        fastmlp.instrument(model, bins=16)


def test_instrument_lists_layers_instrumented_without_it() -> None:
    mlp = fastmlp.MLP(6, 3, depth=1, width=4)
    r = fastmlp.instrument(mlp).fastmlp_report
    assert r.already == [("layers.0", "tanh"), ("layers.1", "identity")]
    assert r.instrumented == ["layers.0", "layers.1"] and "nothing" not in str(r)
    lone = fastmlp.instrument(nn.Linear(3, 3))
    assert fastmlp.instrument(lone) is lone and lone.fastmlp_report.lone == [("", "a lone Linear")]


def test_instrument_refuses_torchscript() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Linear(6, 8), nn.Tanh()))
        traced = torch.jit.trace(nn.Sequential(nn.Linear(6, 8)), torch.randn(2, 6))
    for m in (scripted, traced):
        with pytest.raises(TypeError, match="TorchScript.*Instrument the eager model"):
            fastmlp.instrument(m)
    # A scripted part of an eager model is reported (and warned about), not skipped silently.
    model = nn.Sequential(nn.Linear(6, 6), scripted)
    with pytest.warns(UserWarning, match="1: a TorchScript module holding dense layers"):
        fastmlp.instrument(model)
    assert model.fastmlp_report.instrumented == ["0"]
    assert [p for p, _ in model.fastmlp_report.untouched] == ["1"]


# ----------------------------------------------------------------------------- MNIST files


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(raw: Path, seed: int, n_train: int = 30, n_test: int = 10) -> dict[str, bytes]:
    """The four MNIST IDX files (random pixels and labels), decompressed, in ``raw``."""
    rng = np.random.default_rng(seed)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte"] = _idx(rng.integers(0, 256, (n, 28, 28), np.uint8))
        files[f"{prefix}-labels-idx1-ubyte"] = _idx(rng.integers(0, 10, n).astype(np.uint8))
    raw.mkdir(parents=True)
    for name, data in files.items():
        (raw / name).write_bytes(data)
    return files


def _labels(values: list[int]) -> bytes:
    return _idx(np.array(values, dtype=np.uint8))


# (file to damage, its new content from the good files, words the error must hold)
_DAMAGE = {
    "empty": ("train-images-idx3-ubyte", lambda f: b"", ["magic number 0x00000803", "empty"]),
    "swapped": ("t10k-labels-idx1-ubyte", lambda f: f["t10k-images-idx3-ubyte"],
                ["magic number 0x00000801", "0x00000803"]),
    "text": ("train-labels-idx1-ubyte", lambda f: b"not an idx file\n", ["magic number"]),
    "truncated": ("train-images-idx3-ubyte", lambda f: f["train-images-idx3-ubyte"][:-100],
                  ["30x28x28", "23520 bytes", "23420"]),
    "short header": ("t10k-images-idx3-ubyte", lambda f: f["t10k-images-idx3-ubyte"][:10],
                     ["truncated", "3 dimension"]),
    "label 200": ("train-labels-idx1-ubyte", lambda f: _labels([3] * 29 + [200]),
                  ["label 200", "index 29", "0 to 9"]),
    "fewer labels": ("train-labels-idx1-ubyte", lambda f: _labels([1] * 20),
                     ["30 images", "20 labels", "train-images-idx3-ubyte"]),
    "more labels": ("t10k-labels-idx1-ubyte", lambda f: _labels([1] * 11),
                    ["10 images", "11 labels", "t10k-images-idx3-ubyte"]),
    "other size": ("t10k-images-idx3-ubyte", lambda f: _idx(np.zeros((10, 27, 27), np.uint8)),
                   ["28x28", "27x27", "train-images-idx3-ubyte"]),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_corrupted_mnist_files_are_named_with_what_was_expected(tmp_path, damage) -> None:
    raw = tmp_path / "MNIST" / "raw"
    files = _write_mnist(raw, seed=len(damage))
    name, content, words = _DAMAGE[damage]
    (raw / name).write_bytes(content(files))
    with pytest.raises(ValueError) as err:
        load("mnist", data_dir=tmp_path, valid_size=5)
    text = str(err.value)
    assert str(raw / name) in text, text
    for word in words:
        assert word in text, (word, text)


@pytest.mark.parametrize("gz", ["not gzip", "truncated gzip"])
def test_a_bad_gzip_file_is_named(tmp_path, gz) -> None:
    raw = tmp_path / "MNIST" / "raw"
    files = _write_mnist(raw, seed=1)
    name = "train-labels-idx1-ubyte"
    (raw / name).unlink()
    packed = gzip.compress(files[name])
    (raw / f"{name}.gz").write_bytes(b"plain bytes" if gz == "not gzip" else packed[:-12])
    with pytest.raises(ValueError, match="is not a valid gzip file") as err:
        load("mnist", data_dir=tmp_path, valid_size=5)
    assert str(raw / f"{name}.gz") in str(err.value)
    assert not (raw / name).exists()  # nothing half-written left behind


def test_good_mnist_files_load_exactly(tmp_path) -> None:
    """The checked reader gives the files' own pixels and labels."""
    raw = tmp_path / "MNIST" / "raw"
    files = _write_mnist(raw, seed=7)
    s = load("mnist", data_dir=tmp_path, valid_size=5)
    x = {p: np.frombuffer(files[f"{p}-images-idx3-ubyte"], np.uint8, offset=16) for p in
         ("train", "t10k")}  # fmt: skip
    y = {p: np.frombuffer(files[f"{p}-labels-idx1-ubyte"], np.uint8, offset=8).astype(np.int64)
         for p in ("train", "t10k")}  # fmt: skip
    x = {p: torch.from_numpy(v.reshape(-1, 784).astype(np.float32) / 255) for p, v in x.items()}
    assert torch.equal(s.valid[0], x["train"][25:]) and torch.equal(s.test[0], x["t10k"])
    assert (
        s.valid[1].tolist() == y["train"][25:].tolist() and s.test[1].tolist() == y["t10k"].tolist()
    )
    # One epoch of training batches holds the first 25 examples, each once.
    train_x, train_y = next(s.train_batches(25, seed=0))

    def rows(xs: torch.Tensor, ys: list[int]) -> list:
        return sorted(zip(ys, (xs * 255).round().to(torch.uint8).tolist(), strict=True))

    assert rows(train_x, train_y.tolist()) == rows(x["train"][:25], y["train"][:25].tolist())


# ----------------------------------------------------------------------------- image folders


def _write_folder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (20, 24), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{k}.png")


def test_decompression_bombs_are_skipped_like_other_bad_images(tmp_path, monkeypatch) -> None:
    """Over PIL's limit (warning) and over twice it (error): both skipped, both named."""
    _write_folder(tmp_path)  # 20x24 = 480 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 40), 9).save(tmp_path / "a" / "big.png")  # 1600 > 1000
    Image.new("L", (60, 60), 9).save(tmp_path / "b" / "bomb.png")  # 3600 > 2 x 1000
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image\(s\) of 15") as caught:
        s = load("imagefolder", data_dir=tmp_path, valid_size=2, test_size=2, image_size=6)
    text = " ".join(str(w.message) for w in caught)
    for path in ("a/big.png", "b/bomb.png", "b/broken.png"):
        assert str(tmp_path / path) in text, (path, text)
    assert s.train_size == 12 - 4 and s.num_classes == 2


def test_image_folder_default_split_fits_a_small_folder(tmp_path) -> None:
    """Sizes too large for the folder (``fastmlp train``'s defaults, sized for Shapeset)
    fall back to the documented 10% split, with a warning naming them."""
    _write_folder(tmp_path, per_class=10)
    with pytest.warns(UserWarning, match="valid_size=2000 plus test_size=2000.*10% split"):
        s = load("imagefolder", data_dir=tmp_path, valid_size=2000, test_size=2000, image_size=6)
    default = load("imagefolder", data_dir=tmp_path, image_size=6)
    assert (len(s.valid[1]), len(s.test[1]), s.train_size) == (2, 2, 16)
    assert torch.equal(s.valid[0], default.valid[0]) and torch.equal(s.test[1], default.test[1])
    # Sizes that fit are taken as given.
    exact = load("imagefolder", data_dir=tmp_path, valid_size=5, test_size=4, image_size=6)
    assert (len(exact.valid[1]), len(exact.test[1]), exact.train_size) == (5, 4, 11)


def test_fastmlp_train_on_a_small_image_folder_with_the_default_sizes(tmp_path, capsys) -> None:
    _write_folder(tmp_path / "data", per_class=10)
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
            "--image-size", "6", "--depth", "1", "--width", "4", "--steps", "2",
            "--eval-every", "2", "--probe-every", "2", "--jacobian-every", "-1",
            "--no-progress", "--no-tensorboard", "--no-figures",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "10% split" in capsys.readouterr().err


def test_instrument_survives_source_it_cannot_tokenize(tmp_path):
    """A model class compiled under a file name whose file holds other lines (exec'd code,
    an edited file, a notebook cell's name reused): inspect returns lines that do not
    tokenize. instrument() leaves the pair unfused, saying why, instead of raising
    tokenize.TokenError."""
    src = (
        "class Block(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 4)\n"
        "        self.act = nn.Tanh()\n"
        "    def forward(self, x):\n"
        "        return self.act(self.fc(x))\n"
    )
    other = tmp_path / "other.py"
    other.write_text("x = (\n" * 20)
    scope: dict = {"nn": torch.nn}
    exec(compile(src, str(other), "exec"), scope)  # noqa: S102 - the test's own code
    model = fastmlp.instrument(scope["Block"]())
    assert [p for p, _ in model.fastmlp_report.lone] == ["fc"]
    x = torch.randn(3, 4)
    assert model(x).shape == (3, 4)
