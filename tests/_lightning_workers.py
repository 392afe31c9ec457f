"""A Lightning DDP run for tests/test_integrations.py (run in a subprocess: ``ddp_spawn``
pickles the module, so its class lives in an importable module)."""

from __future__ import annotations

import sys
import warnings

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

IN, WIDTH, OUT, BATCH = 12, 16, 4, 8


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def ddp_fit(out: str) -> None:
    """2 CPU processes under Lightning's DDP strategy, ``StatsMonitor(every=3)``, 7 steps."""
    from fastmlp.integrations.lightning import StatsMonitor

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32 * BATCH, IN), torch.randint(0, OUT, (32 * BATCH,)))
    trainer = L.Trainer(
        max_steps=7,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=CSVLogger(out, name="csv"),
        callbacks=[StatsMonitor(every=3)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), DataLoader(data, batch_size=BATCH))


if __name__ == "__main__":
    ddp_fit(sys.argv[1])
