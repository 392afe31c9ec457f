"""A Lightning run with fastmlp's ``StatsMonitor``:
``python examples/lightning_stats.py [LOG_DIR]``.

The callback instruments the module at setup and logs every layer's statistics every 10
optimizer steps through the trainer's loggers (here TensorBoard and CSV under LOG_DIR).
Random data, a small tanh MLP: it runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastmlp.integrations.lightning import StatsMonitor


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", nargs="?", default="runs/lightning")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(2048, 32), torch.randint(0, 10, (2048,)))
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=[TensorBoardLogger(args.log_dir, name="tb"), CSVLogger(args.log_dir, name="csv")],
        callbacks=[StatsMonitor(every=10)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=5,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(Classifier(), DataLoader(data, batch_size=64))
    print(f"logged to {args.log_dir}")


if __name__ == "__main__":
    main()
