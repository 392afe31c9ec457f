"""Process bodies for tests/test_large_models.py (importable by spawned children).

:func:`main` (the test's subprocess) computes the single-process references, then spawns 2
gloo ranks that run every distributed case in turn (FSDP2 in fp32 and bf16, with and
without resharding after the forward, then DDP with ``no_sync``) in one process group, so
the file pays for starting processes and joining a group once. The references, and each
case's results per rank (or its traceback), are saved for the test to compare.

Every process runs with oneDNN off and one thread: the PyTorch path would otherwise pick
oneDNN or addmm per matmul shape by timing both, once per process, so two processes could
round differently. The references run in that fresh process rather than in the test
process, whose state (oneDNN switched off and on, kernels warmed) would shift such timing
races in tests that run after it.
"""

from __future__ import annotations

import copy
import os
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

IN_FEATURES, WIDTH, CLASSES = 8, 16, 4
BATCH, STEPS, LR = 6, 2, 0.1
WORLD = 2
MICRO = 2  # DDP: micro-batches per rank and step (the first under no_sync)
# (param dtype, reshard_after_forward) of each FSDP2 case
FSDP_CASES = [
    ("float32", True),
    ("float32", False),
    ("bfloat16", True),
    ("bfloat16", False),
]


def make_plain(seed: int) -> nn.Sequential:
    """The plain model every process and every reference starts from (same init for a seed),
    built without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(IN_FEATURES, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, WIDTH),
            nn.Tanh(),
            nn.Linear(WIDTH, CLASSES),
        )


def batches(
    seed: int, steps: int = STEPS, micro: int = 1
) -> list[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """``out[step][rank][i] = (x [BATCH, IN], y [BATCH])``: fresh random data for ``seed``.
    Rank ``r``'s inputs are scaled by ``1 + 2 r`` and shifted, so the ranks calibrate
    different shifts and histogram ranges and the later ones widen the reference's."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(steps):
        per_rank = []
        for r in range(WORLD):
            mbs = []
            for _ in range(micro):
                x = torch.randn(BATCH, IN_FEATURES, generator=g) * (1.0 + 2.0 * r) + 0.3 * r
                y = torch.randint(0, CLASSES, (BATCH,), generator=g)
                mbs.append((x, y))
            per_rank.append(mbs)
        out.append(per_rank)
    return out


def _full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full (unsharded) float tensor; a collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.named_parameters()
    }


