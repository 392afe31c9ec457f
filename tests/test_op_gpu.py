"""The op on a GPU: a whole training step captured in a CUDA graph keeps updating the
statistics, switching statistics on/off keeps the buffers, and torch.compile(fullgraph=True)
of the Triton path matches eager (skipped without CUDA).

The documented capture recipe (README, "Compile, export, CUDA graphs"): run a few eager
steps first (they calibrate the statistics and autotune the kernels), then capture.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from fastmlp.mlp import MLP

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _model(seed: int = 0) -> MLP:
    return MLP(256, 10, depth=3, width=200, activation="tanh", seed=seed).to(DEV)


def _batches(n: int, steps: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [
        (
            torch.rand(n, 256, device=DEV, generator=g) * 2 - 1,
            torch.randint(0, 10, (n,), device=DEV, generator=g),
        )
        for _ in range(steps)
    ]


def _step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def test_cuda_graph_of_a_training_step_keeps_recording():
    eager, captured = _model(), _model()
    captured.load_state_dict(eager.state_dict())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(captured.parameters(), lr=0.05)
    batches = _batches(64, 8)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    # warm-up on a side stream: calibrates the statistics, autotunes the kernels
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, y in batches[:3]:
            opt_c.zero_grad(set_to_none=True)
            static_x.copy_(x)
            static_y.copy_(y)
            _step(captured, opt_c, static_x, static_y)
    torch.cuda.current_stream().wait_stream(s)
    for x, y in batches[:3]:
        opt_e.zero_grad(set_to_none=True)
        _step(eager, opt_e, x, y)
    assert all(all(layer.stats.calibrated) for layer in captured.layers)

    graph = torch.cuda.CUDAGraph()
    opt_c.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        _step(captured, opt_c, static_x, static_y)
    # Capturing ran nothing: the statistics hold the warm-up steps only.
    assert captured.stats.snapshot()[1]["activation"].count == 3 * 64 * 200
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        opt_e.zero_grad(set_to_none=True)
        _step(eager, opt_e, x, y)
    torch.cuda.synchronize()
    got, ref = captured.stats.snapshot(), eager.stats.snapshot()
    assert got[1]["activation"].count == 8 * 64 * 200
    for layer in ref.layers:
        for q, r in ref[layer].items():
            g = got[layer][q]
            assert g.count == r.count > 0, (layer, q)
            assert abs(g.mean - r.mean) <= 1e-3 * (abs(r.mean) + r.std), (layer, q)
            assert abs(g.std - r.std) <= 1e-3 * r.std, (layer, q)
            assert sum(g.hist_counts) + g.underflow + g.overflow == g.count, (layer, q)


def test_statistics_switch_keeps_buffers_and_shapes():
    model = _model()
    x, y = _batches(32, 1)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _step(model, opt, x, y)  # calibrates
    ptrs = [b.data_ptr() for b in model.buffers()]
    before = model.stats.snapshot()[1]["activation"].count
    model.stats.enabled = False
    _step(model, opt, x, y)
    assert model.stats.snapshot()[1]["activation"].count == before
    model.stats.enabled = True
    _step(model, opt, x, y)
    assert model.stats.snapshot()[1]["activation"].count == before + 32 * 200
    assert [b.data_ptr() for b in model.buffers()] == ptrs


def test_compile_fullgraph_triton_matches_eager():
    torch._dynamo.reset()
    eager = _model(1)
    mine = copy.deepcopy(eager)
    compiled = torch.compile(mine, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(mine.parameters(), lr=0.05)
    for x, y in _batches(48, 4, seed=1):
        opt_e.zero_grad()
        opt_c.zero_grad()
        _step(eager, opt_e, x, y)
        _step(compiled, opt_c, x, y)
    got, ref = mine.stats.snapshot(), eager.stats.snapshot()
    for layer in ref.layers:
        for q, r in ref[layer].items():
            g = got[layer][q]
            assert g.count == r.count > 0, (layer, q)
            assert abs(g.mean - r.mean) <= 1e-3 * (abs(r.mean) + r.std), (layer, q)


def test_tripwire_update_never_synchronises():
    """The tripwire's per-step update on CUDA raises no synchronisation (sync debug mode)."""
    import math

    from fastmlp.tripwire import Tripwire

    model = _model()
    wire = Tripwire(model)
    x, y = _batches(16, 1)[0]
    x[0, 0] = math.nan
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _step(model, opt, x, y)  # calibration pass (may read the host once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wire.update(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    hit = wire.read()
    assert (hit.step, hit.layer, hit.quantity) == (1, 1, "preactivation")
