"""``fastmlp.instrument(model)`` on models fastmlp did not build: nn.Sequential,
torchvision.ops.MLP and a transformer block's MLP (3-D input)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import InstrumentedLinear, instrument, stats_of

torchvision = pytest.importorskip("torchvision")


class Block(nn.Module):
    """nanoGPT's MLP: c_fc -> GELU -> c_proj -> dropout."""

    def __init__(self, d: int = 8, approximate: str = "tanh") -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU(approximate=approximate)
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Transformer(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = Block(d)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.ln(x))


def _sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 7), nn.SiLU(), nn.Linear(7, 3))


def _tv_mlp():
    torch.manual_seed(1)
    return torchvision.ops.MLP(6, [10, 8, 3], activation_layer=nn.GELU)


def _transformer():
    torch.manual_seed(2)
    return Transformer(8)


CASES = {
    "sequential": (_sequential, (11, 6)),
    "torchvision": (_tv_mlp, (11, 6)),
    "transformer": (_transformer, (3, 5, 8)),  # [batch, tokens, channels]
}
EXPECTED = {
    "sequential": ({"0": "gelu", "2": "silu"}, ["4"]),
    "torchvision": ({"0": "gelu", "3": "gelu"}, ["6"]),
    "transformer": ({"mlp.c_fc": "gelu_tanh"}, ["mlp.c_proj"]),
}


def _reference_tensors(model: nn.Module, names: list[str], x: torch.Tensor, up: torch.Tensor):
    """z, h, dL/dz, dL/dW of each named linear layer of the *untouched* model in float64.

    h is the output of the activation module that follows (fused), or z itself (lone)."""
    ref = copy.deepcopy(model).double()
    mods = dict(ref.named_modules())
    seq_next = {}
    for pname, parent in ref.named_modules():
        kids = list(parent.named_children())
        for (a, _), (_b, m) in zip(kids, kids[1:], strict=False):
            seq_next[f"{pname}.{a}" if pname else a] = m
    out: dict[str, dict] = {n: {} for n in names}

    def grab(name):
        def hook(_m, _inp, z):
            out[name]["z"] = z
            z.register_hook(lambda g: out[name].__setitem__("dz", g))

        return hook

    for n in names:
        mods[n].register_forward_hook(grab(n))
    y = ref(x.double())
    y.backward(up.double())
    for n in names:
        rec = out[n]
        rec["dw"] = mods[n].weight.grad
    return ref, out, seq_next


def _moments_match(qs, values: np.ndarray, where: str) -> None:
    v = values[np.isfinite(values)]
    assert qs.count == v.size, where
    mean, std = float(v.mean()), float(v.std())
    assert abs(qs.mean - mean) <= 1e-5 * (abs(mean) + std) + 1e-12, (where, qs.mean, mean)
    assert abs(qs.var - v.var()) <= 1e-4 * v.var() + 1e-15, (where, qs.var, v.var())
    assert qs.min == pytest.approx(v.min(), rel=1e-5, abs=1e-6), where
    assert qs.max == pytest.approx(v.max(), rel=1e-5, abs=1e-6), where


@pytest.mark.parametrize("case", list(CASES))
def test_instrument_equals_untouched_model(case):
    build, shape = CASES[case]
    plain = build()
    model = build()  # the same weights (same seed)
    keys = list(plain.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before instrument()
    params_before = list(model.parameters())
    old_checkpoint = copy.deepcopy(plain.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = instrument(model)
    assert out is model
    report = model.fastmlp_report
    fused, lone = EXPECTED[case]
    assert {lin: act for lin, _, act in report.fused} == fused
    assert [p for p, _ in report.lone] == lone
    if case == "transformer":  # MultiheadAttention reads out_proj.weight itself
        assert [p for p, _ in report.untouched] == ["attn.out_proj"]
        assert any("attn.out_proj" in str(w.message) for w in caught)
    else:
        assert report.untouched == [] and not caught
    # same Parameter objects, same state_dict keys; an old checkpoint loads strictly
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    assert list(model.state_dict()) == keys
    model.load_state_dict(old_checkpoint, strict=True)
    plain.load_state_dict(model.state_dict(), strict=True)
    for path in [*fused, *lone]:
        assert isinstance(model.get_submodule(path), InstrumentedLinear)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g)
    up = torch.randn(*shape[:-1], plain(x).shape[-1], generator=g)
    names = [*fused, *lone]
    ref, captured, seq_next = _reference_tensors(plain, names, x, up)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), model(xb)
    torch.testing.assert_close(yb, ya)
    ya.backward(up)
    yb.backward(up)
    torch.testing.assert_close(xb.grad, xa.grad)
    for (na, pa), (nb, pb) in zip(plain.named_parameters(), model.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pb.grad, pa.grad, msg=na)

    # rows named by module path; moments equal the float64 reference of the untouched model
    snap = stats_of(model).snapshot()
    assert [r["name"] for r in snap.rows()[::4]] == names
    for n in names:
        rec = captured[n]
        z = rec["z"].detach()
        act = fused.get(n)
        h = z if act is None else seq_next_or_block(ref, n, seq_next)(z)
        ref_values = {
            "preactivation": z,
            "activation": h,
            "preactivation_grad": rec["dz"],
            "weight_grad": rec["dw"],
        }
        for q, v in ref_values.items():
            _moments_match(snap[n][q], v.detach().numpy().ravel(), f"{case} {n} {q}")

    # the optimizer built before the call trains the instrumented model
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.detach(), b - 0.1 * p.grad)


