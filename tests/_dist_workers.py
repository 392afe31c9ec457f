"""Process bodies for tests/test_distributed.py (importable by spawned children)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.nn import functional as F

IN_FEATURES, CLASSES, DEPTH, WIDTH = 12, 5, 2, 16
BATCH, STEPS, LR = 8, 4, 0.2


def global_batches(
    steps: int = STEPS, world_size: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic global batches ``(x [world*BATCH, IN], y)``; rank ``r`` takes rows
    ``r*BATCH:(r+1)*BATCH``. Ranks get differently scaled inputs so their first batches
    calibrate different shifts and histogram ranges."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        x = torch.randn(world_size * BATCH, IN_FEATURES, generator=g)
        scale = torch.tensor([1.0 + 3.0 * r for r in range(world_size)]).repeat_interleave(BATCH)
        x = x * scale[:, None] + 0.5
        y = torch.randint(0, CLASSES, (world_size * BATCH,), generator=g)
        out.append((x, y))
    return out


def make_model():  # noqa: ANN201 - fastmlp.MLP
    from fastmlp import MLP

    return MLP(IN_FEATURES, CLASSES, depth=DEPTH, width=WIDTH, activation="tanh", seed=0)


def ddp_train_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of a DDP run over :func:`global_batches`; saves its snapshots and parameters."""
    from fastmlp import distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    info = distributed.setup(timeout=60)
    assert info.backend == "gloo" and info.rank == rank and info.world_size == world_size
    model = make_model()
    ddp = distributed.wrap_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in global_batches(world_size=world_size):
        xb, yb = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]
        loss = F.cross_entropy(ddp(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    local = model.stats.snapshot(local=True).rows()
    merged = model.stats.snapshot().rows()
    # Moving everything into rank 0's buffers must not change the merged figures.
    distributed.consolidate_stats(model.stats)
    after_consolidate = model.stats.snapshot().rows()
    local_after = model.stats.snapshot(local=True).rows()
    torch.save(
        {
            "local": local,
            "merged": merged,
            "after_consolidate": after_consolidate,
            "local_after": local_after,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        },
        Path(out) / f"rank{rank}.pt",
    )
    distributed.cleanup(wait=True)  # a rank leaving while its peer still works can abort it
    distributed.exit_rank(0)  # as the trainer's ranks do (the interpreter's teardown can abort)


def hang_worker(out: str) -> None:
    """Write this process's pid, then keep doing collectives until killed."""
    import torch.distributed as dist

    rank = dist.get_rank()
    (Path(out) / f"pid{rank}").write_text(str(os.getpid()))
    t = torch.ones(4)
    while True:
        dist.all_reduce(t)
        time.sleep(0.05)


def failing_worker(out: str) -> None:
    """Rank 1 raises; rank 0 waits in a collective."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)


def main(argv: list[str]) -> None:
    """``python -m _dist_workers {hang|fail} OUT`` under torchrun: join the group, run."""
    from fastmlp import distributed

    what, out = argv
    target = {"hang": hang_worker, "fail": failing_worker}[what]
    distributed.setup(timeout=60)
    try:
        distributed.run_recorded(target, out)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
