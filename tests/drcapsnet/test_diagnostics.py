"""drcapsnet.diagnostics: properties of the capsule diagnostics on small real CapsNets (no training needed)."""

from __future__ import annotations

import math

import pytest
import torch

from drcapsnet.config import model_preset
from drcapsnet.diagnostics import (
    PERTURBATIONS,
    capsule_lengths,
    coupling_entropy,
    coupling_entropy_per_iteration,
    coupling_per_iteration,
    perturbation_grid,
    reconstructions,
)
from drcapsnet.model import CapsNet


def _model(**overrides: object) -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(model_preset("tiny", **overrides)).eval()


def _batch(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("routing", ["dynamic", "attention"])
def test_entropy_per_iteration_is_finite_and_within_zero_and_log_k(routing: str) -> None:
    model = _model(routing=routing, routing_iterations=3, attention_prior=routing == "attention")
    h = coupling_entropy_per_iteration(model, _batch())
    assert h.shape == (3, 5)
    assert torch.isfinite(h).all()
    assert (h >= 0).all() and (h <= math.log(10) + 1e-5).all()


def test_first_dynamic_routing_iteration_is_uniform_and_later_ones_sharpen() -> None:
    model = _model(routing_iterations=3)
    with torch.no_grad():                 # votes big enough for agreement to matter, as after training
        model.digits.weight.mul_(30)
    h = coupling_entropy_per_iteration(model, _batch())
    torch.testing.assert_close(h[0], torch.full((5,), math.log(10)))
    assert (h[1] < h[0]).all() and (h[2] < h[1]).all()


def test_last_iteration_couplings_are_the_models_own() -> None:
    model = _model(routing_iterations=3)
    x = _batch()
    per_iteration = coupling_per_iteration(model, x)
    assert len(per_iteration) == 3 and all(c.shape == (5, model.cfg.num_primary_capsules, 10) for c in per_iteration)
    with torch.no_grad():
        torch.testing.assert_close(per_iteration[-1], model(x).coupling)


def test_entropy_of_one_hot_is_zero_and_of_uniform_is_log_k() -> None:
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 3]), 4).float()
    torch.testing.assert_close(coupling_entropy(one_hot), torch.zeros(2))
    torch.testing.assert_close(coupling_entropy(torch.full((2, 4), 0.1)), torch.full((2,), math.log(4)))  # rescaled


def test_capsule_lengths_are_probabilities_of_each_class() -> None:
    lengths = capsule_lengths(_model(), _batch())
    assert lengths.shape == (5, 10) and (lengths >= 0).all() and (lengths < 1).all()


def test_reconstructions_have_the_inputs_shape_and_range() -> None:
    x = _batch()
    r = reconstructions(_model(), x)
    assert r.shape == x.shape and (r >= 0).all() and (r <= 1).all()


def test_perturbation_grid_is_16_dims_by_11_steps_and_its_zero_column_is_the_reconstruction() -> None:
    model = _model(units=16)                              # the paper's 16-dimensional class capsules
    x = _batch(3)
    grid = perturbation_grid(model, x)
    assert grid.shape == (3, 16, 11, 1, 28, 28)
    torch.testing.assert_close(PERTURBATIONS, torch.linspace(-0.25, 0.25, 11))
    middle = grid[:, :, 5]                                # delta 0: every row decodes the unmoved capsule
    torch.testing.assert_close(middle, reconstructions(model, x).unsqueeze(1).expand_as(middle))
    # moving a dimension changes the image, and moving it further changes it more
    moved = (grid - middle.unsqueeze(2)).abs().flatten(3).sum(-1)    # (B, D, S)
    assert (moved[:, :, 0] > moved[:, :, 4]).all() and (moved[:, :, 10] > moved[:, :, 6]).all()


def test_perturbation_moves_only_the_predicted_capsule() -> None:
    model = _model(units=4)
    x = _batch(2)
    with torch.no_grad():
        out = model(x)
    grid = perturbation_grid(model, x, deltas=torch.tensor([0.2]))
    pred = out.lengths.argmax(1)
    for b in range(2):
        for d in range(4):
            caps = out.capsules[b].clone()
            caps[pred[b], d] += 0.2
            with torch.no_grad():
                expected = model.decoder(caps.unsqueeze(0), pred[b:b + 1]).view(1, 28, 28)
            torch.testing.assert_close(grid[b, d, 0], expected)


def test_a_model_without_decoder_is_refused_with_the_reason() -> None:
    model = _model(decoder=False)
    with pytest.raises(ValueError, match="no decoder"):
        reconstructions(model, _batch())
    with pytest.raises(ValueError, match="no decoder"):
        perturbation_grid(model, _batch())
