"""FSDP2 with fastmlp's statistics: ``torchrun --nproc-per-node 2 examples/fsdp2.py [--bf16]``.

Every dense layer is instrumented, then sharded with ``fully_shard`` (each layer, then the
root). Each rank trains on its own random batches; ``stats_of(model).snapshot()``, called on
every rank, merges the ranks' statistics, and rank 0 prints them. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn import functional as F

import fastmlp
from fastmlp import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true", help="compute in bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    info = distributed.setup()  # torchrun's environment: rank, world size, backend
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    ).to(info.device)
    fastmlp.instrument(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None)
    for layer in model:
        if isinstance(layer, fastmlp.InstrumentedLinear):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    g = torch.Generator(device=info.device).manual_seed(1 + info.rank)  # each rank's own data
    for _ in range(args.steps):
        x = torch.randn(16, 32, device=info.device, generator=g)
        y = torch.randint(0, 10, (16,), device=info.device, generator=g)
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    snap = fastmlp.stats_of(model).snapshot()  # every rank: merged over all of them
    if info.is_main:
        print(f"{info.world_size} ranks, {args.steps} steps, loss {loss.item():.3f}")
        print(f"{'layer':>5} {'quantity':<19} {'count':>8} {'mean':>10} {'std':>10}")
        for row in snap.rows():
            print(
                f"{row['layer']:>5} {row['quantity']:<19} {row['count']:>8} "
                f"{row['mean']:>10.3g} {row['std']:>10.3g}"
            )
    distributed.cleanup(wait=True)
    distributed.exit_rank(0)


if __name__ == "__main__":
    main()
