"""Exact top-k selection: counts, ordering, the forward set A ⊆ the backward set B, the global pool, turnover."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_topkast.selection import (
    count,
    forward_backward_sets,
    global_forward_backward_sets,
    magnitude_order,
    magnitude_scores,
    top_mask,
    turnover,
)

NAN, INF = float("nan"), float("inf")
PROPERTY = settings(max_examples=75, deadline=None)

# --- count ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "numel", "expected"),
    [
        (0.0, 10, 0),
        (1.0, 10, 10),
        (0.2, 10, 2),
        (0.25, 10, 3),  # 2.5 rounds half up
        (0.24, 10, 2),
        (0.5, 3, 2),  # 1.5 rounds half up
        (0.1, 1, 0),
        (0.5, 1, 1),
        (0.3, 0, 0),
        (1.0, 0, 0),
        (1 - 0.9, 10, 1),  # 0.09999999999999998 * 10 is not below 0.5
        (1 - 0.8, 1000, 200),
    ],
)
def test_count_literal(density: float, numel: int, expected: int) -> None:
    assert count(density, numel) == expected


def test_count_of_exact_fraction_is_exact() -> None:
    # a user asking for k of n weights as the density k / n gets exactly k, whatever the float rounding of k / n
    for n in range(1, 200):
        for k in range(n + 1):
            assert count(k / n, n) == k, (k, n)


@PROPERTY
@given(
    density=st.floats(0.0, 1.0, allow_nan=False),
    other=st.floats(0.0, 1.0, allow_nan=False),
    numel=st.integers(0, 10_000),
)
def test_count_bounds_rounding_and_monotone(density: float, other: float, numel: int) -> None:
    k = count(density, numel)
    assert isinstance(k, int)
    assert 0 <= k <= numel
    assert abs(k - density * numel) <= 0.5 + 1e-9
    lo, hi = sorted((density, other))
    assert count(lo, numel) <= count(hi, numel)


# --- magnitude_order --------------------------------------------------------------------------------------------------


def test_magnitude_order_literal() -> None:
    theta = torch.tensor([0.5, -2.0, 0.5, NAN, 1.0])
    assert torch.equal(magnitude_order(theta), torch.tensor([1, 4, 0, 2, 3]))


def test_magnitude_order_ties_by_increasing_index() -> None:
    theta = torch.tensor([1.0, -3.0, 3.0, -1.0, 3.0, 0.0, -0.0, 0.0])
    assert magnitude_order(theta).tolist() == [1, 2, 4, 0, 3, 5, 6, 7]


def test_magnitude_order_all_equal_is_identity() -> None:
    assert magnitude_order(torch.full((3, 4), -2.5)).tolist() == list(range(12))


def test_magnitude_order_nan_last_in_index_order_inf_first() -> None:
    theta = torch.tensor([NAN, 0.0, -INF, NAN, 1.0, INF, -0.0])
    assert magnitude_order(theta).tolist() == [2, 5, 4, 1, 6, 0, 3]


def test_magnitude_order_negative_zero_ties_with_zero() -> None:
    assert magnitude_order(torch.tensor([-0.0, 0.0, -0.0, 0.0])).tolist() == [0, 1, 2, 3]
    assert magnitude_order(torch.tensor([0.0, -0.0, 1e-30, -1e-30])).tolist() == [2, 3, 0, 1]


def test_magnitude_order_flattens_row_major() -> None:
    theta = torch.tensor([[0.1, 0.4], [-0.3, 0.2]])
    assert magnitude_order(theta).tolist() == [1, 2, 3, 0]


def test_magnitude_order_ignores_autograd_and_dtype() -> None:
    theta = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64, requires_grad=True)
    order = magnitude_order(theta)
    assert order.tolist() == [1, 2, 0]
    assert not order.requires_grad
    half = torch.tensor([1.0, -4.0, 2.0], dtype=torch.bfloat16)
    assert magnitude_order(half).tolist() == [1, 2, 0]


def _values(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    """Values from a small pool, so that ties, ±0.0 and equal magnitudes of opposite sign are frequent."""
    pool = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -3.0, 1e-3])
    values = draw(st.one_of(st.lists(pool, min_size=math.prod(shape), max_size=math.prod(shape)), st.just(None)))
    if values is None:
        seed = draw(st.integers(0, 2**31 - 1))
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    return _values(draw, draw(shapes))


@PROPERTY
@given(theta=tensors())
def test_magnitude_order_is_a_sorted_permutation(theta: torch.Tensor) -> None:
    order = magnitude_order(theta)
    flat = theta.flatten()
    assert sorted(order.tolist()) == list(range(flat.numel()))
    ranked = flat.abs()[order]
    assert bool((ranked[:-1] >= ranked[1:]).all())
    # equal magnitudes are visited by increasing index
    for i in range(order.numel() - 1):
        if ranked[i] == ranked[i + 1]:
            assert order[i] < order[i + 1]


@PROPERTY
@given(theta=tensors())
def test_magnitude_order_is_sign_invariant(theta: torch.Tensor) -> None:
    order = magnitude_order(theta)
    assert torch.equal(magnitude_order(-theta), order)
    assert torch.equal(magnitude_order(theta.abs()), order)


# --- forward_backward_sets --------------------------------------------------------------------------------------------


def test_forward_backward_sets_literal() -> None:
    theta = torch.tensor([[0.1, -0.9], [0.4, 0.3]])
    a, b = forward_backward_sets(theta, 0.25, 0.5)
    assert torch.equal(a, torch.tensor([[False, True], [False, False]]))
    assert torch.equal(b, torch.tensor([[False, True], [True, False]]))


def test_forward_backward_sets_literal_with_ties_and_zeros() -> None:
    theta = torch.tensor([[0.0, 2.0, -2.0], [-0.0, 1.0, -2.0]])
    # order: 1, 2, 5 (|2| by index), 4, 0, 3; D = 0.5 -> 3 entries, D + M = 5/6 -> 5 entries
    a, b = forward_backward_sets(theta, 0.5, 5 / 6)
    assert torch.equal(a, torch.tensor([[False, True, True], [False, False, True]]))
    assert torch.equal(b, torch.tensor([[True, True, True], [False, True, True]]))


def test_forward_backward_sets_rounding_half_up() -> None:
    theta = torch.tensor([4.0, 3.0, 2.0, 1.0])
    a, b = forward_backward_sets(theta, 0.125, 0.375)  # 0.5 -> 1, 1.5 -> 2
    assert a.tolist() == [True, False, False, False]
    assert b.tolist() == [True, True, False, False]


def test_forward_backward_sets_extremes() -> None:
    theta = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    a, b = forward_backward_sets(theta, 0.0, 0.0)
    assert not a.any()
    assert not b.any()
    a, b = forward_backward_sets(theta, 1.0, 1.0)
    assert bool(a.all())
    assert bool(b.all())
    a, b = forward_backward_sets(theta, 0.5, 0.5)  # M = 0: B = A
    assert torch.equal(a, b)
    assert torch.equal(a, torch.tensor([[False, True], [True, False]]))


def test_forward_backward_sets_nan_is_chosen_last() -> None:
    theta = torch.tensor([NAN, 1e-6, NAN, -5.0])
    a, b = forward_backward_sets(theta, 0.5, 0.75)
    assert a.tolist() == [False, True, False, True]
    assert b.tolist() == [True, True, False, True]


def test_forward_backward_sets_leaves_theta_and_grad_alone() -> None:
    theta = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    before = theta.detach().clone()
    a, b = forward_backward_sets(theta, 1 / 3, 2 / 3)
    assert torch.equal(theta.detach(), before)
    assert a.dtype == torch.bool
    assert b.dtype == torch.bool
    assert not a.requires_grad
    assert a.shape == theta.shape


@pytest.mark.parametrize(("forward", "backward"), [(0.6, 0.5), (-0.1, 0.5), (0.5, 1.1), (1.2, 1.3)])
def test_forward_backward_sets_rejects_bad_densities(forward: float, backward: float) -> None:
    with pytest.raises(ValueError, match=r"forward \(.*\) <= backward \(.*\)"):
        forward_backward_sets(torch.ones(4), forward, backward)


@PROPERTY
@given(
    theta=tensors(),
    d=st.floats(0.0, 1.0, allow_nan=False),
    m=st.floats(0.0, 1.0, allow_nan=False),
)
def test_forward_backward_sets_invariants(theta: torch.Tensor, d: float, m: float) -> None:
    d, dm = sorted((d, m))
    n = theta.numel()
    a, b = forward_backward_sets(theta, d, dm)
    assert a.shape == theta.shape
    assert b.shape == theta.shape
    assert int(a.sum()) == count(d, n)
    assert int(b.sum()) == count(dm, n)
    assert not bool((a & ~b).any())  # A ⊆ B
    # every member of a set is at least as large as every non-member
    mags = theta.abs()
    for s in (a, b):
        if s.any() and (~s).any():
            assert float(mags[s].min()) >= float(mags[~s].max())
    # deterministic and sign invariant
    a2, b2 = forward_backward_sets(theta.clone(), d, dm)
    assert torch.equal(a, a2)
    assert torch.equal(b, b2)
    a3, b3 = forward_backward_sets(-theta, d, dm)
    assert torch.equal(a, a3)
    assert torch.equal(b, b3)
    # the sets are the first entries of the magnitude order
    order = magnitude_order(theta)
    assert torch.equal(a.flatten().nonzero().flatten().sort().values, order[: count(d, n)].sort().values)


def test_top_mask_literal() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0])
    assert [top_mask(scores, k).int().tolist() for k in range(6)] == [
        [0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 1, 0, 1, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ]


@PROPERTY
@given(
    values=st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 7.0, NAN]), min_size=1, max_size=64),
    data=st.data(),
)
def test_top_mask_is_the_prefix_of_the_stable_order(values: list[float], data: st.DataObject) -> None:
    """The threshold select equals the first k of a stable sort, ties and NaN included."""
    theta = torch.tensor(values)
    k = data.draw(st.integers(0, theta.numel()))
    expected = torch.zeros(theta.numel(), dtype=torch.bool)
    expected[magnitude_order(theta)[:k]] = True
    assert torch.equal(top_mask(magnitude_scores(theta), k), expected)


# --- global_forward_backward_sets -------------------------------------------------------------------------------------


def test_global_sets_literal() -> None:
    sets = global_forward_backward_sets([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])], 0.5, 0.75)
    (a0, b0), (a1, b1) = sets
    assert a0.tolist() == [True, False]
    assert b0.tolist() == [True, False]
    assert a1.tolist() == [False, True]
    assert b1.tolist() == [True, True]


def test_global_sets_keep_shapes_and_split_by_position() -> None:
    big = torch.tensor([[5.0, -6.0], [0.1, 0.2]])
    small = torch.tensor([[0.3, -0.05, 7.0]])
    (a0, b0), (a1, b1) = global_forward_backward_sets([big, small], 3 / 7, 5 / 7)
    # order over [5, -6, .1, .2, .3, -.05, 7]: 6 (7.0), 1, 0, 4 (.3), 3 (.2), 2, 5
    assert torch.equal(a0, torch.tensor([[True, True], [False, False]]))
    assert torch.equal(a1, torch.tensor([[False, False, True]]))
    assert torch.equal(b0, torch.tensor([[True, True], [False, True]]))
    assert torch.equal(b1, torch.tensor([[True, False, True]]))


def test_global_sets_ties_broken_by_concatenation_order() -> None:
    first, second = torch.tensor([1.0, -1.0]), torch.tensor([[-1.0], [1.0]])
    (a0, b0), (a1, b1) = global_forward_backward_sets([first, second], 0.25, 0.75)
    assert a0.tolist() == [True, False]
    assert b0.tolist() == [True, True]
    assert a1.tolist() == [[False], [False]]
    assert b1.tolist() == [[True], [False]]
    # swapping the tensors swaps who wins the ties
    (a1s, b1s), (a0s, b0s) = global_forward_backward_sets([second, first], 0.25, 0.75)
    assert a1s.tolist() == [[True], [False]]
    assert b1s.tolist() == [[True], [True]]
    assert a0s.tolist() == [False, False]
    assert b0s.tolist() == [True, False]


def test_global_sets_may_leave_a_tensor_empty_or_full() -> None:
    loud, quiet = torch.tensor([10.0, -20.0, 30.0]), torch.tensor([0.1, 0.2, 0.3])
    (a0, b0), (a1, b1) = global_forward_backward_sets([loud, quiet], 0.5, 0.5)
    assert bool(a0.all())
    assert not a1.any()
    assert torch.equal(a0, b0)
    assert torch.equal(a1, b1)


def test_global_sets_of_one_tensor_equal_the_per_tensor_sets() -> None:
    theta = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    ((a, b),) = global_forward_backward_sets([theta], 0.3, 0.6)
    a_ref, b_ref = forward_backward_sets(theta, 0.3, 0.6)
    assert torch.equal(a, a_ref)
    assert torch.equal(b, b_ref)


def test_global_sets_reject_bad_densities() -> None:
    with pytest.raises(ValueError, match="backward set contains the forward set"):
        global_forward_backward_sets([torch.ones(3)], 0.7, 0.2)


@PROPERTY
@given(
    parts=st.lists(tensors(), min_size=1, max_size=4),
    d=st.floats(0.0, 1.0, allow_nan=False),
    m=st.floats(0.0, 1.0, allow_nan=False),
)
def test_global_sets_invariants(parts: list[torch.Tensor], d: float, m: float) -> None:
    d, dm = sorted((d, m))
    total = sum(t.numel() for t in parts)
    sets = global_forward_backward_sets(parts, d, dm)
    assert len(sets) == len(parts)
    for t, (a, b) in zip(parts, sets, strict=True):
        assert a.shape == t.shape
        assert b.shape == t.shape
        assert not bool((a & ~b).any())
    assert sum(int(a.sum()) for a, _ in sets) == count(d, total)
    assert sum(int(b.sum()) for _, b in sets) == count(dm, total)
    # identical to per-tensor selection on the concatenation, split back in order
    flat = torch.cat([t.flatten() for t in parts])
    a_flat, b_flat = forward_backward_sets(flat, d, dm)
    assert torch.equal(torch.cat([a.flatten() for a, _ in sets]), a_flat)
    assert torch.equal(torch.cat([b.flatten() for _, b in sets]), b_flat)


# --- turnover ---------------------------------------------------------------------------------------------------------


def test_turnover_literal() -> None:
    assert turnover(torch.tensor([True, True, False]), torch.tensor([True, False, True])) == (1, 2)
    old = torch.tensor([[True, True], [True, False]])
    assert turnover(old, old.clone()) == (0, 3)
    assert turnover(old, ~old) == (3, 3)
    assert turnover(torch.zeros(2, 2, dtype=torch.bool), old) == (0, 0)
    assert turnover(old, torch.ones(2, 2, dtype=torch.bool)) == (0, 3)


def test_turnover_returns_python_ints() -> None:
    left, size = turnover(torch.tensor([True, False]), torch.tensor([False, True]))
    assert type(left) is int
    assert type(size) is int


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 50), d=st.floats(0.0, 1.0, allow_nan=False))
def test_turnover_of_equal_size_sets_counts_joiners_too(seed: int, n: int, d: float) -> None:
    g = torch.Generator().manual_seed(seed)
    old, _ = forward_backward_sets(torch.randn(n, generator=g), d, d)
    new, _ = forward_backward_sets(torch.randn(n, generator=g), d, d)
    left, size = turnover(old, new)
    assert size == count(d, n)
    assert left == int((new & ~old).sum())  # with |A| fixed, as many join as leave
    assert 0 <= left <= size
