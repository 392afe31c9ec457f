"""Issue 23, "Watch the models people train": ``fastmlp.instrument()`` on real model code.

Small random configurations of Hugging Face GPT-2, Llama, Qwen2, BERT, T5 (gated-gelu) and
ViT, timm's ViT, MLP-Mixer and ConvNeXt, torchvision's ViT and Swin, built here (nothing is
downloaded), float32 on the CPU. For each: ``instrument()`` runs; outputs and every
parameter's gradient equal an untouched copy's (eval and train mode, dropout at 0); every
instrumented layer's statistics equal float64 moments of the copy's tensors, captured by
hooks; a few SGD steps train it; every dense layer of the original model is in the report.
Then the regressions the issue names: parameters read as attributes (``cls_token``), HF
``Conv1D`` layers, HF and timm activation classes, ``isinstance(layer, nn.Linear)``,
lookalike activations, a training-mode branch between a layer and its activation.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmlp import instrument, stats_of

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from transformers.pytorch_utils import Conv1D  # noqa: E402

transformers.logging.set_verbosity_error()

BATCH, TOKENS, VOCAB, IMAGE = 2, 8, 100, 32
RTOL = 1e-5  # float32: outputs and gradients, relative (and of the tensor's scale)


# ---------------------------------------------------------------------------------------
# The models: small random configurations of the real model code, every dropout at 0.


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _qwen2() -> nn.Module:
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        decoder_start_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg)


def _hf_vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def _timm_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=8, depth=2,
        embed_dim=32, num_heads=2, num_classes=5,
    )  # fmt: skip


def _timm_mixer() -> nn.Module:
    return timm.models.mlp_mixer.MlpMixer(
        num_classes=5, img_size=IMAGE, patch_size=8, num_blocks=2, embed_dim=32
    )


def _timm_convnext() -> nn.Module:
    return timm.models.convnext.ConvNeXt(
        num_classes=5, depths=(1, 1, 1, 1), dims=(16, 32, 32, 32), conv_mlp=False
    )


def _tv_vit() -> nn.Module:
    return torchvision.models.vision_transformer.VisionTransformer(
        image_size=IMAGE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )  # fmt: skip


def _tv_swin() -> nn.Module:
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=5, stochastic_depth_prob=0.0,
    )  # fmt: skip


def _tokens(g: torch.Generator) -> dict:
    ids = torch.randint(2, VOCAB, (BATCH, TOKENS), generator=g)
    return {"input_ids": ids, "labels": torch.randint(2, VOCAB, (BATCH, TOKENS), generator=g)}


def _pixels(g: torch.Generator) -> dict:
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    return {"pixel_values": x, "labels": torch.randint(0, 5, (BATCH,), generator=g)}


def _images(g: torch.Generator) -> dict:
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    return {"x": x, "y": torch.randint(0, 5, (BATCH,), generator=g)}


def _hf_call(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**batch)  # the model's own loss, from the labels
    return out.logits, out.loss


def _classifier_call(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["x"])
    return logits, F.cross_entropy(logits, batch["y"])


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict]
    call: Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]


CASES = {
    "hf_gpt2": Case(_gpt2, _tokens, _hf_call),
    "hf_llama": Case(_llama, _tokens, _hf_call),
    "hf_qwen2": Case(_qwen2, _tokens, _hf_call),
    "hf_bert": Case(_bert, _tokens, _hf_call),
    "hf_t5": Case(_t5, _tokens, _hf_call),
    "hf_vit": Case(_hf_vit, _pixels, _hf_call),
    "timm_vit": Case(_timm_vit, _images, _classifier_call),
    "timm_mixer": Case(_timm_mixer, _images, _classifier_call),
    "timm_convnext": Case(_timm_convnext, _images, _classifier_call),
    "tv_vit": Case(_tv_vit, _images, _classifier_call),
    "tv_swin": Case(_tv_swin, _images, _classifier_call),
}

# The activation modules each model applies right after a dense layer, and the fastmlp
# activation they are (HF's GELUActivation is exact GELU, NewGELUActivation the tanh
# approximation, SiLUActivation SiLU; timm's ConvNeXt uses timm's own GELU module):
# {linear path: (activation path, fastmlp name)}.
EXPECTED_FUSED = {
    "hf_gpt2": {
        f"transformer.h.{i}.mlp.c_fc": (f"transformer.h.{i}.mlp.act", "gelu_tanh") for i in range(2)
    },
    "hf_llama": {
        f"model.layers.{i}.mlp.gate_proj": (f"model.layers.{i}.mlp.act_fn", "silu")
        for i in range(2)
    },
    "hf_qwen2": {
        f"model.layers.{i}.mlp.gate_proj": (f"model.layers.{i}.mlp.act_fn", "silu")
        for i in range(2)
    },
    "hf_bert": {
        **{
            f"bert.encoder.layer.{i}.intermediate.dense": (
                f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn",
                "gelu",
            )
            for i in range(2)
        },
        "cls.predictions.transform.dense": ("cls.predictions.transform.transform_act_fn", "gelu"),
    },
    "hf_t5": {
        f"{part}.block.{i}.layer.{j}.DenseReluDense.wi_0": (
            f"{part}.block.{i}.layer.{j}.DenseReluDense.act",
            "gelu_tanh",
        )
        for part, j in (("encoder", 1), ("decoder", 2))
        for i in range(2)
    },
    "hf_vit": {
        f"vit.layers.{i}.mlp.fc1": (f"vit.layers.{i}.mlp.activation_fn", "gelu") for i in range(2)
    },
    "timm_vit": {f"blocks.{i}.mlp.fc1": (f"blocks.{i}.mlp.act", "gelu") for i in range(2)},
    "timm_mixer": {
        f"blocks.{i}.{m}.fc1": (f"blocks.{i}.{m}.act", "gelu")
        for i in range(2)
        for m in ("mlp_tokens", "mlp_channels")
    },
    "timm_convnext": {
        f"stages.{s}.blocks.0.mlp.fc1": (f"stages.{s}.blocks.0.mlp.act", "gelu") for s in range(4)
    },
    "tv_vit": {
        f"encoder.layers.encoder_layer_{i}.mlp.0": (
            f"encoder.layers.encoder_layer_{i}.mlp.1",
            "gelu",
        )
        for i in range(2)
    },
    "tv_swin": {f"features.{k}.0.mlp.0": (f"features.{k}.0.mlp.1", "gelu") for k in (1, 3)},
}


def _build(case: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[case].build()


def _instrumented_pair(case: str) -> tuple[nn.Module, nn.Module]:
    """``(instrumented model, untouched copy with the same weights)``."""
    model = _build(case)
    ref = copy.deepcopy(model)
    out = instrument(model, warn=False)
    assert out is model
    return model, ref


def _batch(case: str, seed: int) -> dict:
    return CASES[case].inputs(torch.Generator().manual_seed(seed))


def _dense_paths(model: nn.Module) -> set[str]:
    """Every dense layer of an untouched model: ``nn.Linear`` (and subclasses), HF ``Conv1D``."""
    return {p for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """Equal to float32 precision: ``rtol`` relative, and ``rtol`` of the tensor's scale."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.detach(), expected.detach(), rtol=rtol, atol=rtol * scale + 1e-12, msg=what
    )


