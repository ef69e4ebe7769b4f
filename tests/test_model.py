"""NeuroMoE network and loss (neuromoe/learn/model.py): shapes, gate, masking, attention, loss, config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from neuromoe.config import schema_defaults
from neuromoe.learn.model import (
    EXPERTS,
    ModelConfig,
    MoEOutput,
    NeuroMoE,
    SelfAttention,
    balance_loss,
    class_weights,
    expert_presence,
    moe_loss,
)

torch.set_num_threads(1)
CH = {"anat": 1, "dwi": 2, "func": 2}


def tiny(**kw: object) -> ModelConfig:
    base = dict(channels=CH, grid=(8, 8, 8), n_clinical=5, n_classes=3, dim=16, depth=1, heads=2, mlp_ratio=2,
                clin_hidden=(8, 6), expert_hidden=8, gate_hidden=8)
    base.update(kw)
    return ModelConfig(**base)


def inputs(cfg: ModelConfig, B: int = 4, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = {m: torch.randn(B, c, *cfg.grid, generator=g) for m, c in CH.items()}
    return images, torch.randn(B, cfg.n_clinical, generator=g)


@pytest.mark.parametrize("experts,use_gate,grid,n_classes", [
    (EXPERTS, True, (8, 8, 8), 3),
    (EXPERTS, False, (8, 16, 12), 2),
    (("anat", "func", "clin"), True, (8, 8, 8), 4),
    (("dwi",), False, (16, 8, 8), 3),
    (("clin",), False, (8, 8, 8), 3),
])
def test_output_shapes_and_gate_is_a_distribution(experts, use_gate, grid, n_classes) -> None:
    cfg = tiny(experts=experts, use_gate=use_gate, grid=grid, n_classes=n_classes)
    model = NeuroMoE(cfg).eval()
    images, clin = inputs(cfg, B=3)
    out = model(images, clin)
    E = len(experts)
    assert out.log_probs.shape == (3, n_classes)
    assert out.gate.shape == (3, E)
    assert out.expert_log_probs.shape == (3, E, n_classes)
    assert torch.all(out.gate >= 0)
    torch.testing.assert_close(out.gate.sum(1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.log_probs.exp().sum(1), torch.ones(3), atol=1e-5, rtol=0)
    # log P_out is the log of the mixture sum_m w_m P_m
    mix = (out.gate.unsqueeze(-1) * out.expert_log_probs.exp()).sum(1)
    torch.testing.assert_close(out.log_probs, mix.log(), atol=1e-5, rtol=0)
    if not use_gate:
        torch.testing.assert_close(out.gate, torch.full((3, E), 1.0 / E))


def test_missing_modality_gets_zero_weight_and_others_renormalise() -> None:
    cfg = tiny()
    model = NeuroMoE(cfg).eval()
    images, clin = inputs(cfg)
    full = model(images, clin)
    present = torch.ones(4, 4, dtype=torch.bool)
    present[1, 2] = False  # subject 1 lacks func
    present[3, 0] = present[3, 1] = False  # subject 3 lacks anat and dwi
    out = model(images, clin, present)
    assert out.gate[1, 2] == 0 and out.gate[3, 0] == 0 and out.gate[3, 1] == 0
    expected = full.gate * present
    expected = expected / expected.sum(1, keepdim=True)  # the gate renormalised over the experts present
    torch.testing.assert_close(out.gate, expected, atol=1e-6, rtol=0)
    # Rows with everything present are unchanged.
    torch.testing.assert_close(out.log_probs[[0, 2]], full.log_probs[[0, 2]])
    # The absent modality's input does not matter, not even NaNs.
    changed = {m: v.clone() for m, v in images.items()}
    changed["func"][1] = torch.randn_like(changed["func"][1]) * 100
    changed["anat"][3] = float("nan")
    changed["dwi"][3] = 0.0
    out2 = model(changed, clin, present)
    torch.testing.assert_close(out2.log_probs, out.log_probs, atol=0, rtol=0)
    torch.testing.assert_close(out2.gate, out.gate, atol=0, rtol=0)


def test_uniform_weights_over_present_experts_without_gate() -> None:
    cfg = tiny(use_gate=False)
    model = NeuroMoE(cfg).eval()
    images, clin = inputs(cfg, B=2)
    present = torch.tensor([[True, True, False, True], [False, True, True, True]])
    out = model(images, clin, present)
    torch.testing.assert_close(out.gate, present.float() / 3)


def test_absent_expert_gets_no_gradient() -> None:
    cfg = tiny(dropout=0.0)
    model = NeuroMoE(cfg).train()
    images, clin = inputs(cfg)
    present = torch.ones(4, 4, dtype=torch.bool)
    present[:, 1] = False  # dwi absent for the whole batch
    loss, _ = moe_loss(model(images, clin, present), torch.tensor([0, 1, 2, 0]), None, 0.1)
    loss.backward()
    dwi_grads = [p.grad for p in model.encoders["dwi"].parameters()]
    assert all(g is None or torch.all(g == 0) for g in dwi_grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders["anat"].parameters())


def test_no_expert_present_is_an_error() -> None:
    cfg = tiny()
    images, clin = inputs(cfg, B=2)
    present = torch.tensor([[True, False, False, False], [False, False, False, False]])
    with pytest.raises(ValueError, match="no expert present"):
        NeuroMoE(cfg)(images, clin, present)


def test_expert_presence_maps_cache_flags_to_experts() -> None:
    flags = torch.tensor([[True, False, True], [False, True, False]])  # anat, dwi, func
    got = expert_presence(flags, ("dwi", "func", "clin"))
    assert got.tolist() == [[False, True, True], [True, False, True]]


def test_sdpa_attention_equals_naive_attention() -> None:
    cfg = tiny(dim=16, heads=4, dropout=0.0, attn_dropout=0.5)  # eval: no attention dropout either
    attn = SelfAttention(cfg).eval()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    attn = attn.double()
    y = attn(x)
    q, k, v = attn.qkv(x).split(16, dim=2)
    q, k, v = (t.view(2, 10, 4, 4).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)  # (B, nh, T, T)
    naive = attn.proj((a @ v).transpose(1, 2).reshape(2, 10, 16))
    torch.testing.assert_close(y, naive, atol=1e-12, rtol=1e-10)


def test_eval_is_deterministic_and_dropout_only_in_training() -> None:
    cfg = tiny(dropout=0.3, attn_dropout=0.3)
    model = NeuroMoE(cfg)
    images, clin = inputs(cfg)
    model.eval()
    a, b = model(images, clin), model(images, clin)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.gate, b.gate)
    model.train()
    c, d = model(images, clin), model(images, clin)
    assert not torch.equal(c.log_probs, d.log_probs)


def test_loss_matches_hand_computation() -> None:
    # Two experts, two classes, three samples; every number written out.
    w = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    p = np.array([[[0.7, 0.3], [0.4, 0.6]],
                  [[0.2, 0.8], [0.5, 0.5]],
                  [[0.9, 0.1], [0.6, 0.4]]])  # (B, E, C)
    y = np.array([0, 1, 0])
    a = np.array([2.0, 0.5])  # class weights
    p_out = (w[:, :, None] * p).sum(1)  # [[0.55, 0.45], [0.23, 0.77], [0.66, 0.34]]
    nll = -np.log(p_out[np.arange(3), y])
    wce = (a[y] * nll).sum() / a[y].sum()
    r = ((w.mean(0) - 0.5) ** 2).mean()
    lam = 0.3
    out = MoEOutput(log_probs=torch.tensor(np.log(p_out)), gate=torch.tensor(w),
                    expert_log_probs=torch.tensor(np.log(p)))
    loss, parts = moe_loss(out, torch.tensor(y), torch.tensor(a), lam)
    assert math.isclose(float(parts["wce"]), wce, rel_tol=1e-12)
    assert math.isclose(float(parts["balance"]), r, rel_tol=1e-12)
    assert math.isclose(float(loss), wce + lam * r, rel_tol=1e-12)
    # Unweighted: the plain mean NLL.
    loss0, _ = moe_loss(out, torch.tensor(y), None, 0.0)
    assert math.isclose(float(loss0), nll.mean(), rel_tol=1e-12)


def test_balance_term_bounds() -> None:
    assert float(balance_loss(torch.full((5, 4), 0.25))) == 0.0
    one_hot = torch.zeros(5, 4)
    one_hot[:, 2] = 1.0
    assert math.isclose(float(balance_loss(one_hot)), 0.1875, rel_tol=1e-7)


def test_class_weights() -> None:
    a = class_weights([0, 0, 1, 2, 0, 1], 3)  # N=6, C=3: a_c = 6 / (3 N_c)
    torch.testing.assert_close(a, torch.tensor([2 / 3, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        class_weights([0, 1, 1], 3)


@pytest.mark.parametrize(("encoder", "pooling"), [("vit", "mean"), ("vit", "flat"), ("cnn", "flat"), ("cnn", "max")])
def test_flop_estimate_matches_torch_flop_counter(encoder: str, pooling: str) -> None:
    cfg = tiny(grid=(16, 16, 16), dim=32, heads=4, pooling=pooling, encoder=encoder, cnn_channels=(4, 8))
    model = NeuroMoE(cfg).eval()
    images, clin = inputs(cfg, B=1)
    # The math backend decomposes attention into matmuls the counter sees (it skips CPU fused kernels).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(images, clin)
    counted = fc.get_total_flops()
    assert abs(model.estimate_flops() - counted) / counted < 0.02, (model.estimate_flops(), counted)
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_paper_defaults() -> None:
    cfg = ModelConfig()
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.patch_size) == (256, 4, 8, 4.0, 4)
    assert cfg.clin_hidden == (128, 64) and cfg.expert_hidden == 128 and cfg.gate_hidden == 64
    assert cfg.n_tokens == 4096 and cfg.pooling == "mean"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["pooling"]  # a model saved before the key existed loads with the paper's pooling
    assert ModelConfig.from_dict(old) == cfg


def test_defaults_are_the_schemas() -> None:
    """Every ModelConfig field that is a ``model.*`` config key defaults to the schema's value; the grid to
    ``cache.grid``'s."""
    cfg = ModelConfig()
    for key, default in schema_defaults("model").items():
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == default, key
    assert list(cfg.grid) == schema_defaults("cache")["grid"]