def fsdp_case(rank: int, seed: int, dtype: str, reshard: bool) -> dict:
    """FSDP2 (``fully_shard`` on every instrumented layer, then the root) over
    :func:`batches`: each rank's local mean loss, SGD. Returns the merged and local rows,
    the full parameters before every step and at the end, and how the model was sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    import fastmlp

    model = fastmlp.instrument(make_plain(seed), backend="torch")
    bf16 = dtype == "bfloat16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    layers = [m for m in model if isinstance(m, fastmlp.InstrumentedLinear)]
    for layer in layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
    weight = layers[0].weight
    sharding = {
        "dtensor": isinstance(weight, DTensor),
        "local_shape": tuple(weight.to_local().shape) if isinstance(weight, DTensor) else None,
    }
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params, out_dtypes = [], []
    for per_rank in batches(seed):
        params.append(_full_params(model))
        x, y = per_rank[rank][0]
        out = model(x)
        out_dtypes.append(str(out.dtype))
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    params.append(_full_params(model))
    stats = fastmlp.stats_of(model)
    return {
        "merged": stats.snapshot().rows(),
        "local": stats.snapshot(local=True).rows(),
        "params": params,
        "out_dtypes": out_dtypes,
        "sharding": sharding,
    }


def ddp_case(rank: int, seed: int) -> dict:
    """An ``instrument()``ed nn.Sequential under ``fastmlp.distributed.wrap_model`` (DDP with
    the statistics buffers kept rank-local), :data:`MICRO` micro-batches a step, the first
    under ``no_sync()``, loss divided by the micro-batch count, SGD."""
    import fastmlp
    from fastmlp import distributed

    model = fastmlp.instrument(make_plain(seed), backend="torch")
    ddp = distributed.wrap_model(model)
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first_grads = None
    for step, per_rank in enumerate(batches(seed, micro=MICRO)):
        for i, (x, y) in enumerate(per_rank[rank]):
            with ddp.no_sync() if i < MICRO - 1 else nullcontext():
                (F.cross_entropy(ddp(x), y) / MICRO).backward()
            if step == 0 and i == 0:  # after the no_sync micro-batch: this rank's own
                first_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    stats = fastmlp.stats_of(model)
    return {
        "merged": stats.snapshot().rows(),
        "local": stats.snapshot(local=True).rows(),
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "first_grads": first_grads,
    }


def fsdp_reference(seed: int, dtype: str) -> dict:
    """One process, the same model and init, running each step's rank batches as accumulated
    micro-batches with each rank's loss (its local mean cross-entropy), gradients then
    averaged over the ranks (what FSDP2's reduce-scatter computes), SGD. In bf16 (FSDP2's
    ``param_dtype=bfloat16``), a bf16 copy computes (parameters cast from the fp32 ones every
    step, inputs cast to bf16 as FSDP2's root does, bf16 gradients of the micro-batches
    summed in bf16) and the fp32 master parameters take the step. Returns the rows and the
    full parameters before every step and at the end."""
    import fastmlp

    model = make_plain(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    bf16 = dtype == "bfloat16"
    compute = fastmlp.instrument(
        copy.deepcopy(model).to(torch.bfloat16) if bf16 else model, backend="torch"
    )
    params = []
    for per_rank in batches(seed):
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
        if bf16:
            with torch.no_grad():
                for pc, pm in zip(compute.parameters(), model.parameters(), strict=True):
                    pc.copy_(pm)
        for mbs in per_rank:
            x, y = mbs[0]
            out = compute(x.to(torch.bfloat16) if bf16 else x)
            F.cross_entropy(out.float(), y).backward()
        for pm, pc in zip(model.parameters(), compute.parameters(), strict=True):
            pm.grad = pc.grad.float() / WORLD
        opt.step()
        opt.zero_grad(set_to_none=True)
        compute.zero_grad(set_to_none=True)
    params.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return {"rows": fastmlp.stats_of(compute).snapshot().rows(), "params": params}


def ddp_reference(seed: int) -> dict:
    """One process running the DDP case's 2 ranks x :data:`MICRO` micro-batches a step with
    the same per-micro-batch loss: each rank's micro-batch gradients accumulated, then the
    ranks' summed halves (DDP halves each rank's before its all-reduce sums them: the same
    grouping of the additions), SGD. Returns the rows, the final parameters, and each
    rank's gradient of its first micro-batch alone (a plain model's)."""
    import fastmlp

    model = fastmlp.instrument(make_plain(seed), backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = batches(seed, micro=MICRO)
    first_grads = []
    for rank in range(WORLD):
        plain = make_plain(seed)
        x, y = data[0][rank][0]
        (F.cross_entropy(plain(x), y) / MICRO).backward()
        first_grads.append({k: p.grad for k, p in plain.named_parameters()})
    for per_rank in data:
        rank_grads = []
        for mbs in per_rank:
            for x, y in mbs:
                (F.cross_entropy(model(x), y) / MICRO).backward()
            rank_grads.append([p.grad for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        for p, *grads in zip(model.parameters(), *rank_grads, strict=True):
            p.grad = sum(g / WORLD for g in grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "rows": fastmlp.stats_of(model).snapshot().rows(),
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "first_grads": first_grads,
    }


def _one_thread_no_onednn() -> None:
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


def main(out: str, port: int, seed: int) -> None:
    """The test's subprocess: the references (``reference.pt``), then the 2 ranks."""
    import torch.multiprocessing as mp

    _one_thread_no_onednn()
    refs = {f"fsdp-{d}": fsdp_reference(seed, d) for d in sorted({d for d, _ in FSDP_CASES})}
    refs["ddp"] = ddp_reference(seed)
    torch.save(refs, Path(out) / "reference.pt")
    mp.spawn(worker, args=(WORLD, port, out, seed), nprocs=WORLD)


def worker(rank: int, world_size: int, port: int, out: str, seed: int) -> None:
    """One rank: every case in turn; saves ``rank{rank}.pt`` (a case that raised is saved as
    ``{"error": traceback}``)."""
    from fastmlp import distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    _one_thread_no_onednn()
    info = distributed.setup(timeout=45)
    assert info.backend == "gloo" and info.world_size == world_size == WORLD
    results: dict = {}
    cases = [(f"fsdp-{d}-{r}", fsdp_case, (rank, seed, d, r)) for d, r in FSDP_CASES]
    cases.append(("ddp", ddp_case, (rank, seed)))
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:  # noqa: BLE001 - recorded for the test to report
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.cleanup(wait=True)
    distributed.exit_rank(0)
