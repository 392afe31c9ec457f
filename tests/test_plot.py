"""``fastmlp plot`` draws every figure of a run; the PNGs open and are not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmlp.cli import main
from fastmlp.plot import FIGURES, plot_test_error
from fastmlp.train import TrainConfig, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("plot")
        out = []
        for init in ("standard", "normalized"):
            cfg = TrainConfig(
                depth=3, width=20, init=init, steps=20, eval_every=10, probe_every=10,
                probe_size=60, valid_size=100, test_size=100, jacobian_every=10,
                jacobian_examples=2, progress=False, tensorboard=False, figures=False,
                out=str(root / init),
            )  # fmt: skip
            out.append(train(cfg))
        return out
    finally:
        torch.set_num_threads(saved)


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 400 and h >= 300, im.size
        px = np.asarray(im.convert("RGB"), dtype=np.float64)
    colors = np.unique(px.reshape(-1, 3), axis=0)
    assert len(colors) > 20, f"{path.name} looks blank ({len(colors)} colours)"
    # ink: a fair share of pixels is not background white
    assert (px.sum(axis=2) < 600).mean() > 0.01, f"{path.name} has almost no ink"


def test_cli_plot_draws_every_figure(runs: list[Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", *map(str, runs)]) == 0
    printed = capsys.readouterr().out.split()
    for run in runs:
        for name in FIGURES:
            path = run / "figures" / name
            assert str(path) in printed
            _check_png(path)
    overlay = runs[0] / "figures" / "fig11_test_error_all.png"
    _check_png(overlay)


def test_overlaid_test_error(runs: list[Path], tmp_path: Path) -> None:
    path = plot_test_error(runs, tmp_path / "sub" / "fig11.png")
    _check_png(path)


def test_plot_rejects_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path)])
    assert e.value.code == 2
    assert "is not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "missing")])
    assert "not a directory" in capsys.readouterr().err


def test_plot_out_that_cannot_be_created_is_one_plain_line(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker / "figs", Path("/proc/no/such/dir")):  # not a directory, missing
        try:
            status = main(["plot", str(runs[0]), "--out", str(out)])
        except SystemExit as e:  # argparse's error()
            status = e.code
        last = capsys.readouterr().err.splitlines()[-1]  # (after argparse's usage line)
        assert status == 2 and last.startswith("fastmlp plot: error: ") and "[Errno" not in last
        assert str(out).startswith(last.rsplit(": ", 1)[1])  # names the path it could not use
