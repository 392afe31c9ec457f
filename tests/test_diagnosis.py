"""fastmlp.diagnosis: each pathology of the paper built for real and diagnosed.

Networks are fastmlp.MLP on Shapeset-3x2 probe sets of 300 images (the paper's
monitoring); widths are narrower than the paper's 1000 where the effect does not
depend on the width (e.g. the per-layer gradient factor, set by ``n Var[W]``, which
each init fixes whatever ``n``), which keeps the file quick on a CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

import fastmlp
from fastmlp.data import shapeset
from fastmlp.stats.diagnosis import (
    Finding,
    Thresholds,
    diagnose,
    findings_json,
    format_findings,
    worst,
)
from fastmlp.stats.snapshot import QuantityStats, Snapshot

DEPTH = 5


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def probe_set() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = shapeset(300, seed=2010)
    return x.flatten(1), y


def _mlp(activation: str = "tanh", init: str = "normalized", width: int = 200, **kw) -> fastmlp.MLP:
    kw.setdefault("depth", DEPTH)
    return fastmlp.MLP(1024, 9, width=width, activation=activation, init=init, seed=0, **kw)


def _codes(findings: list[Finding], severity: str = "warning") -> set[tuple[str, int]]:
    floor = ("info", "warning", "error").index(severity)
    return {(f.code, f.layer) for f in findings if f.rank >= floor}


def _by_code(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


@pytest.mark.parametrize("width", [200, 1000])
def test_healthy_tanh_normalized_at_init_is_quiet(probe_set, width: int) -> None:
    findings = diagnose(fastmlp.probe(_mlp(width=width), *probe_set))
    assert not [f for f in findings if f.rank >= 1], format_findings(findings)


def test_sigmoid_depth5_standard_saturates_its_top_layer(probe_set) -> None:
    """Fig 2: SGD on minibatches of 10 drives the top hidden layer of a depth-5 sigmoid net
    (standard init) to 0 within a few hundred updates; the lower layers stay near 0.5."""
    model = _mlp("sigmoid", "standard", width=300)
    before = diagnose(fastmlp.probe(model, *probe_set))
    assert not _by_code(before, "saturation"), format_findings(before)

    x, y = shapeset(3000, seed=1)
    x = x.flatten(1)
    model.stats.enabled = False  # the probe records its own statistics
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for step in range(300):
        i = (10 * step) % x.shape[0]
        loss = F.cross_entropy(model(x[i : i + 10]), y[i : i + 10])
        opt.zero_grad()
        loss.backward()
        opt.step()
    snap = fastmlp.probe(model, *probe_set)
    findings = diagnose(snap)
    sat = [f for f in _by_code(findings, "saturation") if f.severity == "warning"]
    assert [f.layer for f in sat] == [5], format_findings(findings)
    (top,) = sat
    assert top.quantity == "activation"
    assert top.evidence["near_low"] >= 0.5 > top.evidence["near_high"]
    assert top.evidence["range"] == [0.0, 1.0]
    lower = min(snap[i]["activation"].mean for i in (1, 2, 3, 4))
    assert snap[5]["activation"].mean < 0.1 and lower > 0.4


def test_tanh_standard_init_vanishing_gradient(probe_set) -> None:
    """Fig 7: at initialization, back-propagated gradients shrink towards the input under the
    standard init (about sqrt(3) per layer), not under the normalized init."""
    findings = diagnose(fastmlp.probe(_mlp(init="standard"), *probe_set))
    (v,) = _by_code(findings, "vanishing_gradient")
    assert (v.severity, v.layer, v.quantity) == ("warning", 1, "preactivation_grad")
    assert v.evidence["top_layer"] == DEPTH and v.evidence["bottom_layer"] == 1
    assert 1.5 < v.evidence["per_layer"] < 2.2
    stds = [v.evidence["std"][str(i)] for i in range(1, DEPTH + 1)]
    assert stds == sorted(stds)
    assert not _by_code(diagnose(fastmlp.probe(_mlp(), *probe_set)), "vanishing_gradient")
    # The threshold is a keyword: a looser one lets the standard init pass.
    loose = diagnose(fastmlp.probe(_mlp(init="standard"), *probe_set), gradient_ratio=2.5)
    assert not _by_code(loose, "vanishing_gradient")


def test_exploding_gradient(probe_set) -> None:
    """ReLU layers with weights 3x the normalized init: each layer multiplies the gradient's
    variance by about 9/2, so it grows towards the input."""
    model = _mlp("relu")
    with torch.no_grad():
        for layer in model.layers[1:DEPTH]:
            layer.weight.mul_(3.0)
    findings = diagnose(fastmlp.probe(model, *probe_set))
    (e,) = _by_code(findings, "exploding_gradient")
    assert e.layer == 1 and e.evidence["per_layer"] < 1 / 1.5
    assert not _by_code(findings, "vanishing_gradient")


def test_nan_in_the_input_is_nonfinite_at_layer_1(probe_set) -> None:
    x, y = probe_set
    x = x.clone()
    x[7, 100] = float("nan")
    findings = diagnose(fastmlp.probe(_mlp(), x, y))
    assert findings[0].code == "nonfinite" and findings[0].severity == "error"
    assert worst(findings) is findings[0]
    nf = _by_code(findings, "nonfinite")
    assert len(nf) == 1
    assert (nf[0].layer, nf[0].quantity) == (1, "preactivation")
    # One example of 300 is poisoned: its 200 pre-activations of layer 1.
    assert nf[0].evidence["nonfinite"] == 200
    assert {a["layer"] for a in nf[0].evidence["affected"]} == set(range(1, DEPTH + 2))


def test_nonfinite_names_the_first_layer_in_forward_order(probe_set) -> None:
    model = _mlp()
    with torch.no_grad():
        model.layers[2].weight[0, 0] = float("inf")  # layer 3
    (nf,) = _by_code(diagnose(fastmlp.probe(model, *probe_set)), "nonfinite")
    assert (nf.layer, nf.quantity) == (3, "preactivation")
    assert nf.evidence["affected"][0] == {
        "layer": 3,
        "quantity": "preactivation",
        "nonfinite": nf.evidence["nonfinite"],
        "fraction": nf.evidence["fraction"],
    }


def test_relu_layer_with_a_large_negative_bias_has_dead_units(probe_set) -> None:
    model = _mlp("relu", depth=3)
    assert not _by_code(diagnose(fastmlp.probe(model, *probe_set)), "dead_units")
    with torch.no_grad():
        model.layers[1].bias.fill_(-10.0)  # layer 2
    findings = diagnose(fastmlp.probe(model, *probe_set))
    dead = {f.layer: f for f in _by_code(findings, "dead_units")}
    assert 2 in dead and 1 not in dead and 4 not in dead  # 4: the output layer
    assert dead[2].severity == "warning" and dead[2].evidence["zero_fraction"] == 1.0
    # Layer 2 passes nothing on: its activation std collapses against its input's.
    assert ("collapse", 2) in _codes(findings)


def test_dead_fraction_from_the_preactivation_histogram(probe_set) -> None:
    """A bias that leaves a few units alive: the exact-zero fraction is read off the
    pre-activation histogram (0 is a bin edge), so it is reported as at least that."""
    model = _mlp("relu", depth=2)
    with torch.no_grad():
        model.layers[1].bias.fill_(-10.0)
        model.layers[1].bias[0] = 10.0  # one unit of 200 alive
    snap = fastmlp.probe(model, *probe_set)
    (d,) = _by_code(diagnose(snap), "dead_units")
    assert d.layer == 2 and d.evidence["activation_max"] > 0
    assert d.evidence["zero_fraction"] == pytest.approx(199 / 200, abs=1e-9)
    assert not _by_code(diagnose(snap, dead_fraction=0.999), "dead_units")


def test_collapse(probe_set) -> None:
    model = _mlp()
    with torch.no_grad():
        model.layers[2].weight.mul_(0.01)  # layer 3
    findings = diagnose(fastmlp.probe(model, *probe_set))
    (c,) = _by_code(findings, "collapse")
    assert c.layer == 3 and c.evidence["input_layer"] == 2 and c.evidence["ratio"] < 0.1


def test_saturation_without_histogram_uses_lower_bounds() -> None:
    """Training statistics on the CPU have no histograms: saturated fractions and Markov's
    inequality on the mean's distance from the bound still show a sigmoid pinned at 0."""
    a = QuantityStats(5, "activation", 1000, 0, mean=0.02, var=1e-4, std=0.01, min=0.001,
                      max=0.2, saturated_low=0.3, saturated_high=0.0)  # fmt: skip
    z = QuantityStats(5, "preactivation", 1000, 0, mean=-4.0, var=1.0, std=1.0, min=-7, max=-1.4)
    (f,) = diagnose(Snapshot({5: {"preactivation": z, "activation": a}}))
    assert (f.code, f.severity, f.layer) == ("saturation", "warning", 5)
    assert f.evidence["method"].startswith("lower bound")
    assert f.evidence["near_low"] == pytest.approx(0.8)  # 1 - 0.02 / 0.1
    assert f.evidence["range"] == [0.0, 1.0]
    milder = QuantityStats(5, "activation", 1000, 0, mean=0.3, var=0.01, std=0.1, min=0.001,
                           max=0.9, saturated_low=0.3, saturated_high=0.0)  # fmt: skip
    (g,) = diagnose(Snapshot({5: {"preactivation": z, "activation": milder}}))
    assert g.severity == "info"


def test_from_rows_round_trip_and_json(probe_set) -> None:
    snap = fastmlp.probe(_mlp(init="standard"), *probe_set)
    rows = [{"step": 0, "source": "probe", **r} for r in json.loads(json.dumps(snap.rows()))]
    rebuilt = Snapshot.from_rows(rows)
    assert sorted(rebuilt.layers) == sorted(snap.layers)
    assert diagnose(rebuilt) == diagnose(snap)
    text = findings_json(diagnose(snap), step=0)
    loaded = json.loads(text)
    assert loaded["step"] == 0
    assert [Finding.from_dict(d) for d in loaded["findings"]] == diagnose(snap)
    with pytest.raises(ValueError, match="several snapshots mixed"):
        Snapshot.from_rows(rows + rows[:1])


def test_thresholds_are_checked() -> None:
    with pytest.raises(TypeError):
        diagnose(Snapshot({}), no_such_threshold=1.0)
    with pytest.raises(ValueError, match="gradient_ratio"):
        Thresholds(gradient_ratio=0.9)
    with pytest.raises(ValueError, match="severity"):
        Finding("x", "fatal", 1, None, None, "m")
    assert diagnose(Snapshot({})) == []
    assert format_findings([]) == "no findings at info level or above"
