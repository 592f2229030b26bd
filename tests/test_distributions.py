"""Per-tensor densities: uniform, ERK (RigL's Erdős–Rényi-Kernel), global; budgets and forward/backward pairs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_topkast.distributions import (
    DISTRIBUTIONS,
    densities,
    erk,
    forward_backward_densities,
    global_,
    uniform,
)

PROPERTY = settings(max_examples=75, deadline=None)

shape_lists = st.lists(st.lists(st.integers(1, 64), min_size=1, max_size=4).map(tuple), min_size=1, max_size=6).map(
    lambda shapes: {f"t{i}": s for i, s in enumerate(shapes)}
)
budgets = st.floats(0.0, 1.0, allow_nan=False)


def kept_fraction(shapes: dict[str, tuple[int, ...]], per_tensor: dict[str, float]) -> float:
    total = sum(math.prod(s) for s in shapes.values())
    return sum(per_tensor[name] * math.prod(s) for name, s in shapes.items()) / total


# --- uniform and global -----------------------------------------------------------------------------------------------


def test_uniform_literal() -> None:
    assert uniform({"a": (4, 4), "b": (2, 8), "c": (3,)}, 0.25) == {"a": 0.25, "b": 0.25, "c": 0.25}


def test_uniform_keeps_the_order_of_names() -> None:
    assert list(uniform({"z": (2, 2), "a": (3, 3), "m": (1, 1)}, 0.5)) == ["z", "a", "m"]


def test_global_gives_the_budget_to_every_tensor() -> None:
    assert global_({"a": (10, 10), "b": (1, 2)}, 0.3) == {"a": 0.3, "b": 0.3}
    assert densities("global", {"a": (10, 10), "b": (1, 2)}, 0.3) == {"a": 0.3, "b": 0.3}


def test_distribution_names() -> None:
    assert DISTRIBUTIONS == ("uniform", "erk", "global")
    shapes = {"a": (8, 4), "b": (4, 2)}
    for name in DISTRIBUTIONS:
        assert set(densities(name, shapes, 0.5)) == {"a", "b"}


def test_unknown_distribution_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"distribution='ERK_typo' is not known; use one of uniform, erk, global"):
        densities("ERK_typo", {"a": (2, 2)}, 0.5)
    with pytest.raises(ValueError, match=r"'gobal'"):
        forward_backward_densities("gobal", {"a": (2, 2)}, 0.2, 0.5)


# --- erk --------------------------------------------------------------------------------------------------------------


def test_erk_hand_computed_with_a_dense_thin_tensor() -> None:
    # raw scores: wide (100 + 100) / 10_000 = 0.02, thin 102 / 200 = 0.51; budget 0.1 * 10_200 = 1020 weights.
    # First pass: scale 1020 / (200 + 102) puts thin at 1.72 > 1, so thin is dense (200 weights);
    # second pass: wide gets (1020 - 200) / 10_000 = 0.082.
    result = erk({"wide": (100, 100), "thin": (100, 2)}, 0.1)
    assert result["thin"] == 1.0
    assert result["wide"] == pytest.approx(0.082, abs=1e-12)
    assert list(result) == ["wide", "thin"]


def test_erk_hand_computed_without_dense_tensors() -> None:
    # raw: a (10 + 10) / 100 = 0.2, b (20 + 5) / 100 = 0.25; budget 0.1 * 200 = 20 = scale * (20 + 25)
    result = erk({"a": (10, 10), "b": (20, 5)}, 0.1)
    assert result["a"] == pytest.approx(0.2 * 20 / 45, abs=1e-12)
    assert result["b"] == pytest.approx(0.25 * 20 / 45, abs=1e-12)


def test_erk_conv_kernel_counts_every_dimension() -> None:
    # RigL's ERK sums all dimensions of a conv kernel: (3 + 3 + 8 + 16) / 1152 vs (16 + 10) / 160
    result = erk({"conv": (16, 8, 3, 3), "fc": (10, 16)}, 0.2)
    scale = 0.2 * (1152 + 160) / (30 + 26)
    assert result["conv"] == pytest.approx(scale * 30 / 1152, rel=1e-12)
    assert result["fc"] == pytest.approx(scale * 26 / 160, rel=1e-12)


def test_erk_of_equal_shapes_is_uniform() -> None:
    result = erk({"a": (6, 6), "b": (6, 6), "c": (6, 6)}, 0.3)
    assert result == pytest.approx({"a": 0.3, "b": 0.3, "c": 0.3}, rel=1e-12)
    # (4, 9) has the same numel but a larger sum of dimensions, so it is kept denser
    mixed = erk({"square": (6, 6), "oblong": (4, 9)}, 0.3)
    assert mixed["oblong"] / mixed["square"] == pytest.approx(13 / 12, rel=1e-12)


def test_erk_extremes() -> None:
    shapes = {"a": (30, 20), "b": (5, 2), "c": (7,)}
    assert erk(shapes, 1.0) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert erk(shapes, 0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_erk_cascade_makes_several_tensors_dense() -> None:
    shapes = {"big": (200, 200), "mid": (50, 4), "small": (4, 3), "vector": (5,)}
    result = erk(shapes, 0.2)
    assert result["small"] == 1.0
    assert result["vector"] == 1.0
    assert result["mid"] == 1.0
    assert 0.0 < result["big"] < 1.0
    assert kept_fraction(shapes, result) == pytest.approx(0.2, abs=1e-9)


@PROPERTY
@given(shapes=shape_lists, density=budgets)
def test_erk_respects_the_budget_and_bounds(shapes: dict[str, tuple[int, ...]], density: float) -> None:
    result = erk(shapes, density)
    assert list(result) == list(shapes)
    for value in result.values():
        assert 0.0 <= value <= 1.0
    assert kept_fraction(shapes, result) == pytest.approx(density, abs=1e-9)
    # a sparse tensor never has a larger raw score than one that was made dense before it
    raw = {name: sum(s) / math.prod(s) for name, s in shapes.items()}
    for name, value in result.items():
        for other, other_value in result.items():
            if raw[name] <= raw[other] and value < 1.0:
                assert value <= other_value + 1e-12


@PROPERTY
@given(shapes=shape_lists, low=budgets, high=budgets)
def test_erk_is_monotone_in_the_budget(shapes: dict[str, tuple[int, ...]], low: float, high: float) -> None:
    low, high = sorted((low, high))
    smaller, larger = erk(shapes, low), erk(shapes, high)
    for name in shapes:
        assert smaller[name] <= larger[name] + 1e-12, name


@PROPERTY
@given(shapes=shape_lists, density=budgets)
def test_uniform_respects_the_budget(shapes: dict[str, tuple[int, ...]], density: float) -> None:
    result = uniform(shapes, density)
    assert kept_fraction(shapes, result) == pytest.approx(density, abs=1e-9)


# --- forward_backward_densities ---------------------------------------------------------------------------------------


def test_forward_backward_densities_literal() -> None:
    shapes = {"wide": (100, 100), "thin": (100, 2)}
    result = forward_backward_densities("erk", shapes, 0.1, 0.2)
    assert result["thin"] == (1.0, 1.0)
    forward, backward = result["wide"]
    assert forward == pytest.approx(0.082, abs=1e-12)
    assert backward == pytest.approx((0.2 * 10_200 - 200) / 10_000, abs=1e-12)
    assert forward_backward_densities("uniform", {"a": (3, 3)}, 0.1, 0.3) == {"a": (0.1, 0.3)}


@PROPERTY
@given(shapes=shape_lists, d=budgets, m=budgets, distribution=st.sampled_from(DISTRIBUTIONS))
def test_forward_backward_densities_are_ordered(
    shapes: dict[str, tuple[int, ...]], d: float, m: float, distribution: str
) -> None:
    d, dm = sorted((d, m))
    result = forward_backward_densities(distribution, shapes, d, dm)
    assert list(result) == list(shapes)
    for forward, backward in result.values():
        assert 0.0 <= forward <= backward <= 1.0
    assert kept_fraction(shapes, {k: v[0] for k, v in result.items()}) == pytest.approx(d, abs=1e-9)
    assert kept_fraction(shapes, {k: v[1] for k, v in result.items()}) == pytest.approx(dm, abs=1e-9)
