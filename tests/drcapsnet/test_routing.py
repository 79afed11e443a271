"""drcapsnet.routing: squash (eq. 1), dynamic routing (Procedure 1) and attention routing, as properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import drcapsnet.routing as routing
from drcapsnet.routing import attention_routing, dynamic_routing, squash

# ---------------------------------------------------------------------------------------------------------- squash


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_squash_length_is_below_one_and_equals_sq_norm_over_one_plus_sq_norm(scale: float) -> None:
    torch.manual_seed(0)
    s = torch.randn(4, 10, 16, dtype=torch.float64) * scale
    v = squash(s)
    sq_norm = (s * s).sum(dim=-1)
    assert v.shape == s.shape
    assert (v.norm(dim=-1) < 1).all()
    torch.testing.assert_close(v.norm(dim=-1), sq_norm / (1 + sq_norm), rtol=1e-6, atol=0)


def test_squash_keeps_direction() -> None:
    torch.manual_seed(0)
    s = torch.randn(4, 10, 16)
    torch.testing.assert_close(F.normalize(squash(s), dim=-1), F.normalize(s, dim=-1))


def test_squash_acts_along_the_given_dim() -> None:
    torch.manual_seed(0)
    s = torch.randn(3, 8, 5)
    torch.testing.assert_close(squash(s, dim=1), squash(s.transpose(1, 2)).transpose(1, 2))


def test_zero_vector_squashes_to_exactly_zero_with_a_finite_gradient() -> None:
    s = torch.zeros(2, 3, 8, requires_grad=True)
    v = squash(s)
    assert torch.equal(v, torch.zeros(2, 3, 8))
    (v * torch.randn(2, 3, 8)).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_zero_rows_beside_nonzero_rows_keep_finite_gradients() -> None:
    torch.manual_seed(0)
    s = torch.randn(4, 8)
    s[1] = 0.0
    s.requires_grad_(True)
    v = squash(s)
    assert torch.equal(v[1], torch.zeros(8))
    v.pow(2).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("scale", [1e3, 1e6, 1e12])
def test_very_large_vectors_squash_to_length_close_to_one(scale: float) -> None:
    torch.manual_seed(0)
    s = (torch.randn(4, 16) * scale).requires_grad_(True)
    v = squash(s)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)
    v.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------------------- dynamic routing


def naive_squash(s: Tensor) -> Tensor:
    """Eq. 1 written out for one vector: |s|^2 / (1 + |s|^2) * s / |s|."""
    sq_norm = float((s * s).sum())
    return sq_norm / (1.0 + sq_norm) * s / math.sqrt(sq_norm)


def naive_dynamic_routing(u_hat: Tensor, num_iterations: int) -> tuple[Tensor, Tensor]:
    """Procedure 1 of Sabour et al. 2017, one example, one child, one parent at a time."""
    batch, n_in, n_out, dim = u_hat.shape
    v_all = torch.zeros(batch, n_out, dim, dtype=u_hat.dtype)
    c_all = torch.zeros(batch, n_in, n_out, dtype=u_hat.dtype)
    for b in range(batch):
        logits = [[0.0] * n_out for _ in range(n_in)]                 # b_ij <- 0
        for _ in range(num_iterations):
            c = [[0.0] * n_out for _ in range(n_in)]
            for i in range(n_in):                                      # c_i <- softmax(b_i) over parents
                denom = sum(math.exp(logits[i][k]) for k in range(n_out))
                for j in range(n_out):
                    c[i][j] = math.exp(logits[i][j]) / denom
            v = []
            for j in range(n_out):                                     # s_j <- sum_i c_ij u_hat_j|i; v_j <- squash(s_j)
                s_j = torch.zeros(dim, dtype=u_hat.dtype)
                for i in range(n_in):
                    s_j = s_j + c[i][j] * u_hat[b, i, j]
                v.append(naive_squash(s_j))
            for i in range(n_in):                                      # b_ij <- b_ij + u_hat_j|i . v_j
                for j in range(n_out):
                    logits[i][j] += float(torch.dot(u_hat[b, i, j], v[j]))
        for j in range(n_out):
            v_all[b, j] = v[j]
        for i in range(n_in):
            for j in range(n_out):
                c_all[b, i, j] = c[i][j]
    return v_all, c_all


@pytest.mark.parametrize("num_iterations", [1, 2, 3, 5])
def test_couplings_sum_to_one_over_parents_for_every_child(num_iterations: int) -> None:
    torch.manual_seed(0)
    u_hat = torch.randn(2, 7, 4, 5)
    _, c = dynamic_routing(u_hat, num_iterations)
    assert c.shape == (2, 7, 4)
    assert (c >= 0).all()
    torch.testing.assert_close(c.sum(dim=2), torch.ones(2, 7))


@pytest.mark.parametrize("num_iterations", [2, 3])
def test_couplings_are_computed_per_example(num_iterations: int) -> None:
    torch.manual_seed(0)
    u_hat = torch.randn(2, 7, 4, 5)
    _, c = dynamic_routing(u_hat, num_iterations)
    assert not torch.allclose(c[0], c[1], atol=1e-3), "both examples of the batch got the same couplings"
    # and each example's couplings are those it would get alone
    for b in range(2):
        _, c_alone = dynamic_routing(u_hat[b : b + 1], num_iterations)
        torch.testing.assert_close(c[b : b + 1], c_alone)


def test_one_iteration_is_uniform_coupling() -> None:
    torch.manual_seed(0)
    n_out = 3
    u_hat = torch.randn(2, 6, n_out, 4, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 1)
    torch.testing.assert_close(v, squash(u_hat.sum(dim=1) / n_out))
    torch.testing.assert_close(c, torch.full((2, 6, n_out), 1 / n_out, dtype=torch.float64))


@pytest.mark.parametrize("fn", [dynamic_routing, attention_routing], ids=["dynamic", "attention"])
@pytest.mark.parametrize("num_iterations", [1, 2, 3, 4, 5])
def test_number_of_squash_passes_equals_iterations(monkeypatch: pytest.MonkeyPatch, fn, num_iterations: int) -> None:
    calls: list[int] = []

    def counting_squash(s: Tensor, *args, **kwargs) -> Tensor:
        calls.append(1)
        return squash(s, *args, **kwargs)

    monkeypatch.setattr(routing, "squash", counting_squash)
    torch.manual_seed(0)
    fn(torch.randn(2, 6, 3, 4), num_iterations)
    assert len(calls) == num_iterations


@pytest.mark.parametrize("num_iterations", [1, 2, 3])
def test_vectorised_routing_matches_naive_procedure_1(num_iterations: int) -> None:
    torch.manual_seed(0)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, num_iterations)
    v_ref, c_ref = naive_dynamic_routing(u_hat, num_iterations)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)


def _routing_grad(u_hat: Tensor, w: Tensor, num_iterations: int, detach: bool) -> tuple[Tensor, Tensor]:
    leaf = u_hat.clone().requires_grad_(True)
    v, _ = dynamic_routing(leaf, num_iterations, detach=detach)
    (v * w).sum().backward()
    assert leaf.grad is not None
    return v.detach(), leaf.grad


@pytest.mark.parametrize("num_iterations", [2, 3])
def test_detach_keeps_forward_values_but_changes_gradients(num_iterations: int) -> None:
    torch.manual_seed(0)
    u_hat, w = torch.randn(2, 6, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    v_detached, g_detached = _routing_grad(u_hat, w, num_iterations, detach=True)
    v_full, g_full = _routing_grad(u_hat, w, num_iterations, detach=False)
    torch.testing.assert_close(v_detached, v_full)
    assert torch.isfinite(g_detached).all() and torch.isfinite(g_full).all()
    assert not torch.allclose(g_detached, g_full, atol=1e-6), "detach=True/False gave the same gradients"


def test_detach_makes_no_difference_with_one_iteration() -> None:
    torch.manual_seed(0)
    u_hat, w = torch.randn(2, 6, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    v_detached, g_detached = _routing_grad(u_hat, w, 1, detach=True)
    v_full, g_full = _routing_grad(u_hat, w, 1, detach=False)
    torch.testing.assert_close(v_detached, v_full)
    torch.testing.assert_close(g_detached, g_full)


@pytest.mark.parametrize("fn", [dynamic_routing, attention_routing], ids=["dynamic", "attention"])
def test_zero_iterations_is_rejected_with_the_config_path(fn) -> None:
    with pytest.raises(ValueError, match=r"routing_iterations.*got 0"):
        fn(torch.randn(1, 2, 2, 3), 0)


# ----------------------------------------------------------------------------------------------- attention routing


def naive_attention_routing(
    u_hat: Tensor, num_iterations: int, prior: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """The docstring's formulas, written directly: a_ij = exp(b_ij) / (sum_k exp(b_ik) + eps) (fine at small b)."""
    dim = u_hat.shape[-1]
    q = u_hat.sum(dim=1)                                                   # (B, N_out, D) plain sum of votes
    for _ in range(num_iterations):
        logits = (u_hat * q.unsqueeze(1)).sum(dim=-1) / math.sqrt(dim)     # (B, N_in, N_out)
        if prior is not None:
            logits = logits + prior
        e = torch.exp(logits)
        a = e / (e.sum(dim=2, keepdim=True) + eps)
        v = torch.stack([naive_squash(s) for s in (a.unsqueeze(-1) * u_hat).sum(dim=1).reshape(-1, dim)])
        q = v.reshape(q.shape)
    return q, a