def _grads_equal(model: nn.Module, ref: nn.Module, case: str) -> None:
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert set(got) == set(want), f"{case}: parameter names changed"
    for name, p in want.items():
        q = got[name]
        assert (q.grad is None) == (p.grad is None), f"{case}: {name} grad presence"
        if p.grad is not None:
            _close(q.grad, p.grad, f"{case}: grad of {name}")


# ---------------------------------------------------------------------------------------
# The matrix.

MATRIX = list(CASES)


@pytest.mark.parametrize("case", MATRIX)
def test_outputs_and_gradients_equal_the_untouched_model(case):
    model, ref = _instrumented_pair(case)
    call = CASES[case].call
    # eval(): dropout off (and at 0 anyway)
    model.eval()
    ref.eval()
    batch = _batch(case, 1)
    with torch.no_grad():
        _close(call(model, batch)[0], call(ref, batch)[0], f"{case}: eval() output")
    # train(): every dropout is 0 in these configurations, so the outputs are the same
    model.train()
    ref.train()
    batch = _batch(case, 2)
    out_m, loss_m = call(model, batch)
    out_r, loss_r = call(ref, batch)
    _close(out_m, out_r, f"{case}: train() output")
    _close(loss_m, loss_r, f"{case}: train() loss")
    loss_m.backward()
    loss_r.backward()
    _grads_equal(model, ref, case)


