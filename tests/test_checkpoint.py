"""Activation checkpointing records each forward once: the recomputation inside
``torch.utils.checkpoint`` (reentrant or not), Hugging Face's gradient checkpointing and a
checkpointed region under ``torch.compile`` record nothing, so a step's statistics equal
the same step without checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastmlp
from fastmlp import InstrumentedLinear, stats_of

FIGURES = ("count", "mean", "var", "min", "max", "nonfinite")


def _same_statistics(a: nn.Module, b: nn.Module) -> None:
    """Every layer's figures of every quantity equal (counts exactly, moments to float
    rounding: the two runs compute the same values in the same order)."""
    sa, sb = stats_of(a).snapshot(), stats_of(b).snapshot()
    rows_a = {(r["name"], r["quantity"]): r for r in sa.rows()}
    rows_b = {(r["name"], r["quantity"]): r for r in sb.rows()}
    assert rows_a.keys() == rows_b.keys()
    for key, ra in rows_a.items():
        rb = rows_b[key]
        assert ra["count"] > 0, key
        for f in FIGURES:
            assert ra[f] == pytest.approx(rb[f], rel=1e-6, abs=1e-12), (key, f, ra[f], rb[f])
        assert ra["hist_counts"] == rb["hist_counts"], key


class Blocks(nn.Module):
    """Two blocks of instrumented layers, each run through ``torch.utils.checkpoint``
    (``mode``: ``"reentrant"``, ``"non-reentrant"``) or directly (``None``)."""

    def __init__(self, mode: str | None, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mode = mode
        self.a = nn.Sequential(
            InstrumentedLinear(12, 16, "tanh", generator=g, layer_index=1),
            InstrumentedLinear(16, 16, "gelu", generator=g, layer_index=2),
        )
        self.b = InstrumentedLinear(16, 5, "identity", generator=g, layer_index=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.a, self.b):  # (b: checkpoint around a single layer)
            if self.mode is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return x


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointed_step_records_what_the_plain_step_records(mode):
    plain, ckpt = Blocks(None), Blocks(mode)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step: calibrated, accumulating
        x = torch.randn(7, 12, generator=g, requires_grad=mode == "reentrant")
        up = torch.randn(7, 5, generator=g)
        outs = []
        for model in (plain, ckpt):
            model.zero_grad()
            out = model(x)
            out.backward(up)
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0])
        for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad)
    _same_statistics(ckpt, plain)
    # one step's forward count, not two: 7 rows of 16 features, twice
    assert stats_of(ckpt).snapshot()[1]["preactivation"].count == 2 * 7 * 16


def test_hugging_face_gradient_checkpointing_records_once():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(config)
    ckpt = copy.deepcopy(plain)
    for model in (plain, ckpt):
        fastmlp.instrument(model, warn=False)
        model.train()
    ckpt.gradient_checkpointing_enable()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    losses = [model(ids, labels=ids).loss for model in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    _same_statistics(ckpt, plain)


@pytest.mark.slow
def test_compiled_checkpoint_records_once():
    plain, ckpt = Blocks(None), Blocks("non-reentrant")
    compiled = torch.compile(ckpt, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(7, 12, generator=g)
        up = torch.randn(7, 5, generator=g)
        plain(x).backward(up)
        compiled(x).backward(up)
    _same_statistics(ckpt, plain)


def test_recomputation_computes_as_the_recorded_pass(monkeypatch):
    """With statistics off the CPU backend may let oneDNN apply the activation in its
    matmul (where that timed faster), which rounds differently from the activation applied
    after it; the recomputation must not, or its gradients differ from the recorded pass's
    in the last bits. Forced here: oneDNN taken only where it fuses the activation."""
    from fastmlp.backends import cpu

    if fastmlp.is_deterministic() or not cpu._onednn_usable(torch.ones(2, 2), torch.ones(2, 2)):
        pytest.skip("needs oneDNN's fused linear and the timed choice (not deterministic mode)")
    monkeypatch.setattr(cpu, "_ONEDNN_CHOICE", {})
    monkeypatch.setattr(cpu, "_onednn_is_faster", lambda x, w, b, act: act is not None)
    plain, ckpt = Blocks(None), Blocks("non-reentrant")
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randn(7, 12, generator=g)
        up = torch.randn(7, 5, generator=g)
        for model in (plain, ckpt):
            model(x).backward(up)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