def test_max_pooling_passes_the_largest_token_and_mean_the_average() -> None:
    torch.manual_seed(0)
    mean_m = NeuroMoE(tiny())
    max_m = NeuroMoE(tiny(pooling="max"))
    max_m.load_state_dict(mean_m.state_dict())  # same weights; pooling has none
    images, _ = inputs(tiny(), B=3)
    enc_mean, enc_max = mean_m.encoders["dwi"].eval(), max_m.encoders["dwi"].eval()
    tokens = []
    enc_mean.ln_f.register_forward_hook(lambda mod, i, o: tokens.append(o))
    with torch.no_grad():
        h_mean, h_max = enc_mean(images["dwi"]), enc_max(images["dwi"])
    torch.testing.assert_close(h_mean, tokens[0].mean(1))
    torch.testing.assert_close(h_max, tokens[0].amax(1))


def test_flat_pooling_reads_every_token_out_by_its_position() -> None:
    torch.manual_seed(0)
    cfg = tiny(pooling="flat", flat_channels=3)
    enc = NeuroMoE(cfg).encoders["dwi"].eval()
    n = cfg.n_tokens
    assert enc.reduce.out_features == 3 and enc.readout.in_features == n * 3  # 8 tokens on the 8^3 grid
    images, _ = inputs(cfg, B=2)
    tokens = []
    enc.ln_f.register_forward_hook(lambda mod, i, o: tokens.append(o))
    with torch.no_grad():
        h = enc(images["dwi"])
        # One readout weight block per token position: swapping two tokens changes the output
        # (mean and max pooling are blind to where a token is).
        t = tokens[0]
        swapped = t[:, [1, 0, *range(2, n)]]
        h_swapped = enc.readout(enc.reduce(swapped).flatten(1))
    assert h.shape == (2, cfg.dim)
    torch.testing.assert_close(h, enc.readout(enc.reduce(t).flatten(1)))
    assert not torch.allclose(h, h_swapped)
    with pytest.raises(ValueError, match="flat_channels must be >= 1"):
        tiny(pooling="flat", flat_channels=0)


