"""StatsConfig: the one declaration of what a layer records, and everything read off it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastmlp
from fastmlp import MLP, InstrumentedLinear, StatsConfig
from fastmlp.stats.config import FIELDS, GROUPS, SWITCHES


def test_defaults_and_groups():
    c = StatsConfig()
    assert (c.enabled, c.histograms, c.saturation) == (True, True, True)
    assert c.bins == 64 and c.saturation_thresholds is None
    # the opt-in groups are the switches that are off by default
    assert GROUPS == ("zeros", "moments4", "per_unit", "exponents")
    assert set(SWITCHES) == {f.name for f in dataclasses.fields(c) if f.type == "bool"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.zeros = True  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ({"bins": 7}, ValueError, "even integer"),
        ({"bins": 0}, ValueError, "even integer"),
        ({"bins": True}, ValueError, "even integer"),
        ({"saturation_thresholds": (0.9, 0.1)}, ValueError, "low < high"),
        ({"saturation_thresholds": "ab"}, ValueError, "two numbers"),
        ({"zeros": 1}, TypeError, "must be a bool"),
    ],
)
def test_bad_values_say_what_was_expected(bad, error, words):
    with pytest.raises(error, match=words):
        StatsConfig(**bad)
    with pytest.raises(error, match=words):
        StatsConfig().replace(**bad)


def test_a_config_of_another_type_or_a_switch_not_a_bool_is_refused():
    with pytest.raises(TypeError, match="config must be a StatsConfig"):
        MLP(4, 2, depth=1, width=3, config={"zeros": True})
    with pytest.raises(TypeError, match="config must be a StatsConfig"):
        fastmlp.instrument(nn.Sequential(nn.Linear(3, 3)), config="zeros")
    with pytest.raises(TypeError, match="must be a bool"):
        fastmlp.instrument(nn.Sequential(nn.Linear(3, 3)), zeros="yes")


def test_unknown_names_are_refused_everywhere():
    with pytest.raises(TypeError, match="unknown statistics options"):
        StatsConfig().replace(zeroes=True)
    model = MLP(6, 3, depth=2, width=5)
    with pytest.raises(TypeError, match="unknown statistics options"):
        model.stats.configure(zeroes=True)
    with pytest.raises(TypeError, match="unknown instrument"):
        fastmlp.instrument(nn.Sequential(nn.Linear(4, 4)), zeroes=True)


def test_mlp_instrument_and_layers_take_the_config():
    config = StatsConfig(bins=16, zeros=True, moments4=True, histograms=False)
    model = MLP(6, 3, depth=2, width=5, config=config)
    for _, s in model.stats.layer_stats():
        assert s.hist.shape[-1] == 16 + 2
        assert (s.zeros, s.moments4, s.histograms, s.exponents) == (True, True, False, False)
    # the tanh layers take the activation's thresholds, the identity output none
    thresholds = [s.config.saturation_thresholds for _, s in model.stats.layer_stats()]
    assert thresholds == [(-0.99, 0.99), (-0.99, 0.99), None]
    assert model.stats.config == config  # shared, thresholds differing: None

    seq = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    fastmlp.instrument(seq, config=StatsConfig(exponents=True), bins=8, warn=False)
    configs = [s.config for _, s in fastmlp.stats_of(seq).layer_stats()]
    assert all(c.exponents and c.bins == 8 for c in configs)

    layer = InstrumentedLinear(4, 3, "sigmoid", config=StatsConfig(per_unit=True), bins=4)
    assert layer.stats.per_unit and layer.stats.bins == 4
    assert layer.stats.thresholds == (0.01, 0.99)


def test_model_stats_switch_every_field_generically():
    model = MLP(6, 3, depth=2, width=5)
    for name in SWITCHES:
        value = not getattr(StatsConfig(), name)
        setattr(model.stats, name, value)
        assert getattr(model.stats, name) == value, name
        assert all(getattr(s.config, name) == value for _, s in model.stats.layer_stats())
    model.stats.configure(enabled=True, histograms=True, zeros=False)
    assert model.stats.enabled and model.stats.histograms and not model.stats.zeros
    with pytest.raises(ValueError, match="bins is fixed"):
        model.stats.configure(bins=32)
    with pytest.raises(AttributeError):
        model.stats.no_such_switch  # noqa: B018


def test_a_refused_change_changes_no_layer():
    """per_unit needs each layer's units: a layer without them refuses, and then no layer of
    the model has been switched."""
    lone = fastmlp.LayerStats(fastmlp.get_activation("tanh"))  # no units
    with pytest.raises(ValueError, match="units"):
        lone.configure(per_unit=True)
    assert not lone.per_unit


def test_the_op_schema_has_a_flag_per_config_field():
    schema = torch.ops.fastmlp.dense_forward.default._schema
    names = [a.name for a in schema.arguments]
    assert names[-len(FIELDS) :] == list(FIELDS)
    schema = torch.ops.fastmlp.dense_backward.default._schema
    assert [a.name for a in schema.arguments][-len(FIELDS) :] == list(FIELDS)


def test_config_switches_reach_the_compiled_op():
    """Under torch.compile the op takes the config as its flag arguments: a switch flipped
    between compiled steps records what it says."""
    g = torch.Generator().manual_seed(0)
    model = MLP(6, 3, depth=1, width=5, seed=0)
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    F.cross_entropy(compiled(x), y).backward()
    model.stats.reset()
    model.stats.zeros = True
    F.cross_entropy(compiled(x), y).backward()
    snap = model.stats.snapshot()
    assert snap[1]["activation"].zero_fraction is not None
    model.stats.reset()
    model.stats.enabled = False
    F.cross_entropy(compiled(x), y).backward()
    assert model.stats.snapshot()[1]["activation"].count == 0
