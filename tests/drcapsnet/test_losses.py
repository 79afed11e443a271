"""drcapsnet.losses: margin loss (eq. 4) and reconstruction loss (section 4.1) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from drcapsnet.losses import capsnet_loss, margin_loss, reconstruction_loss


def test_margin_loss_matches_a_hand_computed_example() -> None:
    lengths = torch.tensor([[0.95, 0.05, 0.3], [0.2, 0.8, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # m+ = 0.9, m- = 0.1, lambda = 0.5; present: max(0, 0.9 - |v|)^2, absent: 0.5 * max(0, |v| - 0.1)^2
    # row 0 (label 0): present 0.95 -> 0;  absent 0.05 -> 0;  absent 0.3 -> 0.5 * 0.2^2 = 0.02   => 0.02
    # row 1 (label 1): absent 0.2 -> 0.5 * 0.1^2 = 0.005;  present 0.8 -> 0.1^2 = 0.01;  absent 0.1 -> 0  => 0.015
    # summed over classes, averaged over the batch: (0.02 + 0.015) / 2 = 0.0175
    loss = margin_loss(lengths, labels)
    torch.testing.assert_close(loss, torch.tensor(0.0175, dtype=torch.float64))


def test_margin_loss_is_zero_when_lengths_clear_the_margins() -> None:
    lengths = torch.tensor([[0.9, 0.1, 0.0], [0.05, 1.0, 0.1], [0.0, 0.02, 0.99]])
    labels = torch.tensor([0, 1, 2])
    assert margin_loss(lengths, labels).item() == 0.0


def test_margin_loss_is_positive_when_a_margin_is_missed() -> None:
    labels = torch.tensor([0])
    assert margin_loss(torch.tensor([[0.89, 0.0]]), labels) > 0        # target too short
    assert margin_loss(torch.tensor([[0.95, 0.11]]), labels) > 0       # another class too long


def test_margin_loss_is_non_negative_and_finite_on_random_lengths() -> None:
    torch.manual_seed(0)
    lengths = torch.rand(8, 10)
    loss = margin_loss(lengths, torch.randint(0, 10, (8,)))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss >= 0


def test_reconstruction_loss_is_per_image_sum_of_squares_averaged_over_batch() -> None:
    images = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]], [[[0.0, 0.0], [0.0, 0.0]]]])    # (B=2, C=1, H=2, W=2)
    reconstruction = torch.tensor([[0.5, 1.0, 0.0, 0.5], [1.0, 1.0, 0.0, 0.0]])         # (B, C*H*W)
    # image 0: 0.5^2 + 0 + 0.5^2 + 0 = 0.5;  image 1: 1 + 1 + 0 + 0 = 2.0;  mean over the batch = 1.25
    torch.testing.assert_close(reconstruction_loss(reconstruction, images), torch.tensor(1.25))


def test_reconstruction_loss_is_zero_for_a_perfect_reconstruction() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 4, 4)
    assert reconstruction_loss(images.flatten(1).clone(), images).item() == 0.0


@pytest.mark.parametrize("weight", [0.0005, 0.5, 1.0])
def test_capsnet_loss_is_margin_plus_weighted_reconstruction(weight: float) -> None:
    torch.manual_seed(0)
    lengths, labels = torch.rand(4, 10), torch.randint(0, 10, (4,))
    images, reconstruction = torch.rand(4, 1, 5, 5), torch.rand(4, 25)
    expected = margin_loss(lengths, labels) + weight * reconstruction_loss(reconstruction, images)
    torch.testing.assert_close(capsnet_loss(lengths, reconstruction, images, labels, weight), expected)


def test_capsnet_loss_with_weight_zero_or_no_decoder_is_the_margin_loss() -> None:
    torch.manual_seed(0)
    lengths, labels = torch.rand(4, 10), torch.randint(0, 10, (4,))
    images, reconstruction = torch.rand(4, 1, 5, 5), torch.rand(4, 25)
    margin = margin_loss(lengths, labels)
    torch.testing.assert_close(capsnet_loss(lengths, reconstruction, images, labels, 0.0), margin)
    torch.testing.assert_close(capsnet_loss(lengths, None, images, labels, 0.0005), margin)