def _capture(ref: nn.Module, paths: list[str], fused: dict[str, str]) -> tuple[dict, list]:
    """Forward and tensor hooks on the untouched model: per dense layer at each path its
    input ``x``, output ``z`` and ``dL/dz``; for a layer the report says is fused with the
    activation module at ``fused[path]``, that module's input and output ``h``."""
    mods = dict(ref.named_modules())
    rec: dict[str, dict[str, list]] = {
        p: {"x": [], "z": [], "dz": {}, "a_in": [], "h": []} for p in paths
    }
    handles = []

    def on_linear(r):
        def hook(_m, args, z):
            i = len(r["z"])
            r["x"].append(args[0].detach())
            r["z"].append(z.detach())
            if z.requires_grad:
                z.register_hook(lambda g: r["dz"].__setitem__(i, g.detach()))

        return hook

    def on_activation(r):
        def hook(_m, args, h):
            r["a_in"].append(args[0].detach())
            r["h"].append(h.detach())

        return hook

    for p in paths:
        handles.append(mods[p].register_forward_hook(on_linear(rec[p])))
        if p in fused:
            handles.append(mods[fused[p]].register_forward_hook(on_activation(rec[p])))
    return rec, handles


def _f64(tensors: list[torch.Tensor]) -> np.ndarray:
    if not tensors:
        return np.zeros(0)
    return np.concatenate([t.double().numpy().ravel() for t in tensors])


def _moments_match(qs, values: np.ndarray, where: str) -> None:
    """A snapshot row's count, mean, var, min and max against float64 numpy."""
    v = values[np.isfinite(values)]
    assert qs.count == v.size, (where, "count", qs.count, v.size)
    if v.size == 0:
        return
    mean, std, var = float(v.mean()), float(v.std()), float(v.var())
    scale = float(np.abs(v).max())
    assert abs(qs.mean - mean) <= 1e-5 * (abs(mean) + std) + 1e-12 * scale, (
        where,
        "mean",
        qs.mean,
        mean,
    )
    assert abs(qs.var - var) <= 1e-4 * var + 1e-12 * scale**2, (where, "var", qs.var, var)
    assert qs.min == pytest.approx(float(v.min()), rel=1e-5, abs=1e-6 * scale), (where, "min")
    assert qs.max == pytest.approx(float(v.max()), rel=1e-5, abs=1e-6 * scale), (where, "max")


