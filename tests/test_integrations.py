"""The Lightning and Hugging Face Trainer callbacks, with the real trainers, reading back
what their loggers wrote (Lightning's CSVLogger metrics.csv and TensorBoardLogger events,
the HF Trainer's TensorBoard event files)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

IN, WIDTH, OUT, BATCH = 12, 16, 4, 8
TESTS = Path(__file__).resolve().parent


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _lightning_fit(
    tmp_path: Path,
    every: int,
    max_steps: int,
    ckpt_path: Path | None = None,
    save: Path | None = None,
):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from fastmlp.integrations.lightning import StatsMonitor

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                nn.Linear(WIDTH, OUT),
            )  # fmt: skip

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(BATCH * 40, IN, generator=g), torch.randint(0, OUT, (BATCH * 40,), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    val = torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, range(2 * BATCH)), batch_size=BATCH
    )
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    callback = StatsMonitor(every=every)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=[csv_logger, tb_logger],
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        val_check_interval=4,
        limit_val_batches=2,
    )
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, findings
        trainer.fit(model, loader, val, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return model, csv_logger, tb_logger, callback


def test_lightning_loggers_get_fastmlp_values_at_exactly_the_recorded_steps(tmp_path):
    model, csv_logger, tb_logger, _ = _lightning_fit(tmp_path, every=5, max_steps=13)
    assert model.net[0].__class__.__name__ == "InstrumentedLinear"  # instrumented at setup
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    name = "fastmlp/net.0/activation/mean"
    assert name in rows[0]
    with_stats = [r for r in rows if r.get(name)]
    assert [int(r["step"]) for r in with_stats] == [0, 5, 10]  # never repeated in between
    assert any(r.get("train_loss") for r in rows)  # Lightning's own logging goes on
    counts = {int(r["step"]): float(r["fastmlp/net.0/preactivation/count"]) for r in with_stats}
    assert counts == {0: BATCH * WIDTH, 5: BATCH * WIDTH, 10: BATCH * WIDTH}  # one step each
    acc = _events(tb_logger.log_dir)
    scal = acc.Scalars(name)
    assert [e.step for e in scal] == [0, 5, 10]
    csv_values = {int(r["step"]): float(r[name]) for r in with_stats}
    for e in scal:
        np.testing.assert_allclose(e.value, csv_values[e.step], rtol=1e-6)
    hist = acc.Histograms("fastmlp/net.2/activation")
    assert [e.step for e in hist] == [0, 5, 10]
    assert all(e.histogram_value.num == BATCH * WIDTH for e in hist)


def test_lightning_resume_keeps_the_cadence_and_the_findings(tmp_path):
    ckpt = tmp_path / "mid.ckpt"
    _, _, _, first = _lightning_fit(tmp_path / "a", every=5, max_steps=7, save=ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "StatsMonitor" in k]
    assert state["global_step"] == 7 and state["findings"] == [f.to_dict() for f in first.findings]
    assert state["findings"]  # a random tanh net: the diagnosis has something to say
    _, csv_logger, _, second = _lightning_fit(tmp_path / "b", every=5, max_steps=13, ckpt_path=ckpt)
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("fastmlp/net.0/activation/mean")]
    assert steps == [10]  # steps 7-12 run: 10 is recorded, 5 is not logged again
    # the findings warned of before the checkpoint come back first (not warned again)
    assert [f.to_dict() for f in second.findings][: len(state["findings"])] == state["findings"]


@pytest.mark.slow
def test_lightning_ddp_merges_the_ranks_and_logs_once(tmp_path):
    pytest.importorskip("lightning")
    proc = subprocess.run(
        [sys.executable, "-P", str(TESTS / "_lightning_workers.py"), str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics,) = tmp_path.rglob("metrics.csv")  # one logger wrote, rank 0's
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    counts = {
        int(r["step"]): float(r["fastmlp/net.0/preactivation/count"])
        for r in rows
        if r.get("fastmlp/net.0/preactivation/count")
    }
    assert counts == {0: 2 * BATCH * WIDTH, 3: 2 * BATCH * WIDTH, 6: 2 * BATCH * WIDTH}


def test_hf_trainer_tensorboard_gets_fastmlp_scalars(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fastmlp.integrations.transformers import StatsCallback

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (32, 16), generator=g)
    train = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=7,
        per_device_train_batch_size=4,
        report_to=["tensorboard"],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = StatsCallback(every=3)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, callbacks=[callback]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert hasattr(model.transformer.h[0].mlp.c_fc, "stats")  # instrumented at train begin
    event_dirs = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    assert len(event_dirs) == 1  # the Trainer's own TensorBoard run
    acc = _events(event_dirs.pop())
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags  # HF's own scalars, in the same event files
    name = "fastmlp/transformer.h.0.mlp.c_fc/activation/std"
    assert name in tags
    assert [e.step for e in acc.Scalars(name)] == [0, 3, 6]
    count = acc.Scalars("fastmlp/transformer.h.0.mlp.c_fc/activation/count")
    assert {e.value for e in count} == {4 * 16 * 128}  # one step: 4 x 16 tokens x 128 units
    assert "fastmlp/lm_head/preactivation" in acc.Tags()["histograms"]
    assert [e.step for e in acc.Histograms("fastmlp/lm_head/preactivation")] == [0, 3, 6]