@pytest.mark.parametrize("num_iterations", [1, 2, 3])
@pytest.mark.parametrize("with_prior", [False, True])
def test_attention_coupling_matches_the_direct_formula(num_iterations: int, with_prior: bool) -> None:
    torch.manual_seed(0)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 0.3
    prior = torch.randn(5, 3, dtype=torch.float64) if with_prior else None
    v, a = attention_routing(u_hat, num_iterations, prior=prior)
    v_ref, a_ref = naive_attention_routing(u_hat, num_iterations, prior=prior)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(v, v_ref)


def test_attention_couplings_sum_to_less_than_one() -> None:
    torch.manual_seed(0)
    _, a = attention_routing(torch.randn(2, 7, 4, 5, dtype=torch.float64), 3)
    assert (a > 0).all()
    assert (a.sum(dim=2) < 1).all()


def test_attention_couplings_sum_close_to_one_for_large_agreement() -> None:
    torch.manual_seed(0)
    direction = F.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    u_hat = (100.0 * direction).expand(2, 6, 3, 4).clone()                   # every child agrees with every parent
    _, a = attention_routing(u_hat, 3)
    torch.testing.assert_close(a.sum(dim=2), torch.ones(2, 6, dtype=torch.float64), rtol=0, atol=1e-9)


def test_attention_lets_a_dissenting_child_abstain() -> None:
    torch.manual_seed(0)
    direction = F.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    u_hat = (100.0 * direction).expand(1, 6, 3, 4).clone()
    u_hat[:, 5] = -u_hat[:, 5]                                                # child 5 disagrees with every parent
    _, a = attention_routing(u_hat, 3)
    assert (a[:, 5].sum(dim=-1) < 1e-6).all()
    assert (a[:, :5].sum(dim=-1) > 0.99).all()