@pytest.mark.parametrize("case", MATRIX)
def test_statistics_equal_float64_hooks_on_the_untouched_model(case):
    model, ref = _instrumented_pair(case)
    report = model.fastmlp_report
    stats = stats_of(model)
    paths = stats.names
    assert sorted(paths) == sorted(report.instrumented), (case, paths, str(report))
    fused = {lin: act for lin, act, _ in report.fused}
    rec, handles = _capture(ref, paths, fused)
    model.eval()
    ref.eval()
    stats.reset()
    batch = _batch(case, 3)
    call = CASES[case].call
    loss_m = call(model, batch)[1]
    loss_r = call(ref, batch)[1]
    _close(loss_m, loss_r, f"{case}: loss")
    loss_m.backward()
    loss_r.backward()
    for h in handles:
        h.remove()
    snap = stats.snapshot()
    ref_mods = dict(ref.named_modules())
    n_tied = {}
    for _, p in ref.named_parameters(remove_duplicate=False):
        n_tied[id(p)] = n_tied.get(id(p), 0) + 1
    for path in paths:
        r = rec[path]
        where = f"{case} {path}"
        # An instrumented layer must run as a module: a layer whose weight its parent reads
        # (F.linear(x, self.qkv.weight, ...)) records nothing and belongs in `untouched`.
        assert len(r["z"]) == 1, (
            where,
            f"instrumented but called {len(r['z'])} times in one forward: a layer whose "
            "weight its parent reads (F.linear(x, m.weight)) records nothing: untouched",
        )
        assert sorted(r["dz"]) == [0], (where, "no gradient reached the layer")
        x, z, dz = r["x"][0], r["z"][0], r["dz"][0]
        if path in fused:
            # the report's claim, checked on the untouched model: the activation module
            # took exactly this layer's output, once
            assert len(r["a_in"]) == 1 and torch.equal(r["a_in"][0], z), (
                where,
                f"{fused[path]} is not applied to this layer's output alone",
            )
            h = r["h"]
        else:
            h = [z]  # a lone layer: identity activation
        # dL/dW of this call, in float64 (the copy's weight.grad also holds a tied
        # weight's other uses, e.g. GPT-2's lm_head and wte)
        x2 = x.double().reshape(-1, x.shape[-1])
        dz2 = dz.double().reshape(-1, dz.shape[-1])
        dw = dz2.T @ x2  # [out, in]
        mod = ref_mods[path]
        weight_grad = mod.weight.grad if not isinstance(mod, Conv1D) else mod.weight.grad.T
        if n_tied[id(mod.weight)] == 1:
            _close(dw.float(), weight_grad, f"{where}: float64 dL/dW vs weight.grad", 1e-4)
        expected = {
            "preactivation": _f64([z]),
            "activation": _f64(h),
            "preactivation_grad": _f64([dz]),
            "weight_grad": dw.numpy().ravel(),
        }
        for q, values in expected.items():
            _moments_match(snap[path][q], values, f"{where} {q}")


@pytest.mark.parametrize("case", MATRIX)
def test_three_sgd_steps_train_and_statistics_accumulate(case):
    model, ref = _instrumented_pair(case)
    model.train()
    ref.train()
    opt_m = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt_r = torch.optim.SGD(ref.parameters(), lr=1e-2)
    stats = stats_of(model)
    batch = _batch(case, 4)
    call = CASES[case].call
    quantities = ("preactivation", "activation", "preactivation_grad", "weight_grad")
    losses, counts = [], [{(p, q): 0 for p in stats.names for q in quantities}]
    for step in range(3):
        for opt, m in ((opt_m, model), (opt_r, ref)):
            opt.zero_grad()
            loss = call(m, batch)[1]
            loss.backward()
            opt.step()
            if m is model:
                losses.append(float(loss.detach()))
                loss_m = loss
            else:
                _close(loss_m, loss, f"{case}: loss at step {step}")
        snap = stats.snapshot()
        counts.append({(p, q): snap[p][q].count for p in stats.names for q in quantities})
    with torch.no_grad():
        losses.append(float(call(model, batch)[1]))
        _close(call(model, batch)[1], call(ref, batch)[1], f"{case}: loss after training", 1e-4)
    assert all(math.isfinite(v) for v in losses), (case, losses)
    assert abs(losses[-1] - losses[0]) > 1e-6, (case, "the loss did not change", losses)
    for step, (before, after) in enumerate(zip(counts, counts[1:], strict=False)):
        stuck = [k for k in before if after[k] <= before[k]]
        assert not stuck, (case, f"counts did not grow at step {step}", stuck[:4])


