"""The exploration penalty: weights c (1 on A, 1/D on B \\ A, 0 outside B), its value and its exact gradient."""

from __future__ import annotations

import pytest
import torch

from lightning_topkast.regularizer import (
    DECOUPLED_PENALTY,
    PENALTY,
    penalty,
    penalty_grad,
    penalty_weights,
    resolve_penalty,
)
from lightning_topkast.selection import count, forward_backward_sets

T, F = True, False


def test_penalty_weights_literal() -> None:
    a = torch.tensor([T, F, F])
    b = torch.tensor([T, T, F])
    assert torch.equal(penalty_weights(a, b, 0.25), torch.tensor([1.0, 4.0, 0.0]))


def test_penalty_weights_literal_2d() -> None:
    a = torch.tensor([[T, F], [F, F], [F, T]])
    b = torch.tensor([[T, T], [F, T], [F, T]])
    assert torch.equal(penalty_weights(a, b, 0.5), torch.tensor([[1.0, 2.0], [0.0, 2.0], [0.0, 1.0]]))


def test_penalty_weights_without_exploration_set() -> None:
    a = torch.tensor([T, F, T, F])
    assert torch.equal(penalty_weights(a, a.clone(), 0.5), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    everything = torch.ones(3, dtype=torch.bool)
    assert torch.equal(penalty_weights(everything, everything, 1.0), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_penalty_weights_from_float_masks_equal_those_from_bool_masks(dtype: torch.dtype) -> None:
    a, b = forward_backward_sets(torch.randn(37, 11, generator=torch.Generator().manual_seed(3)), 0.3, 0.7)
    expected = penalty_weights(a, b, 0.3, dtype)
    assert torch.equal(penalty_weights(a.to(dtype), b.to(dtype), 0.3, dtype), expected)
    assert torch.equal(penalty_weights(a.half(), b.half(), 0.3, dtype), expected)  # masks narrower than dtype
    assert sorted(expected.unique().tolist()) == [0.0, 1.0, torch.tensor(1 / 0.3, dtype=dtype).item()]


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_penalty_weights_reject_bad_density(density: float) -> None:
    with pytest.raises(ValueError, match=rf"forward_density must be in \(0, 1\], got {density}"):
        penalty_weights(torch.tensor([T]), torch.tensor([T]), density)


def test_penalty_literal() -> None:
    a, b = torch.tensor([T, F, F]), torch.tensor([T, T, F])
    theta = torch.tensor([2.0, 1.0, 5.0])
    # 0.1 / 2 * (1 * 4 + 2 * 1 + 0 * 25) = 0.3
    value = penalty(theta, a, b, 0.5, strength=0.1)
    assert value.shape == ()
    assert value.item() == pytest.approx(0.3, rel=1e-6)


def test_penalty_grad_literal() -> None:
    a, b = torch.tensor([T, F, F, T]), torch.tensor([T, T, F, T])
    theta = torch.tensor([2.0, -1.0, 5.0, -0.5])
    # 0.5 * c * θ with c = [1, 4, 0, 1]: exact in binary
    assert torch.equal(penalty_grad(theta, a, b, 0.25, strength=0.5), torch.tensor([1.0, -2.0, 0.0, -0.25]))


def _autograd_penalty_grad(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d: float, strength: float):
    """The penalty λ/2 Σ c θ² built with autograd from c; returns (value, dθ)."""
    leaf = theta.detach().clone().requires_grad_(True)
    c = torch.where(a, 1.0, torch.where(b, 1.0 / d, 0.0)).to(theta.dtype)
    value = 0.5 * strength * (c * leaf * leaf).sum()
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("d", "dm"), [(0.1, 0.3), (0.25, 0.5), (0.5, 0.5), (0.2, 1.0), (1.0, 1.0), (1 / 3, 2 / 3)])
def test_penalty_grad_is_the_autograd_gradient_of_penalty(dtype: torch.dtype, d: float, dm: float) -> None:
    theta = torch.randn(6, 5, generator=torch.Generator().manual_seed(7), dtype=dtype)
    a, b = forward_backward_sets(theta, d, dm)
    strength = 3e-2
    value, expected = _autograd_penalty_grad(theta, a, b, d, strength)
    got = penalty_grad(theta, a, b, d, strength)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0.0)
    torch.testing.assert_close(penalty(theta, a, b, d, strength), value, rtol=1e-6, atol=0.0)
    # the weights are the package's own c
    assert torch.equal(penalty_weights(a, b, d).to(dtype), torch.where(a, 1.0, torch.where(b, 1.0 / d, 0.0)).to(dtype))