@pytest.mark.parametrize("with_prior", [False, True])
def test_attention_is_finite_for_huge_logits(with_prior: bool) -> None:
    torch.manual_seed(0)
    u_hat = (torch.randn(2, 8, 3, 4) * 1e4).requires_grad_(True)
    prior = torch.zeros(8, 3, requires_grad=True) if with_prior else None
    v, a = attention_routing(u_hat, 3, prior=prior)
    assert torch.isfinite(v).all() and torch.isfinite(a).all()
    (v.sum() + a.sum()).backward()
    assert u_hat.grad is not None and torch.isfinite(u_hat.grad).all()
    if prior is not None:
        assert prior.grad is not None and torch.isfinite(prior.grad).all()


def test_attention_prior_on_a_parent_increases_its_coupling() -> None:
    torch.manual_seed(0)
    u_hat = torch.randn(2, 6, 3, 4)
    prior = torch.zeros(6, 3)
    prior[:, 0] = 2.0
    _, a_plain = attention_routing(u_hat, 1)
    _, a_prior = attention_routing(u_hat, 1, prior=prior)
    assert (a_prior[:, :, 0] > a_plain[:, :, 0]).all()
    _, a_plain3 = attention_routing(u_hat, 3)
    _, a_prior3 = attention_routing(u_hat, 3, prior=prior)
    assert a_prior3[:, :, 0].mean() > a_plain3[:, :, 0].mean()