@pytest.mark.parametrize("case", MATRIX)
def test_report_lists_every_dense_layer(case):
    """Every ``nn.Linear`` (or subclass) and HF ``Conv1D`` of the original model is fused,
    lone or untouched (with a reason) in the report: nothing is silently skipped."""
    model = _build(case)
    dense = _dense_paths(model)
    originals = dict(model.named_modules())
    instrument(model, warn=False)
    r = model.fastmlp_report
    fused = [p for p, _, _ in r.fused]
    lone = [p for p, _ in r.lone]
    untouched = [p for p, _ in r.untouched]
    listed = fused + lone + untouched
    assert len(listed) == len(set(listed)), (case, "a layer is listed twice", r)
    assert set(listed) == dense, (
        case,
        "missing from the report:",
        sorted(dense - set(listed)),
        "not dense layers:",
        sorted(set(listed) - dense),
    )
    assert all(why for _, why in r.untouched)
    assert sorted(stats_of(model).names) == sorted(fused + lone), case
    for p in fused + lone:
        assert model.get_submodule(p) is not originals[p], (case, p, "listed but not swapped")
    for p in untouched:
        assert model.get_submodule(p) is originals[p], (case, p)


@pytest.mark.parametrize("case", MATRIX)
def test_activation_modules_of_real_models_are_fused(case):
    """HF's GELUActivation (exact), NewGELUActivation (tanh approximation), SiLUActivation,
    timm's GELU and nn.GELU are fused with the dense layer before them."""
    model, _ = _instrumented_pair(case)
    fused = {lin: (act, name) for lin, act, name in model.fastmlp_report.fused}
    for lin, want in EXPECTED_FUSED[case].items():
        assert fused.get(lin) == want, (case, lin, "expected fused with", want, fused.get(lin))


@pytest.mark.parametrize("case", MATRIX)
def test_instrumented_layers_are_nn_linear(case):
    """Code that looks for ``nn.Linear`` still finds the instrumented layers: isinstance,
    ``model.apply(init_fn)``, weight-decay groups, the attributes and ``extra_repr``. (An
    instrumented HF ``Conv1D``, weight ``[in, out]``, may stay a ``Conv1D`` instead, which
    is what HF's own code, e.g. ``_init_weights``, looks for.)"""
    model = _build(case)
    before = dict(model.named_modules())
    dense_types = (nn.Linear, Conv1D)
    decay_before = {id(m.weight) for m in model.modules() if isinstance(m, dense_types)}
    instrument(model, warn=False)
    layers = {p: model.get_submodule(p) for p in stats_of(model).names}
    assert layers
    for p, layer in layers.items():
        old = before[p]
        assert layer is not old, (case, p, "in stats_of(model).names but not swapped")
        assert layer.weight is old.weight and layer.bias is old.bias, (case, p)
        assert repr(layer)
        if isinstance(old, Conv1D):
            assert isinstance(layer, dense_types), (case, p, type(layer).__mro__)
            assert (layer.nx, layer.nf) == (old.nx, old.nf), (case, p)
            continue
        assert isinstance(layer, nn.Linear), (case, p, type(layer).__mro__)
        n_out, n_in = old.weight.shape
        assert (layer.in_features, layer.out_features) == (n_in, n_out), (case, p)
        text = layer.extra_repr()
        assert f"in_features={n_in}, out_features={n_out}" in text, (case, p, text)
    # minGPT-style weight-decay groups by isinstance(m, nn.Linear) (or HF's Conv1D)
    decay_after = {id(m.weight) for m in model.modules() if isinstance(m, dense_types)}
    assert decay_after == decay_before, (case, "the nn.Linear group changed")

    # an init function applied with model.apply reaches them
    def init_fn(m):
        if isinstance(m, dense_types):
            with torch.no_grad():
                m.weight.copy_(torch.linspace(-0.05, 0.05, m.weight.numel()).view_as(m.weight))
                if m.bias is not None:
                    m.bias.fill_(0.01)

    model.apply(init_fn)
    for p, layer in layers.items():
        w = torch.linspace(-0.05, 0.05, layer.weight.numel()).view_as(layer.weight)
        assert torch.equal(layer.weight.detach(), w), (case, p, "init_fn did not reach it")
        if layer.bias is not None:
            assert torch.all(layer.bias == 0.01), (case, p)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hf_gpt2", "timm_vit", "tv_vit"])
