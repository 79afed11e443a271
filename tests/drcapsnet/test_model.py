"""drcapsnet.model: parameter counts, capsule layout, shapes, gradients, masking and votes, on the tiny preset."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import drcapsnet.routing as routing
from drcapsnet.config import model_preset
from drcapsnet.losses import capsnet_loss
from drcapsnet.model import CapsNet, CapsNetClassifier, DigitCaps, PrimaryCaps, count_parameters
from drcapsnet.routing import squash


def _images(cfg, batch: int = 2) -> Tensor:
    return torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size)


def _trained_scale(model: CapsNet) -> CapsNet:
    """At init the class capsules are ~1e-4 long (W ~ N(0, 0.01^2)), so masking and routing barely move the
    outputs; scale the votes up as training does, so that the capsules have lengths of order 0.1-1."""
    with torch.no_grad():
        model.digits.weight.mul_(100.0)
    return model


def test_paper_preset_has_the_papers_parameter_counts() -> None:
    assert count_parameters(CapsNet(model_preset("paper"))) == 8_215_568
    assert count_parameters(CapsNet(model_preset("paper", decoder=False))) == 6_804_224


def test_primary_capsules_hold_the_channel_group_of_one_position() -> None:
    torch.manual_seed(0)
    types, dim = 4, 5                                       # types != dim so a transposed layout cannot pass
    layer = PrimaryCaps(in_channels=3, types=types, dim=dim, kernel=3, stride=2)
    x = torch.randn(2, 3, 9, 9)
    capsules = layer(x)                                     # (B, types*G*G, dim)
    conv_out = layer.conv(x)                                # (B, types*dim, G, G)
    grid = conv_out.shape[-1]
    assert grid == 4 and capsules.shape == (2, types * grid * grid, dim)
    for b in range(2):
        for t in range(types):
            for y in range(grid):
                for x_ in range(grid):
                    expected = squash(conv_out[b, t * dim : (t + 1) * dim, y, x_])
                    torch.testing.assert_close(capsules[b, t * grid * grid + y * grid + x_], expected)


@pytest.mark.parametrize(("in_channels", "image_size", "num_primary"), [(1, 28, 400), (3, 32, 576)],
                         ids=["28x28-gray", "32x32-rgb"])
def test_gray_and_rgb_inputs_give_the_documented_shapes(in_channels: int, image_size: int, num_primary: int) -> None:
    # tiny preset: conv 5x5 -> 24 (28) or 28 (32); primary 5x5/2 -> grid 10 or 12; 4 types -> 400 or 576 capsules
    torch.manual_seed(0)
    cfg = model_preset("tiny", in_channels=in_channels, image_size=image_size)
    model = CapsNet(cfg).eval()
    with torch.no_grad():
        out = model(_images(cfg, batch=3))
    k, units = cfg.num_classes, cfg.units
    assert out.lengths.shape == (3, k)
    assert out.capsules.shape == (3, k, units)
    assert out.reconstruction is not None
    assert out.reconstruction.shape == (3, in_channels * image_size * image_size)
    assert cfg.num_primary_capsules == num_primary
    assert out.coupling.shape == (3, num_primary, k)
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()
    assert ((out.reconstruction >= 0) & (out.reconstruction <= 1)).all()


@pytest.mark.parametrize("overrides", [{"routing": "dynamic"}, {"routing": "attention", "attention_prior": True}],
                         ids=["dynamic", "attention"])
def test_every_parameter_gets_a_gradient(overrides: dict) -> None:
    torch.manual_seed(0)
    cfg = model_preset("tiny", **overrides)
    model = CapsNet(cfg).train()
    x, y = _images(cfg, batch=4), torch.tensor([0, 1, 2, 3])
    out = model(x, y)
    capsnet_loss(out.lengths, out.reconstruction, x, y, cfg.reconstruction_weight).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    non_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing and not non_finite and not zero, f"no grad: {missing}; non-finite: {non_finite}; zero: {zero}"
    if cfg.routing == "attention":
        assert "digits.prior" in dict(model.named_parameters())


def test_training_reconstruction_is_masked_by_the_label() -> None:
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    model = _trained_scale(CapsNet(cfg)).train()
    x = _images(cfg)
    with torch.no_grad():
        rec_a = model(x, torch.tensor([0, 0])).reconstruction
        rec_b = model(x, torch.tensor([1, 1])).reconstruction
    assert rec_a is not None and rec_b is not None
    assert not torch.allclose(rec_a, rec_b), "the label did not change the training reconstruction"


def test_eval_reconstruction_is_masked_by_the_longest_capsule_whatever_the_label() -> None:
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    model = _trained_scale(CapsNet(cfg))
    x = _images(cfg)
    with torch.no_grad():
        model.eval()
        out_none = model(x)
        out_a, out_b = model(x, torch.tensor([0, 0])), model(x, torch.tensor([1, 1]))
        model.train()                                        # no dropout / batch norm: same forward, label mask
        longest = model(x, out_none.lengths.argmax(dim=1))
    torch.testing.assert_close(out_a.reconstruction, out_none.reconstruction)
    torch.testing.assert_close(out_b.reconstruction, out_none.reconstruction)
    torch.testing.assert_close(longest.reconstruction, out_none.reconstruction)


def test_digit_caps_votes_equal_a_broadcast_reference() -> None:
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    layer = DigitCaps(cfg).double()
    n_in, d_in, k, d_out = cfg.num_primary_capsules, cfg.primary_dim, cfg.num_classes, cfg.units
    u = torch.randn(3, n_in, d_in, dtype=torch.float64)
    w = layer.weight.view(n_in, d_in, k, d_out)                              # W_ij = w[i, :, j, :]
    # u_hat[b, i, j, :] = u[b, i, :] @ W_ij
    reference = (u[:, :, :, None, None] * w[None]).sum(dim=2)               # (B, N_in, K, D_out)
    torch.testing.assert_close(layer.votes(u), reference)


def test_digit_caps_weight_init_std_is_about_0_01() -> None:
    torch.manual_seed(0)
    weight = DigitCaps(model_preset("paper")).weight
    assert weight.numel() == 1152 * 8 * 10 * 16
    assert abs(weight.std().item() - 0.01) < 0.05 * 0.01
    assert abs(weight.mean().item()) < 1e-4


@pytest.mark.parametrize("units", [8, 12])
def test_units_set_the_class_capsule_dimension(units: int) -> None:
    torch.manual_seed(0)
    cfg = model_preset("tiny", units=units)
    with torch.no_grad():
        out = CapsNet(cfg).eval()(_images(cfg))
    assert out.capsules.shape == (2, cfg.num_classes, units)


@pytest.mark.parametrize("routing_kind", ["dynamic", "attention"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_iterations_from_the_config_are_used(monkeypatch: pytest.MonkeyPatch, routing_kind: str,
                                                     iterations: int) -> None:
    calls: list[int] = []

    def counting_squash(s: Tensor, *args, **kwargs) -> Tensor:
        calls.append(1)
        return squash(s, *args, **kwargs)

    monkeypatch.setattr(routing, "squash", counting_squash)                  # routing's squash, not PrimaryCaps'
    torch.manual_seed(0)
    cfg = model_preset("tiny", routing=routing_kind, routing_iterations=iterations)
    with torch.no_grad():
        CapsNet(cfg).eval()(_images(cfg))
    assert len(calls) == iterations


def test_routing_iterations_change_the_output() -> None:
    x = _images(model_preset("tiny"))
    lengths = []
    for iterations in (1, 3):
        torch.manual_seed(0)                                                 # same weights for both models
        model = _trained_scale(CapsNet(model_preset("tiny", routing_iterations=iterations))).eval()
        with torch.no_grad():
            lengths.append(model(x).lengths)
    assert not torch.allclose(lengths[0], lengths[1])


def test_classifier_returns_the_capsnet_lengths_in_eval_mode() -> None:
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    capsnet = CapsNet(cfg).eval()
    classifier = CapsNetClassifier(capsnet).eval()
    x = _images(cfg, batch=3)
    with torch.no_grad():
        out = classifier(x)
        expected = capsnet(x).lengths
    assert isinstance(out, Tensor) and out.shape == (3, cfg.num_classes)
    torch.testing.assert_close(out, expected)


def test_model_without_decoder_returns_no_reconstruction() -> None:
    torch.manual_seed(0)
    cfg = model_preset("tiny", decoder=False)
    with torch.no_grad():
        out = CapsNet(cfg).eval()(_images(cfg))
    assert out.reconstruction is None and out.lengths.shape == (2, cfg.num_classes)
