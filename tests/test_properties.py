"""Properties of selection and distributions over hostile values: ties, ±0.0, extremes, inf and NaN, any dtype.

What the package does with NaN (``selection.magnitude_scores``): a NaN weight ranks below every real magnitude,
ties among NaNs by position, so a NaN enters a set only once every non-NaN entry is in it. ``±inf`` ranks above every
finite magnitude. The oracles are independent of the package: set sizes are ``D·n`` rounded half up by decimal
arithmetic (``conftest.half_up``, not ``selection.count``), and the sets are a stable sort (NumPy's lexsort) over
``tolist()``. Densities are often halves, quarters and eighths, so ``D·n`` often ends in exactly .5.
test_selection.py and test_distributions.py hold the literal cases and the properties on tame values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from conftest import half_up, make_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_topkast import kernels
from lightning_topkast import selection as selection_module
from lightning_topkast.distributions import DISTRIBUTIONS, forward_backward_densities
from lightning_topkast.kernels import Threshold
from lightning_topkast.selection import (
    forward_backward_sets,
    global_forward_backward_sets,
    search_threshold,
    search_thresholds,
    threshold,
)

PROPERTY = settings(max_examples=60, deadline=None)
NAN, INF = float("nan"), float("inf")

# magnitudes that tie, vanish, overflow half precision, or sit at the ends of float32
HOSTILE = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.0, 1e-3, 3.0e38, -3.0e38, 1e-38, 1e-45, 65504.0, INF, -INF, NAN, -NAN]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
# densities whose product with a small n often lands on exactly .5, where half up and half to even differ
HALVES = [0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875, 0.1, 0.3, 0.7, 0.9, 1 / 6, 1 / 14]
densities = st.one_of(st.floats(0.0, 1.0, allow_nan=False), st.sampled_from(HALVES))
# the callback's forward_sparsity is below 1 and its density is rounded to 12 digits, so D >= 1e-12
budgets = st.one_of(st.floats(1e-12, 1.0), st.sampled_from(HALVES))


@st.composite
def tensors(draw: st.DrawFn, allow_nan: bool = True) -> torch.Tensor:
    """A tensor of a random shape and dtype, its values drawn from ``HOSTILE`` or from a normal distribution."""
    shape, dtype = draw(shapes), draw(st.sampled_from(DTYPES))
    n = math.prod(shape)
    pool = [v for v in HOSTILE if allow_nan or not math.isnan(v)]
    if draw(st.booleans()):
        values = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)
    seed = draw(st.integers(0, 2**31 - 1))
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e3).to(dtype)


def reference_sets(theta: torch.Tensor, forward_density: float, backward_density: float) -> tuple[list[int], list[int]]:
    """Flat indices of A and B by hand: |θ| descending, ties by index, NaN after everything else."""
    values = np.asarray(theta.detach().flatten().double().tolist(), dtype=np.float64)
    nan = np.isnan(values)
    # np.lexsort sorts by the last key first: NaN last, then larger magnitude first, then lower index
    order = np.lexsort((np.arange(values.size), -np.where(nan, 0.0, np.abs(values)), nan))
    n = values.size
    return sorted(order[: half_up(forward_density, n)].tolist()), sorted(order[: half_up(backward_density, n)].tolist())


def reference_masks(thetas: list[torch.Tensor], d: float, dm: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A and B of one stable sort over all ``thetas`` together, as bool tensors of their shapes."""
    expected_a, expected_b = reference_sets(torch.cat([t.detach().double().flatten() for t in thetas]), d, dm)
    n = sum(t.numel() for t in thetas)
    a, b = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    a[expected_a], b[expected_b] = True, True
    sizes = [t.numel() for t in thetas]
    return [(x.view(t.shape), y.view(t.shape)) for t, x, y in zip(thetas, a.split(sizes), b.split(sizes), strict=True)]


def flat_indices(mask: torch.Tensor) -> list[int]:
    return mask.flatten().nonzero().flatten().tolist()