def seq_next_or_block(ref: nn.Module, name: str, seq_next: dict):
    """The activation module following linear ``name`` in the untouched float64 model."""
    if name in seq_next and not isinstance(seq_next[name], nn.Linear):
        return seq_next[name]
    return ref.get_submodule(name.rpartition(".")[0] + ".gelu")


def test_instrument_on_the_triton_path_under_the_interpreter():
    """The same Sequential with backend="triton": kernels (after calibration) on CPU
    under TRITON_INTERPRET=1 give the untouched model's outputs and gradients."""
    fused = pytest.importorskip("fastmlp.backends.fused")
    if not fused.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    plain, model = _sequential(), _sequential()
    instrument(model, backend="triton")
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # the first step calibrates, the second runs the kernels
        x = torch.randn(13, 6, generator=g)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = plain(xa), model(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    snap = stats_of(model).snapshot()
    assert snap["0"]["activation"].count == 2 * 13 * 9


def test_unsupported_structures_are_reported():
    class Functional(nn.Module):  # activation applied functionally: nothing to fuse
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.gelu(self.fc(x))

    class Untraceable(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:
                return self.act(self.fc(x))
            return self.fc(x)

    class MyLinear(nn.Linear):
        pass

    class Twice(nn.Module):  # the activation module is used twice: ambiguous
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))

    model = nn.ModuleDict(
        {"f": Functional(), "u": Untraceable(), "m": MyLinear(4, 4), "t": Twice()}
    )
    with pytest.warns(UserWarning, match="m: a subclass of nn.Linear"):
        instrument(model)
    r = model.fastmlp_report
    assert r.fused == []
    lone = dict(r.lone)
    assert set(lone) == {"f.fc", "u.fc", "t.fc"}
    assert "does not trace with torch.fx" in lone["u.fc"]
    assert dict(r.untouched) == {"m": "a subclass of nn.Linear (MyLinear)"}
    assert type(model["m"]) is MyLinear
    assert isinstance(model["u"].act, nn.ReLU)  # not fused, still there
    x = torch.randn(3, 4)
    for k in ("f", "u", "t"):
        model[k](x).sum().backward()
    assert "f.fc" in str(r) and fastmlp.stats_of(model).names == ["f.fc", "u.fc", "t.fc"]


def test_lone_linear_shared_and_checkpoint_with_stats():
    lin = nn.Linear(3, 2)
    new = instrument(lin)
    assert isinstance(new, InstrumentedLinear) and new.weight is lin.weight
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    instrument(model)
    assert model[0] is model[2] and isinstance(model[0], InstrumentedLinear)
    assert model.fastmlp_report.lone == [("0", "linear or activation module shared")]
    # opting in to statistics in the state_dict adds their keys
    m2 = instrument(_sequential(), stats_in_state_dict=True)
    assert "0.stats.acc" in m2.state_dict()
    with pytest.raises(TypeError, match="unknown instrument"):
        instrument(_sequential(), bogus=1)


def test_tensorboard_tags_use_module_paths_except_for_the_paper_mlp():
    from fastmlp.run import _layer_tag

    assert _layer_tag({"layer": 3, "name": "layers.2"}) == "layer3"  # the paper's MLP
    assert _layer_tag({"layer": 1, "name": None}) == "layer1"
    assert _layer_tag({"layer": 1, "name": "mlp.c_fc"}) == "mlp.c_fc"
