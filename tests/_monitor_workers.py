"""Process bodies for tests/test_monitor.py (importable by spawned children)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

IN, WIDTH, OUT, BATCH = 12, 16, 4, 8


def monitor_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of a 2-rank DDP run under Monitor(every=2) with a JSONL writer per rank
    (only rank 0's may be written); saves the layer-1 float64 preactivation of the recorded
    steps and whether the snapshots equal rank 0's."""
    import fastmlp
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
    distributed.setup(timeout=60)
    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(
        nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, OUT)
    )
    ddp = distributed.wrap_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = fastmlp.writers.JSONL(Path(out) / f"rank{rank}.jsonl")
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    snaps = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        monitor = fastmlp.Monitor(ddp, every=2, writers=[writer])
        for s in range(4):
            x = torch.randn(BATCH, IN, generator=g) * (1 + 3 * rank)
            y = torch.randint(0, OUT, (BATCH,), generator=g)
            if monitor.recorded(s):
                lin = model[0]
                z = x.double() @ lin.weight.detach().double().t() + lin.bias.detach().double()
                torch.save(z, Path(out) / f"z{rank}_{s}.pt")
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
            snap = monitor.step()
            if snap is not None:
                snaps[s] = snap.rows()
        monitor.close()
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, json.dumps(snaps))
    if rank == 0:
        same = {str(r): gathered[r] == gathered[0] for r in range(world_size)}
        (Path(out) / "same.json").write_text(json.dumps(same))
    distributed.cleanup(wait=True)  # a rank leaving while its peer still works can abort it
    distributed.exit_rank(0)  # the interpreter's teardown can abort a finished gloo rank