def flip_signs(theta: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``theta`` with the signs of the ``flip`` entries negated (0.0 becomes -0.0, NaN a negative NaN)."""
    return torch.where(flip.view(theta.shape), theta.neg(), theta)


# --- per-tensor selection -------------------------------------------------------------------------------------------


@PROPERTY
@given(theta=tensors(), d=densities, m=densities, data=st.data())
def test_sets_are_exact_nested_deterministic_and_sign_blind(
    theta: torch.Tensor, d: float, m: float, data: st.DataObject
) -> None:
    d, dm = sorted((d, m))
    n = theta.numel()
    a, b = forward_backward_sets(theta, d, dm)
    assert a.dtype == b.dtype == torch.bool
    assert a.shape == b.shape == theta.shape
    assert int(a.sum()) == half_up(d, n)
    assert int(b.sum()) == half_up(dm, n)
    assert not bool((a & ~b).any())
    expected_a, expected_b = reference_sets(theta, d, dm)
    assert flat_indices(a) == expected_a
    assert flat_indices(b) == expected_b
    # deterministic: a copy of the input, and the same input again
    for again in (theta, theta.clone()):
        a2, b2 = forward_backward_sets(again, d, dm)
        assert torch.equal(a2, a)
        assert torch.equal(b2, b)
    # any subset of signs flipped, so 0.0 against -0.0 and NaN against -NaN too
    flip = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    a3, b3 = forward_backward_sets(flip_signs(theta, flip), d, dm)
    assert torch.equal(a3, a)
    assert torch.equal(b3, b)


@PROPERTY
@given(theta=tensors(), d=densities)
def test_nan_enters_a_set_only_after_every_number(theta: torch.Tensor, d: float) -> None:
    flat = theta.flatten()
    is_nan = torch.isnan(flat)
    a, _ = forward_backward_sets(theta, d, d)
    chosen = a.flatten()
    assert int(chosen.sum()) == half_up(d, flat.numel())
    numbers = int((~is_nan).sum())
    if half_up(d, flat.numel()) <= numbers:
        assert not bool((chosen & is_nan).any())
    else:
        assert bool(chosen[~is_nan].all())
        # the NaNs that make up the rest are the first ones by position
        nan_positions = is_nan.nonzero().flatten()
        taken = half_up(d, flat.numel()) - numbers
        assert torch.equal(chosen[nan_positions], torch.arange(nan_positions.numel()) < taken)
    # an infinite weight is in every non-empty set before any finite one
    infinite = torch.isinf(flat)
    if half_up(d, flat.numel()) >= int(infinite.sum()):
        assert bool(chosen[infinite].all())


@settings(max_examples=100, deadline=None)  # ~10 ms each: no need for the slow lane
@given(
    values=st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, NAN, 1e-30, 3.0, -0.5]), min_size=1, max_size=8),
    d=densities,
    m=densities,
    size=st.sampled_from([32_769, 40_001, 66_001]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_large_tensors_with_heavy_ties_select_exactly(
    values: list[float], d: float, m: float, size: int, dtype: torch.dtype, seed: int
) -> None:
    """Above ``selection.BAND_SELECT_ABOVE`` (32,768) entries the threshold is found in a band a strided sample
    brackets; the result must not depend on the sample."""
    assert size > selection_module.BAND_SELECT_ABOVE
    d, dm = sorted((d, m))
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(values, dtype=dtype)
    theta = pool[torch.randint(0, len(values), (size,), generator=g)]
    a, b = forward_backward_sets(theta, d, dm)
    expected_a, expected_b = reference_sets(theta, d, dm)
    assert flat_indices(a) == expected_a
    assert flat_indices(b) == expected_b
    flip = torch.rand(theta.shape, generator=g) < 0.5
    a2, b2 = forward_backward_sets(flip_signs(theta, flip), d, dm)
    assert torch.equal(a2, a)
    assert torch.equal(b2, b)


# --- global selection -----------------------------------------------------------------------------------------------


@PROPERTY
@given(parts=st.lists(tensors(), min_size=1, max_size=4), d=densities, m=densities, data=st.data())
def test_global_sets_are_exact_nested_deterministic_and_sign_blind(
    parts: list[torch.Tensor], d: float, m: float, data: st.DataObject
) -> None:
    d, dm = sorted((d, m))
    sets = global_forward_backward_sets(parts, d, dm)
    total = sum(t.numel() for t in parts)
    assert sum(int(a.sum()) for a, _ in sets) == half_up(d, total)
    assert sum(int(b.sum()) for _, b in sets) == half_up(dm, total)
    for t, (a, b) in zip(parts, sets, strict=True):
        assert a.shape == b.shape == t.shape
        assert not bool((a & ~b).any())
    # by hand over the concatenation: mixed dtypes compare by value
    expected_a, expected_b = reference_sets(torch.cat([t.double().flatten() for t in parts]), d, dm)
    assert flat_indices(torch.cat([a.flatten() for a, _ in sets])) == expected_a
    assert flat_indices(torch.cat([b.flatten() for _, b in sets])) == expected_b
    flips = [torch.tensor(data.draw(st.lists(st.booleans(), min_size=t.numel(), max_size=t.numel()))) for t in parts]
    flipped = global_forward_backward_sets([flip_signs(t, f) for t, f in zip(parts, flips, strict=True)], d, dm)
    again = global_forward_backward_sets([t.clone() for t in parts], d, dm)
    for (a, b), (a2, b2), (a3, b3) in zip(sets, again, flipped, strict=True):
        assert torch.equal(a2, a)
        assert torch.equal(b2, b)
        assert torch.equal(a3, a)
        assert torch.equal(b3, b)


# --- distributions: the budget in real counts ---------------------------------------------------------------------

shape_maps = st.lists(st.lists(st.integers(1, 24), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5).map(
    lambda found: {f"t{i}": s for i, s in enumerate(found)}
)


@PROPERTY
@given(shapes=shape_maps, d=budgets, m=budgets, distribution=st.sampled_from(DISTRIBUTIONS), seed=st.integers(0, 99))
def test_engine_keeps_the_budget_up_to_rounding(
    shapes: dict[str, tuple[int, ...]], d: float, m: float, distribution: str, seed: int
) -> None:
    """Kept weights over all tensors: exactly half_up(D, N) for global, within half a weight per tensor otherwise."""
    d, dm = sorted((d, m))
    pairs = forward_backward_densities(distribution, shapes, d, dm)
    for forward, backward in pairs.values():
        assert 0.0 <= forward <= backward <= 1.0
    g = torch.Generator().manual_seed(seed)
    params = {name: torch.nn.Parameter(torch.randn(shape, generator=g)) for name, shape in shapes.items()}
    pool = list(shapes) if distribution == "global" else []
    engine = make_engine(params, pairs, global_pool=pool)
    total = sum(math.prod(s) for s in shapes.values())
    kept_a = sum(int(t.forward_set.sum()) for t in engine.tensors.values())
    kept_b = sum(int(t.backward_set.sum()) for t in engine.tensors.values())
    if distribution == "global":
        assert kept_a == half_up(d, total)
        assert kept_b == half_up(dm, total)
    else:
        for name, t in engine.tensors.items():
            assert int(t.forward_set.sum()) == half_up(pairs[name][0], t.numel)
            assert int(t.backward_set.sum()) == half_up(pairs[name][1], t.numel)
            assert int(t.forward_set.sum()) <= int(t.backward_set.sum())
        # each tensor rounds by at most half a weight; the budget itself is met in real numbers
        slack = 0.5 * len(shapes) + 1e-6 * total
        assert abs(kept_a - d * total) <= slack
        assert abs(kept_b - dm * total) <= slack
    for t in engine.tensors.values():
        assert torch.equal(t.param.detach(), torch.where(t.forward_set, t.theta, 0))


# --- the incremental refresh ----------------------------------------------------------------------------------------


def _search(theta: torch.Tensor, k: int, previous: Threshold, spacing: float | None) -> Threshold | None:
    """One :func:`search_threshold` over ``theta``, its queries answered by the kernels over all of it."""
    work = kernels.for_tensor(theta)
    scores = kernels.scores(theta)
    at_previous = int(kernels.at_least(scores, previous).sum())
    mantissa, top = kernels.mantissa_bits(theta.dtype), kernels.infinity_score(theta.dtype)
    search = search_threshold(k, previous, at_previous, theta.numel(), mantissa, top, spacing)
    (found,) = search_thresholds([search], lambda r: work.count_at_least(theta, r), lambda w: work.pick([theta], w))
    return None if found is None else found[0]


@PROPERTY
@given(
    theta=tensors(),
    d=densities,
    moves=st.lists(st.tuples(st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 0.1, 10.0]), st.booleans()), max_size=4),
    spacing=st.sampled_from([None, 1.0, 1e3, 1e6]),
    cap=st.sampled_from([kernels.PICK_CAP, 3]),
)
def test_incremental_refresh_equals_the_full_stable_top_k(
    theta: torch.Tensor, d: float, moves: list, spacing: float | None, cap: int
) -> None:
    """After any sequence of changes to θ, the search from the last threshold finds the stable top-k exactly.

    Steps move a random part of θ by a random relative amount, sometimes into NaN or inf; a small pick cap
    forces the narrowing passes and the fallback to a full selection.
    """
    flat = theta.flatten().clone()
    n, k = flat.numel(), half_up(d, flat.numel())
    previous = threshold(kernels.scores(flat), k)
    original_cap = kernels.PICK_CAP
    selection_module.PICK_CAP = kernels.PICK_CAP = cap
    try:
        for seed, scale, poison in moves:
            g = torch.Generator().manual_seed(seed)
            moving = torch.rand(n, generator=g) < 0.5
            step = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(flat.dtype)
            flat = torch.where(moving, flat + step * flat.abs().clamp_min(1e-3).to(flat.dtype), flat)
            if poison:
                flat[int(torch.randint(0, n, (1,), generator=g))] = torch.tensor([NAN, INF][seed % 2], dtype=flat.dtype)
            found = _search(flat, k, previous, spacing)
            expected, _ = reference_sets(flat, d, d)
            if found is None:  # the engine selects in full then
                found = threshold(kernels.scores(flat), k)
            assert flat_indices(kernels.at_least(kernels.scores(flat), found)) == expected
            previous = found
    finally:
        selection_module.PICK_CAP = kernels.PICK_CAP = original_cap


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    d=st.one_of(st.floats(0.01, 1.0), st.sampled_from(HALVES)),
    m=st.one_of(st.floats(0.01, 1.0), st.sampled_from(HALVES)),
    pool=st.booleans(),
    early=st.sampled_from([None, 0.0, 0.05]),
    interval=st.sampled_from([1, 2, 7]),
    seed=st.integers(0, 2**31 - 1),
)
def test_engine_sets_equal_the_full_select_after_every_refresh(
    shapes: list, dtype: torch.dtype, d: float, m: float, pool: bool, early: float | None, interval: int, seed: int
) -> None:
    """Random steps through the engine (SGD with momentum, NaN gradients now and then): whenever a refresh ran, A and
    B are the stable top-k of θ, per tensor or over the global pool."""
    d, dm = sorted((d, m))
    g = torch.Generator().manual_seed(seed)
    params = {f"t{i}": torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for i, s in enumerate(shapes)}
    names = list(params)
    opt = torch.optim.SGD(params.values(), lr=0.5, momentum=0.9)
    engine = make_engine(
        params,
        (d, dm),
        [opt],
        update_interval=interval,
        early_refresh=early,
        global_pool=names if pool else (),
        penalty=1e-3,
    )
    for step in range(12):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
            if step % 5 == 4:
                p.grad.view(-1)[0] = NAN
        refreshes = engine.refreshes
        engine.before_step(opt)
        opt.step()
        thetas = [engine.tensors[n].theta for n in names]
        sets = reference_masks(thetas, d, dm) if pool else [reference_masks([t], d, dm)[0] for t in thetas]
        for name, (a, b) in zip(names, sets, strict=True):
            if engine.refreshes > refreshes and engine.tensors[name].unit.since_refresh == 0:  # refreshed in this step
                assert torch.equal(engine.tensors[name].forward_set, a), (step, name)
                assert torch.equal(engine.tensors[name].backward_set, b), (step, name)
        for name in names:
            t = engine.tensors[name]
            alpha = torch.where(t.forward_set, t.theta, 0)
            assert torch.equal(t.param.detach().view(torch.uint8), alpha.view(torch.uint8))  # NaN included
