"""A plain training loop watched by ``fastmlp.Monitor``:
``python examples/monitor_tensorboard.py [LOG_DIR]``.

Every 10th step records the statistics of every layer and writes them to TensorBoard
(``tensorboard --logdir LOG_DIR``) and to ``LOG_DIR/stats.jsonl``; the steps in between run
without statistics. Random data, a small tanh MLP: it runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

import fastmlp
from fastmlp.writers import JSONL, TensorBoard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", nargs="?", default="runs/monitor")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writers = [TensorBoard(args.log_dir), JSONL(f"{args.log_dir}/stats.jsonl")]
    with fastmlp.Monitor(model, every=10, writers=writers) as monitor:  # instruments model
        for _ in range(args.steps):
            x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()  # records steps 0, 10, 20, ... and logs them
    act = monitor.last_snapshot["2"]["activation"]
    print(
        f"step {monitor.global_step}: layer 2 activation std {act.std:.3f}; "
        f"saturated {act.saturated:.1%}; logged to {args.log_dir}"
    )


if __name__ == "__main__":
    main()
