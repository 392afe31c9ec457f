"""Process bodies for tests/test_large_models.py (importable by spawned children).

:func:`main` (the test's subprocess) computes the single-process references, then spawns 2
gloo ranks that run every distributed case in turn (FSDP2 in fp32 and bf16, with and
without resharding after the forward, DDP with ``no_sync``, then tensor parallelism) in one
process group, so the file pays for starting processes and joining a group once. The
references, and each case's results per rank (or its traceback), are saved for the test to
compare.

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


# ----------------------------------------------------------------------------- tensor parallel

SEQ = 4  # tokens per example in the sequence-parallel case (split over the ranks)
TP_CASES = ("tp", "tp-sp")


def tp_data(seed: int, case: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's whole batch (every tensor-parallel rank gets the same one; the
    sequence-parallel case splits its tokens): float64 ``x`` (``[BATCH, IN]``, or
    ``[BATCH, SEQ, IN]``) and class labels."""
    g = torch.Generator().manual_seed(seed + 2)
    shape = (BATCH, IN_FEATURES) if case == "tp" else (BATCH, SEQ, IN_FEATURES)
    return [
        (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + 0.2,
         torch.randint(0, CLASSES, (BATCH,), generator=g))
        for _ in range(STEPS)
    ]  # fmt: skip


def _tp_loss(out: torch.Tensor, y: torch.Tensor, case: str) -> torch.Tensor:
    # tp: cross-entropy of the replicated logits; tp-sp: half the sum of squares of this
    # rank's tokens' outputs (the ranks' losses sum to the whole batch's)
    return F.cross_entropy(out, y) if case == "tp" else 0.5 * (out * out).sum()


def _tp_model(seed: int) -> nn.Module:
    import fastmlp

    model = fastmlp.instrument(make_plain(seed).double(), backend="torch", per_unit=True)
    return model