def test_torch_compile_runs_where_the_untouched_model_compiles(case):
    model, ref = _instrumented_pair(case)
    call = CASES[case].call
    batch = _batch(case, 5)
    model.eval()
    ref.eval()
    torch._dynamo.reset()
    try:
        out_r, loss_r = call(torch.compile(ref), batch)
        loss_r.backward()
    except Exception as e:  # noqa: BLE001 - whatever stops the untouched model
        pytest.skip(f"torch.compile of the untouched {case} fails: {type(e).__name__}: {e}"[:300])
    stats = stats_of(model)
    stats.reset()
    out_m, loss_m = call(torch.compile(model), batch)
    loss_m.backward()
    _close(out_m, out_r, f"{case}: compiled output", 1e-4)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (case, name)
    snap = stats.snapshot()
    for p in stats.names:
        assert snap[p]["preactivation"].count > 0, (case, p, "nothing recorded under compile")
        assert snap[p]["weight_grad"].count > 0, (case, p, "no backward recorded under compile")


# ---------------------------------------------------------------------------------------
# The regressions issue 23 names.


@pytest.mark.parametrize(
    "case", ["timm_vit", "tv_swin"], ids=["timm_vit-cls_token", "tv_swin-bias_table"]
)
def test_parameters_read_as_attributes_do_not_break_instrument(case):
    """timm's ViT reads ``self.cls_token``, torchvision's Swin attention
    ``self.relative_position_bias_table``: Parameters, not modules, in the traced graph."""
    model, ref = _instrumented_pair(case)
    assert model.fastmlp_report.instrumented
    batch = _batch(case, 6)
    model.eval()
    ref.eval()
    with torch.no_grad():
        _close(CASES[case].call(model, batch)[0], CASES[case].call(ref, batch)[0], case)