@pytest.mark.parametrize(("d", "dm"), [(0.1, 0.3), (0.25, 0.75), (0.5, 0.5)])
def test_penalty_grad_is_zero_outside_b_and_scaled_on_the_exploration_set(d: float, dm: float) -> None:
    theta = torch.randn(40, generator=torch.Generator().manual_seed(1))
    a, b = forward_backward_sets(theta, d, dm)
    strength = 0.2
    grad = penalty_grad(theta, a, b, d, strength)
    assert torch.equal(grad[~b], torch.zeros(int((~b).sum())))
    assert torch.equal(grad[a], strength * theta[a])
    exploration = b & ~a
    assert int(exploration.sum()) == count(dm, 40) - count(d, 40)
    torch.testing.assert_close(grad[exploration], strength / d * theta[exploration], rtol=1e-6, atol=0.0)
    # the exploration set is penalised exactly 1/D times more strongly than A for the same θ
    same = torch.full_like(theta, 0.75)
    g = penalty_grad(same, a, b, d, strength)
    if exploration.any() and a.any():
        torch.testing.assert_close(g[exploration] / g[a][0], torch.full_like(g[exploration], 1 / d))


def test_penalty_and_its_grad_ignore_autograd_and_keep_theta() -> None:
    theta = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    a, b = torch.tensor([T, F, F]), torch.tensor([T, T, F])
    grad = penalty_grad(theta, a, b, 0.5, 1.0)
    value = penalty(theta, a, b, 0.5, 1.0)
    assert not grad.requires_grad
    assert not value.requires_grad  # for logging only: the step adds the gradient itself
    assert torch.equal(grad, torch.tensor([1.0, -4.0, 0.0]))
    assert value.item() == 0.5 * (1.0 + 2 * 4.0)
    assert torch.equal(theta.detach(), torch.tensor([1.0, -2.0, 3.0]))


def test_zero_strength_gives_zero() -> None:
    theta = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    a, b = forward_backward_sets(theta, 0.25, 0.75)
    assert torch.equal(penalty_grad(theta, a, b, 0.25, 0.0), torch.zeros(2, 2))
    assert penalty(theta, a, b, 0.25, 0.0).item() == 0.0


class _MyAdamW(torch.optim.AdamW):
    pass


@pytest.mark.parametrize(
    ("strength", "decoupled", "optimizers", "expected"),
    [
        (None, None, ["adamw"], (3e-2, True)),
        (None, None, ["adam"], (3e-2, True)),
        (None, None, ["subclass"], (3e-2, True)),  # a user's AdamW subclass normalises its steps the same way
        (None, None, ["sgd"], (1e-4, False)),
        (None, None, ["rmsprop"], (1e-4, False)),  # measured only for Adam/AdamW: everything else keeps 1e-4
        (None, None, ["adamw", "sgd"], (1e-4, False)),  # one engine, one mode: decoupled only if all are Adam
        (None, None, [], (1e-4, False)),  # before a fit, no optimizer yet
        (1e-3, None, ["adamw"], (1e-3, True)),  # an explicit λ is kept, the mode still follows the optimizer
        (None, False, ["adamw"], (1e-4, False)),  # explicitly through the gradient: the coupled default λ
        (None, True, ["sgd"], (1e-4, True)),  # decoupled under SGD: unmeasured, so the long-standing λ
        (0.0, True, ["adamw"], (0.0, True)),
    ],
)
def test_resolve_penalty_follows_the_optimizer(
    strength: float | None, decoupled: bool | None, optimizers: list[str], expected: tuple[float, bool]
) -> None:
    w = [torch.nn.Parameter(torch.zeros(3))]
    make = {
        "adamw": lambda: torch.optim.AdamW(w),
        "adam": lambda: torch.optim.Adam(w),
        "subclass": lambda: _MyAdamW(w),
        "sgd": lambda: torch.optim.SGD(w, lr=0.1),
        "rmsprop": lambda: torch.optim.RMSprop(w),
    }
    assert resolve_penalty(strength, decoupled, [make[o]() for o in optimizers]) == expected
    assert (PENALTY, DECOUPLED_PENALTY) == (1e-4, 3e-2)