@pytest.mark.parametrize("kw,match", [
    ({"grid": (8, 8, 10)}, r"grid \(8, 8, 10\) is not divisible by patch_size 4"),
    ({"heads": 3}, "heads 3 does not divide dim 16"),
    ({"experts": ("anat", "pet")}, r"unknown expert\(s\) \['pet'\]"),
    ({"experts": ("dwi", "anat")}, "canonical order"),
    ({"experts": ()}, "experts is empty"),
    ({"channels": {"anat": 1}}, "expert 'dwi' needs channels"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"n_classes": 1}, "n_classes must be >= 2"),
    ({"n_clinical": 0}, "n_clinical is 0"),
    ({"grid": (8, 8)}, "grid must be 3 positive ints"),
    ({"clin_hidden": ()}, "clin_hidden"),
    ({"pooling": "cls"}, r"pooling must be one of \('mean', 'max', 'flat'\)"),
])
def test_bad_config_raises_value_error_naming_the_value(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['widht'\]"):
        ModelConfig.from_dict({"widht": 3})


def test_wrong_input_shape_is_named() -> None:
    cfg = tiny()
    images, clin = inputs(cfg)
    images["dwi"] = images["dwi"][:, :1]
    with pytest.raises(ValueError, match=r"images\['dwi'\] has shape"):
        NeuroMoE(cfg)(images, clin)


def test_log_space_mixture_is_stable_for_confident_experts() -> None:
    cfg = tiny()
    model = NeuroMoE(cfg).eval()
    images, clin = inputs(cfg, B=2)
    with torch.no_grad():
        model.heads["anat"][-1].bias.copy_(torch.tensor([200.0, -200.0, 0.0]))  # P ~ (1, e^-200, e^-400)
    out = model(images, clin)
    assert torch.isfinite(out.log_probs).all()
    loss, _ = moe_loss(out, torch.tensor([1, 2]), None, 0.1)
    assert torch.isfinite(loss)
    assert F.nll_loss(out.log_probs, torch.tensor([1, 2])) < 20  # the other experts still carry these classes


def test_cnn_encoder_keeps_where_a_focal_change_is_only_with_the_flat_readout() -> None:
    torch.manual_seed(0)
    grid = (32, 16, 16)
    cfg = tiny(grid=grid, encoder="cnn", cnn_channels=(4, 8), pooling="flat")
    model = NeuroMoE(cfg).eval()
    assert cfg.n_tokens == 8 * 4 * 4 and model.encoders["anat"].readout.in_features == 8 * 128
    left, right = torch.zeros(1, 1, *grid), torch.zeros(1, 1, *grid)
    left[..., 8:11, 6:9, 6:9] = 3.0  # the same blob in two places, two pooled cells apart, far from the edges
    right[..., 16:19, 6:9, 6:9] = 3.0
    mean = NeuroMoE(tiny(grid=grid, encoder="cnn", cnn_channels=(4, 8), pooling="mean")).eval()
    with torch.no_grad():
        assert not torch.allclose(model.encoders["anat"](left), model.encoders["anat"](right))  # knows where
        torch.testing.assert_close(mean.encoders["anat"](left), mean.encoders["anat"](right))  # blind to where
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(grid=(12, 12, 10), patch_size=2, encoder="cnn", cnn_channels=(4, 8))
    with pytest.raises(ValueError, match="encoder must be one of"):
        tiny(encoder="resnet")