def test_gpt2_conv1d_layers_are_instrumented_in_place():
    """HF GPT-2's dense layers are ``transformers.pytorch_utils.Conv1D`` (weight ``[in,
    out]``): instrumented, holding the same Parameters, checkpoints unchanged, an optimizer
    built before the call keeps training them; ``mlp.c_fc`` fused with NewGELUActivation."""
    model = _build("hf_gpt2")
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # built BEFORE instrument()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1e-2)
    instrument(model, warn=False)
    dense = [
        f"transformer.h.{i}.{p}"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    names = stats_of(model).names
    missing = [p for p in dense if p not in names]
    assert not missing, f"Conv1D layers not instrumented: {missing} (instrumented: {names})"
    for p in dense:  # still found by code looking for dense layers (HF's _init_weights)
        assert isinstance(model.get_submodule(p), (nn.Linear, Conv1D)), p
    fused = {lin: (act, name) for lin, act, name in model.fastmlp_report.fused}
    for i in range(2):
        c_fc = f"transformer.h.{i}.mlp.c_fc"
        assert fused.get(c_fc) == (f"transformer.h.{i}.mlp.act", "gelu_tanh"), fused.get(c_fc)
    # the same Parameter objects, the same state_dict keys and values
    after = dict(model.named_parameters())
    assert list(after) == list(params)
    assert all(after[k] is params[k] for k in params)
    sd = model.state_dict()
    assert list(sd) == list(state)
    for k, v in state.items():
        assert sd[k].shape == v.shape and torch.equal(sd[k], v), k
    ref.load_state_dict(sd, strict=True)
    # the optimizer built before the call holds the model's parameters and trains them
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    batch = _batch("hf_gpt2", 7)
    for m, o in ((model, opt), (ref, opt_ref)):
        m.train()
        o.zero_grad()
        m(**batch).loss.backward()
        o.step()
    for p in dense:
        for k in ("weight", "bias"):
            name = f"{p}.{k}"
            _close(after[name], dict(ref.named_parameters())[name], f"{name} after a step")
            assert not torch.equal(after[name], state[name]), f"{name} did not train"
    snap = stats_of(model).snapshot()
    assert all(snap[p]["weight_grad"].count > 0 for p in dense)


def test_conv1d_on_the_triton_kernels_equals_the_untouched_layers():
    """A Conv1D's weight is used transposed (a strided view, no copy): the kernels (after
    the calibrating first step; CUDA, or the CPU under TRITON_INTERPRET=1) give the
    untouched layers' outputs and gradients, and record the same counts as the CPU path."""
    fused = pytest.importorskip("fastmlp.backends.fused")
    if not fused.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from transformers.activations import NewGELUActivation

    torch.manual_seed(0)
    ref = nn.Sequential(Conv1D(24, 10), NewGELUActivation(), Conv1D(6, 24))
    model = copy.deepcopy(ref)
    instrument(model, backend="triton", warn=False)
    assert [f[2] for f in model.fastmlp_report.fused] == ["gelu_tanh"]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the first step calibrates, the second runs the kernels
        x = torch.randn(3, 5, 10, generator=g)
        up = torch.randn(3, 5, 6, generator=g)
        model.zero_grad()
        ref.zero_grad()
        out, out_ref = model(x), ref(x)
        _close(out, out_ref, "output")
        out.backward(up)
        out_ref.backward(up)
        _grads_equal(model, ref, "conv1d-triton")
    snap = stats_of(model).snapshot()
    assert snap["0"]["weight_grad"].count == 2 * 10 * 24
    assert snap["0"]["activation"].count == 2 * 15 * 24


# Activation modules fastmlp does not know by class.


class TanhLookalike(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 1.001


class SwishBeta(nn.Module):  # x * sigmoid(beta x), beta = 1.5: not SiLU
    def forward(self, x):
        return x * torch.sigmoid(1.5 * x)


class ClampedTanh(nn.Module):  # tanh up to |x| ~ 1.47
    def forward(self, x):
        return torch.clamp(torch.tanh(x), -0.9, 0.9)


class HardTailTanh(nn.Module):  # tanh for |x| < 2.5 (where tanh is within 0.7% of +-1)
    def forward(self, x):
        return torch.where(x.abs() < 2.5, torch.tanh(x), torch.sign(x))


class DoubledTanh(nn.Tanh):  # a subclass of a supported class, forward overridden
    def forward(self, x):
        return 2 * super().forward(x)


class MyTanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


class MyGelu(nn.Module):  # exact GELU
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class MyGeluTanh(nn.Module):  # the tanh approximation (GPT-2's "gelu_new")
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class MySiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def _seq_with(act: nn.Module) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(8, 32), act, nn.Linear(32, 4))
    ref = copy.deepcopy(model)
    instrument(model, warn=False)
    return model, ref


def _same_outputs_and_grads(model: nn.Module, ref: nn.Module, what: str) -> None:
    g = torch.Generator().manual_seed(9)
    x = 3.0 * torch.randn(64, 8, generator=g)  # pre-activations well past |z| = 3
    out_m, out_r = model(x), ref(x)
    _close(out_m, out_r, f"{what}: output")
    out_m.square().mean().backward()
    out_r.square().mean().backward()
    _grads_equal(model, ref, what)


@pytest.mark.parametrize(
    "act",
    [TanhLookalike, SwishBeta, ClampedTanh, HardTailTanh, DoubledTanh],
    ids=lambda c: c.__name__,
)
def test_lookalike_activations_are_not_fused(act):
    model, ref = _seq_with(act())
    _same_outputs_and_grads(model, ref, act.__name__)
    claimed = [f for f in model.fastmlp_report.fused if f[1] == "1"]
    assert not claimed, f"{act.__name__} reported as fused: {claimed}"
    assert type(model[1]) is act  # the module still runs


@pytest.mark.parametrize(
    "act, name",
    [(MyTanh, "tanh"), (MyGelu, "gelu"), (MyGeluTanh, "gelu_tanh"), (MySiLU, "silu")],
    ids=["tanh", "gelu", "gelu_tanh", "silu"],
)
def test_unknown_classes_that_compute_a_supported_activation_are_fused(act, name):
    model, ref = _seq_with(act())
    assert ("0", "1", name) in model.fastmlp_report.fused, str(model.fastmlp_report)
    _same_outputs_and_grads(model, ref, act.__name__)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(16, 8, generator=g)
    stats_of(model).reset()
    model(x)
    z = ref[0](x).detach()
    _moments_match(
        stats_of(model).snapshot()["0"]["activation"], _f64([ref[1](z)]), f"{name} activation"
    )


class TrainingBranch(nn.Module):
    """A state-dependent op between the layer and its activation, only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.Tanh()

    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h * 3
        return self.act(h)


def test_training_mode_branch_between_layer_and_activation():
    """Instrumented in eval() (where fc -> act is a direct pair), then trained: the outputs
    are still act(3 fc(x)), never 3 act(fc(x)) (which leaves tanh's range)."""
    torch.manual_seed(11)
    model = TrainingBranch().eval()
    ref = copy.deepcopy(model)
    instrument(model, warn=False)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(12))
    _close(model(x), ref(x), "eval() output")
    model.train()
    ref.train()
    out_m, out_r = model(x), ref(x)
    assert out_m.abs().max() <= 1.0, "outputs outside tanh's range: the branch ran after it"
    _close(out_m, out_r, "train() output")
    out_m.sum().backward()
    out_r.sum().backward()
    _grads_equal(model, ref, "TrainingBranch")


def test_untouched_layers_have_reasons():
    """``MultiheadAttention.out_proj`` (its parent reads the weight) and a layer with a hook
    stay as they were, in the report with a reason; the hook still fires."""
    fired = []
    hooked = nn.Linear(8, 8)
    hooked.register_forward_hook(lambda m, i, o: fired.append(o.shape))
    model = nn.ModuleDict(
        {
            "attn": nn.MultiheadAttention(8, 2, batch_first=True),
            "hooked": hooked,
            "mlp": nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
        }
    )
    dense = _dense_paths(model)
    out_proj = model["attn"].out_proj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instrument(model)
    r = model.fastmlp_report
    untouched = dict(r.untouched)
    assert set(untouched) == {"attn.out_proj", "hooked"}, r
    assert all(untouched.values())
    assert model["hooked"] is hooked and model["attn"].out_proj is out_proj
    assert {p for p, _, _ in r.fused} | {p for p, _ in r.lone} | set(untouched) == dense
    model["hooked"](torch.randn(2, 8))
    assert fired == [torch.Size([2, 8])]


def test_an_instrumented_gpt2_saves_and_loads_whole():
    """torch.save of the whole model pickles the instrumented Conv1D class by its name
    (fastmlp.layers.InstrumentedConv1D) and loads into the same outputs."""
    import io

    model = _build("hf_gpt2").eval()
    instrument(model, warn=False)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    layer = loaded.transformer.h[0].mlp.c_fc
    assert isinstance(layer, Conv1D) and type(layer).__name__ == "InstrumentedConv1D"
    batch = _batch("hf_gpt2", 3)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