def tp_case(rank: int, seed: int, case: str) -> dict:
    """Tensor parallelism with ``parallelize_module`` on the 2 ranks' 1-D mesh: layer 0
    column-sharded, layer 2 row-sharded (its tanh after the reduction), layer 4
    column-sharded with its output gathered. ``tp``: 2-D inputs, replicated; ``tp-sp``:
    ``[batch, tokens, features]`` inputs sharded by tokens (sequence parallel: the first
    layer gathers them, the row-sharded layer reduce-scatters to tokens, the last layer
    gathers them again and returns its tokens). SGD on the loss of :func:`_tp_loss`.
    Returns the merged and local rows, each step's output and input gradient (this rank's
    tokens), the full parameters at the end and what the weights became."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import fastmlp

    model = _tp_model(seed)
    mesh = init_device_mesh("cpu", (WORLD,))
    if case == "tp":
        plan = {
            "0": ColwiseParallel(),
            "2": RowwiseParallel(),
            "4": ColwiseParallel(output_layouts=Replicate()),
        }
    else:
        plan = {
            "0": ColwiseParallel(input_layouts=Shard(1)),
            "2": RowwiseParallel(output_layouts=Shard(1)),
            "4": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1)),
        }
    parallelize_module(model, mesh, plan)
    placements = {k: str(v.placements) for k, v in model.named_parameters()}
    # The other order: parallelized first, then instrument(): refused layer by layer.
    late = make_plain(seed).double()
    parallelize_module(late, mesh, plan)
    late_report = str(fastmlp.instrument(late, backend="torch").fastmlp_report)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    outs, dxs = [], []
    for x, y in tp_data(seed, case):
        if case == "tp-sp":
            x = x.chunk(WORLD, dim=1)[rank]
        x = x.clone().requires_grad_()
        out = model(x)
        _tp_loss(out, y, case).backward()
        outs.append(out.detach().clone())
        dxs.append(x.grad.clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
    stats = fastmlp.stats_of(model)
    params = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.named_parameters()
    }
    return {
        "merged": stats.snapshot().rows(),
        "local": stats.snapshot(local=True).rows(),
        "outs": outs,
        "dxs": dxs,
        "params": params,
        "placements": placements,
        "late_report": late_report,
    }


def tp_reference(seed: int, case: str) -> dict:
    """The same model, unsharded, in one process on each step's whole batch."""
    import fastmlp

    model = _tp_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    outs, dxs = [], []
    for x, y in tp_data(seed, case):
        x = x.clone().requires_grad_()
        out = model(x)
        _tp_loss(out, y, case).backward()
        outs.append(out.detach().clone())
        dxs.append(x.grad.clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "rows": fastmlp.stats_of(model).snapshot().rows(),
        "outs": outs,
        "dxs": dxs,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
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
    refs.update({case: tp_reference(seed, case) for case in TP_CASES})
    torch.save(refs, Path(out) / "reference.pt")
    mp.spawn(worker, args=(WORLD, port, out, seed), nprocs=WORLD)


def _join(rank: int, world_size: int, port: int):  # noqa: ANN202 - fastmlp's DistInfo
    """This spawned process joins the gloo group as ``rank`` (one thread, oneDNN off)."""
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
    return distributed.setup(timeout=45)


def worker(rank: int, world_size: int, port: int, out: str, seed: int) -> None:
    """One rank: every case in turn; saves ``rank{rank}.pt`` (a case that raised is saved as
    ``{"error": traceback}``)."""
    from fastmlp import distributed

    info = _join(rank, world_size, port)
    assert info.backend == "gloo" and info.world_size == world_size == WORLD
    results: dict = {}
    cases = [(f"fsdp-{d}-{r}", fsdp_case, (rank, seed, d, r)) for d, r in FSDP_CASES]
    cases.append(("ddp", ddp_case, (rank, seed)))
    cases += [(case, tp_case, (rank, seed, case)) for case in TP_CASES]
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:  # noqa: BLE001 - recorded for the test to report
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.cleanup(wait=True)
    distributed.exit_rank(0)


# ----------------------------------------------------------------------------- 2-D mesh

MESH_2D = (2, 2)  # (data parallel, tensor parallel): 4 ranks


def mesh2d_main(out: str, port: int, seed: int) -> None:
    """The 2-D mesh test's subprocess: the single-process reference (``reference.pt``), then
    4 gloo ranks running :func:`mesh2d_case`."""
    import torch.multiprocessing as mp

    _one_thread_no_onednn()
    torch.save(mesh2d_reference(seed), Path(out) / "reference.pt")
    world = MESH_2D[0] * MESH_2D[1]
    mp.spawn(mesh2d_worker, args=(world, port, out, seed), nprocs=world)


def mesh2d_data(seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``out[step][dp]``: each data-parallel group's float64 batch of a step."""
    g = torch.Generator().manual_seed(seed + 3)
    return [
        [(torch.randn(BATCH, IN_FEATURES, generator=g, dtype=torch.float64) * (1 + d),
          torch.randint(0, CLASSES, (BATCH,), generator=g))
         for d in range(MESH_2D[0])]
        for _ in range(STEPS)
    ]  # fmt: skip


def mesh2d_case(seed: int) -> dict:
    """Tensor parallel (layer 0 column-, 2 row-, 4 column-sharded) on the mesh's ``tp``
    dimension and FSDP2 on its ``dp`` dimension, as TorchTitan composes them: each
    data-parallel group trains on its own batch (its loss the batch's mean), SGD."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import fastmlp

    mesh = init_device_mesh("cpu", MESH_2D, mesh_dim_names=("dp", "tp"))
    model = _tp_model(seed)
    plan = {
        "0": ColwiseParallel(),
        "2": RowwiseParallel(),
        "4": ColwiseParallel(output_layouts=Replicate()),
    }
    parallelize_module(model, mesh["tp"], plan)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dp = mesh["dp"].get_local_rank()
    for per_dp in mesh2d_data(seed):
        x, y = per_dp[dp]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.named_parameters()
    }
    return {"merged": fastmlp.stats_of(model).snapshot().rows(), "params": params}


def mesh2d_reference(seed: int) -> dict:
    """One process: each step's data-parallel batches as micro-batches with each one's
    loss, the gradients averaged over them (what FSDP2's reduce-scatter computes), SGD."""
    import fastmlp

    model = _tp_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for per_dp in mesh2d_data(seed):
        for x, y in per_dp:
            F.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            p.grad /= MESH_2D[0]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "rows": fastmlp.stats_of(model).snapshot().rows(),
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
    }


def mesh2d_worker(rank: int, world_size: int, port: int, out: str, seed: int) -> None:
    """One rank of the 2-D mesh test: saves ``rank{rank}.pt`` (or its traceback)."""
    from fastmlp import distributed

    _join(rank, world_size, port)
    try:
        result = mesh2d_case(seed)
    except Exception:  # noqa: BLE001 - recorded for the test to report
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    distributed.cleanup(wait=True)
    distributed.exit_rank(0)
