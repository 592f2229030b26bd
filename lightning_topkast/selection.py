"""Exact top-k selection of the forward set A and the backward set B by weight magnitude.

Counts are exact (``count(density, n)`` entries, never "about") and ties are broken by position, so every process
that holds the same θ computes the same masks: DDP ranks need no mask broadcast.

A top-k set is a prefix of one total order (larger |θ| first, ties by lower index, NaN last), so it is described by
a :class:`~lightning_topkast.kernels.Threshold`: the k-th entry's score and where its ties are cut. Three ways to
find one, all exact and all equal:

- :func:`threshold`: a full selection (:func:`kth_largest` in a sampled band), for the first refresh and as the
  fallback;
- :func:`search_thresholds`: from the previous refresh's thresholds, by counting at a few candidate scores per
  pass. Between refreshes only B moves, so the new k-th score is close to the old one and one to three counting
  passes find it (:mod:`lightning_topkast.kernels` fuses each into one loop);
- :func:`threshold_tensors`: the full selection with no host sync (kthvalue and a cumulative sum), for GPUs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_topkast import kernels
from lightning_topkast.kernels import PICK_CAP, Pick, Threshold


def count(density: float, numel: int) -> int:
    """Number of entries a set of ``density`` keeps out of ``numel``: ``density * numel`` rounded half up.

    Examples:
        >>> count(0.2, 10), count(0.25, 10), count(0.5, 3), count(1.0, 7)
        (2, 3, 2, 7)
    """
    return min(numel, math.floor(density * numel + 0.5))


# Above this many entries the k-th largest score is found in a band around a sampled estimate of it.
BAND_SELECT_ABOVE = 1 << 15
SAMPLE_SIZE = 4096


def magnitude_scores(theta: Tensor) -> Tensor:
    """Flat ``|θ|`` with NaN ranked below every real magnitude, so the order is total and deterministic."""
    return theta.detach().flatten().abs().nan_to_num_(nan=-1.0, posinf=math.inf)


def magnitude_order(theta: Tensor) -> Tensor:
    """Flat indices of ``theta`` by decreasing ``|θ|``; ties by increasing index, NaN last.

    This is the order every selection here follows; :func:`top_mask` computes its prefixes without sorting.

    Examples:
        >>> magnitude_order(torch.tensor([0.5, -2.0, 0.5, float("nan"), 1.0])).tolist()
        [1, 4, 0, 2, 3]
    """
    return torch.argsort(magnitude_scores(theta), descending=True, stable=True)


def top_mask(scores: Tensor, k: int, sample: Tensor | None = None) -> Tensor:
    """Flat bool mask of the ``k`` largest ``scores``, ties taken by increasing index: exactly ``k`` entries.

    Equal to the first ``k`` of a stable descending sort, found without one: a threshold select
    (:func:`kth_largest`, given ``sample`` when one was drawn already) and a compare.

    Examples:
        >>> top_mask(torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0]), 3).tolist()
        [False, True, True, True, False]
    """
    n = scores.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool, device=scores.device)
    value, split = kth_and_split(scores, k, sample)
    mask = scores >= value
    mask[split:] = scores[split:] > value
    return mask


def kth_and_split(scores: Tensor, k: int, sample: Tensor | None = None) -> tuple[Tensor, int]:
    """The ``k``-th largest of flat, NaN-free ``scores`` and one past its index (``1 <= k <= numel``).

    Of the entries equal to the value, those below the split are in the top ``k``: the split is one past the
    ``k``-th entry of the stable descending order, so the pair names that entry.

    Examples:
        >>> value, split = kth_and_split(torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0]), 3)
        >>> value.item(), split
        (2.0, 3)
    """
    value = kth_largest(scores, k, sample)
    wanted = k - int(torch.count_nonzero(scores > value))  # >= 1: the k-th itself equals the value
    return value, int(torch.nonzero(scores == value)[wanted - 1]) + 1


def threshold(scores: Tensor, k: int, offset: int = 0) -> Threshold:
    """The :class:`Threshold` of the top ``k`` of integer ``scores`` (:func:`lightning_topkast.kernels.scores`).

    The threshold names the ``k``-th entry itself: its score, and one past its index. ``offset`` is the index of the
    first score in a global pool, so the split is a global index.

    Examples:
        >>> threshold(torch.tensor([10, 30, 20, 30, 20]), 3)
        Threshold(score=20, split=3)
    """
    n = scores.numel()
    if k <= 0:  # no score reaches the type's largest value (NaN's bits are mapped to -1), and beyond it is no +1
        return Threshold(torch.iinfo(scores.dtype).max - 1, offset)
    if k >= n:
        return Threshold(-1, offset + n)
    value, split = kth_and_split(scores, k)
    return Threshold(int(value), offset + split)


def sorted_sample(scores: Tensor) -> Tensor | None:
    """The strided sample of ``scores`` that :func:`kth_largest` brackets with, sorted descending; None if too small.

    Draw it once to select several k from the same scores.
    """
    n = scores.numel()
    if n <= BAND_SELECT_ABOVE:
        return None
    return torch.sort(scores[:: n // SAMPLE_SIZE], descending=True).values


def kth_largest(scores: Tensor, k: int, sample: Tensor | None = None) -> Tensor:
    """The ``k``-th largest of flat, NaN-free ``scores`` (``1 <= k <= numel``), exactly.

    A full selection over millions of entries costs ~10 ms per million on CPU. Instead, a strided sample brackets
    the answer between two of its values; one pass counts the entries above the bracket and gathers those inside
    it, and the exact select runs on that band, a few percent of the tensor. Should the bracket miss (a sample
    far from typical), the full selection runs, so the result never depends on the sample.

    Examples:
        >>> kth_largest(torch.tensor([0.5, 3.0, 2.0, 3.0]), 2).item(), kth_largest(torch.arange(100_000.0), 7).item()
        (3.0, 99993.0)
    """
    n = scores.numel()
    sample = sorted_sample(scores) if sample is None else sample
    if sample is None:
        return torch.kthvalue(scores, n - k + 1).values
    upper, lower = _bracket(sample.numel(), k, n)
    m = sample.numel()
    above, in_band = 0, None
    if upper >= 0:
        top = sample[upper]
        above = int(torch.count_nonzero(scores > top))
        in_band = scores <= top
    if lower < m:
        bottom = scores >= sample[lower]
        in_band = bottom if in_band is None else in_band.logical_and_(bottom)
    band = scores if in_band is None else scores[in_band]
    rank = k - above  # the answer is the rank-th largest of the entries at or below the bracket's top
    if 1 <= rank <= band.numel():
        return torch.kthvalue(band, band.numel() - rank + 1).values
    return torch.kthvalue(scores, n - k + 1).values


def _bracket(m: int, k: int, n: int) -> tuple[int, int]:
    """Positions in a descending sample of ``m`` of ``n`` scores that bracket the ``k``-th largest of all."""
    # the answer's rank in the sample has a standard deviation below sqrt(m)/2: a margin of 4 of them
    margin = 2 * math.isqrt(m) + 2
    position = k * m / n
    return math.floor(position) - margin, math.ceil(position) + margin


def sampled_window(sample: Tensor, k: int, n: int, top: int) -> tuple[int, int]:
    """The window ``[lo, hi)`` of integer scores where a descending ``sample`` of ``n`` scores brackets the k-th one.

    :func:`kth_largest`'s band, for :meth:`lightning_topkast.kernels.Kernels.pick`. ``top`` is the largest score (that
    of inf); where the bracket runs off the sample, the window runs to the end.
    """
    upper, lower = _bracket(sample.numel(), k, n)
    hi = int(sample[upper]) + 1 if upper >= 0 else top + 1
    lo = int(sample[lower]) if lower < sample.numel() else -1
    return lo, hi


def forward_backward_sets(theta: Tensor, forward_density: float, backward_density: float) -> tuple[Tensor, Tensor]:
    """Forward set A = TopK(θ, D) and backward set B = TopK(θ, D + M) of one tensor.

    The full selection the engine runs at its first refresh: :func:`threshold` on the integer scores, then a compare.
    Both sets are prefixes of one order, so A ⊆ B always holds.

    Examples:
        >>> a, b = forward_backward_sets(torch.tensor([[0.1, -0.9], [0.4, 0.3]]), 0.25, 0.5)
        >>> a.int().tolist(), b.int().tolist()
        ([[0, 1], [0, 0]], [[0, 1], [1, 0]])
    """
    (sets,) = global_forward_backward_sets([theta], forward_density, backward_density)
    return sets


def global_forward_backward_sets(
    thetas: Sequence[Tensor], forward_density: float, backward_density: float
) -> list[tuple[Tensor, Tensor]]:
    """One top-k over all ``thetas`` together (the "global" distribution); returns (A, B) per tensor.

    Ties across tensors go to the earlier tensor, as if they were one concatenated tensor.

    Examples:
        >>> sets = global_forward_backward_sets([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])], 0.5, 0.75)
        >>> [(a.int().tolist(), b.int().tolist()) for a, b in sets]
        [([1, 0], [1, 0]), ([0, 1], [1, 1])]
    """
    _check_densities(forward_density, backward_density)
    # mixed dtypes rank by value: compare them in the widest one
    wide = functools.reduce(torch.promote_types, (t.dtype for t in thetas))
    scores = torch.cat([kernels.scores(t.detach().to(wide)) for t in thetas])
    n = scores.numel()
    forward_flat = kernels.at_least(scores, threshold(scores, count(forward_density, n)))
    backward_flat = kernels.at_least(scores, threshold(scores, count(backward_density, n)))
    sizes = [t.numel() for t in thetas]
    return [
        (a.view(t.shape), b.view(t.shape))
        for t, a, b in zip(thetas, forward_flat.split(sizes), backward_flat.split(sizes), strict=True)
    ]


def turnover(old_forward_set: Tensor, new_forward_set: Tensor) -> tuple[int, int]:
    """``(left, size)``: how many members of the old forward set left it, and how many it had.

    Examples:
        >>> turnover(torch.tensor([True, True, False]), torch.tensor([True, False, True]))
        (1, 2)
    """
    left = int(torch.count_nonzero(old_forward_set & ~new_forward_set))  # count_nonzero: no int64 copy, unlike sum
    return left, int(torch.count_nonzero(old_forward_set))


def _check_densities(forward_density: float, backward_density: float) -> None:
    if not 0.0 <= forward_density <= backward_density <= 1.0:
        raise ValueError(
            f"densities must satisfy 0 <= forward ({forward_density}) <= backward ({backward_density}) <= 1, "
            "because the backward set contains the forward set"
        )


# --- the incremental refresh --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountAtLeast:
    """A query of :func:`search_threshold`: how many scores are at least each of ``rungs``."""

    rungs: list[int]


@dataclass(frozen=True)
class Window:
    """A query of :func:`search_threshold`: the ``k``-th entry if it scores in ``[lo, hi)``.

    Answered with a :class:`~lightning_topkast.kernels.Pick` (:meth:`~lightning_topkast.kernels.Kernels.pick`).
    """

    lo: int
    hi: int
    k: int


Query = CountAtLeast | Window
Found = tuple[Threshold, "float | None"]
Search = Generator[Query, "list[int] | Pick", "Found | None"]

RUNGS_PER_SEARCH = 8  # two searches (A and B) share a 16-rung counting pass
MAX_PASSES = 8  # beyond this many counting passes, a full selection is cheaper


def search_threshold(
    k: int, previous: Threshold, at_previous: int, size: int, mantissa: int, top: int, spacing: float | None
) -> Search:
    """Find the :class:`Threshold` of the top ``k`` of ``size`` scores near the ``previous`` one, exactly.

    A generator: it yields queries (:class:`CountAtLeast`, answered with the counts; :class:`Window`, answered with
    a :class:`~lightning_topkast.kernels.Pick`) and returns ``(threshold, spacing)``, or None when a full selection
    is cheaper. The threshold names the ``k``-th entry, as :func:`threshold` does, unless ``at_previous``, the
    count of scores at or above ``previous`` now, is already ``k``: then ``previous`` still splits the top ``k``
    off and is returned. ``mantissa`` is the significand bits of θ's dtype; ``top`` the largest score (that of
    inf); ``spacing`` how far the threshold moved per entry that crossed it at the last search (None: unknown).

    Let F(x) count the scores >= x; F(previous) moved from ``k`` to ``at_previous``. With a spacing, one window
    around the score the same ratio predicts finds the ``k``-th entry in one pass. Otherwise, or if it misses,
    a pass counts at a ladder of scores away from ``previous`` (relative steps 2^-20 to 2^-5, then the end of the
    range) to bracket it, further passes narrow the bracket until it holds at most
    :data:`~lightning_topkast.kernels.PICK_CAP` entries, and a window over the bracket picks the entry.
    """
    if at_previous == k:
        return previous, spacing or 0.0
    if k <= 0 or k >= size:
        return (Threshold(top + 1, 0) if k <= 0 else Threshold(-1, size)), spacing or 0.0
    t, moved = previous.score, at_previous - k  # > 0: the k-th entry now scores above t
    known: dict[int, int] = {}  # F at scores counted so far
    if spacing:
        margin = 0.3 * abs(moved) + 4 * math.sqrt(abs(moved)) + 16  # entries; the guess is rarely off by more
        lo = max(-1, math.floor(t + (moved - margin) * spacing))
        hi = min(top + 1, math.ceil(t + (moved + margin) * spacing) + 1)
        found = yield Window(lo, hi, k)
        if found.threshold is not None:
            return found.threshold, _secant(previous, found.threshold, moved, spacing)
        known.update({hi: found.above, lo: found.above + found.count})
    steps = sorted({1 << max(0, mantissa - 20 + 3 * i) for i in range(RUNGS_PER_SEARCH - 2)})
    if moved > 0:  # F(t) >= at_previous > k: the k-th entry scores at or above t
        ladder = [t, *(min(t + step, top + 1) for step in steps), top + 1]
    else:  # F(t + 1) <= at_previous < k: it scores below t + 1
        ladder = [t + 1, *(max(t + 1 - step, -1) for step in steps), -1]
    rungs = sorted(set(ladder) - known.keys())
    known.update(zip(rungs, (yield CountAtLeast(rungs)), strict=True))
    found = yield from _narrow(k, known)
    return None if found is None else (found, _secant(previous, found, moved, spacing))


def search_sampled(k: int, window: tuple[int, int], size: int, top: int) -> Search:
    """Find the :class:`Threshold` of the top ``k`` of ``size`` scores from scratch, in a window a sample brackets.

    The first selection of a large tensor (:func:`sampled_window` gives the window): a pick there when it holds the
    ``k``-th entry and few enough entries, narrower counting passes first when it holds too many, None (a full
    selection then) when the sample missed. Returns ``(threshold, None)``: no spacing is known yet.
    """
    if k <= 0 or k >= size:
        return (Threshold(top + 1, 0) if k <= 0 else Threshold(-1, size)), None
    lo, hi = window
    found = yield Window(lo, hi, k)
    if found.threshold is not None:
        return found.threshold, None
    if not found.above < k <= found.above + found.count:
        return None
    threshold = yield from _narrow(k, {hi: found.above, lo: found.above + found.count})
    return None if threshold is None else (threshold, None)


def _narrow(k: int, known: dict[int, int]) -> Generator[Query, Any, Threshold | None]:
    """From counts F at a few scores (one at least ``k``, one below), narrow the bracket and pick the entry."""
    for _ in range(MAX_PASSES):
        lo = max(x for x, f in known.items() if f >= k)  # F(lo) >= k > F(hi): the k-th entry is in [lo, hi)
        hi = min(x for x, f in known.items() if f < k)
        if known[lo] - known[hi] <= PICK_CAP:
            return (yield Window(lo, hi, k)).threshold
        if hi == lo + 1:
            return None  # more ties at one score than a pick takes
        rungs = _rungs_inside(lo, hi, known[lo], known[hi], k)
        known.update(zip(rungs, (yield CountAtLeast(rungs)), strict=True))
    return None


def _secant(previous: Threshold, found: Threshold, moved: int, spacing: float | None) -> float:
    """How far the threshold moved per entry that crossed it: the next search's guess of the same ratio."""
    return (found.score - previous.score) / moved if found.score != previous.score else (spacing or 0.0)


def _rungs_inside(lo: int, hi: int, f_lo: int, f_hi: int, k: int) -> list[int]:
    """Up to :data:`RUNGS_PER_SEARCH` scores strictly between ``lo`` and ``hi``.

    Half are evenly spaced, half around the interpolated position of rank ``k`` at widening distances.
    """
    width, half = hi - lo, RUNGS_PER_SEARCH // 2
    even = {lo + width * (i + 1) // (half + 1) for i in range(half)}
    guess = lo + width * (f_lo - k) / (f_lo - f_hi)
    spread = width / (f_lo - f_hi) * PICK_CAP / 4  # a quarter of what one pick takes, in score units
    near = {round(guess + sign * spread * 4**-i) for i in range(half // 2) for sign in (-1, 1)}
    return sorted(x for x in even | near if lo < x < hi)[:RUNGS_PER_SEARCH]


def search_thresholds(
    searches: Sequence[Search],
    count_at_least: Callable[[list[int]], list[int]],
    pick: Callable[[list[tuple[int, int, int]]], list[Pick]],
) -> list[Found | None]:
    """Run :func:`search_threshold` generators together, each round's queries answered in one pass.

    ``count_at_least(rungs)`` counts the scores at or above each rung; ``pick(windows)`` answers ``(lo, hi, k)``
    windows with :class:`~lightning_topkast.kernels.Pick` results.
    """
    results: list[Found | None] = [None] * len(searches)
    pending: dict[int, Query] = {}

    def advance(i: int, answer: object) -> None:
        try:
            pending[i] = searches[i].send(answer)  # type: ignore[arg-type]
        except StopIteration as done:
            results[i] = done.value

    for i in range(len(searches)):
        advance(i, None)
    while pending:
        asked, answers = dict(pending), {}
        pending.clear()
        rungs = {i: q.rungs for i, q in asked.items() if isinstance(q, CountAtLeast)}
        if rungs:
            counts = iter(count_at_least([x for r in rungs.values() for x in r]))
            answers.update({i: [next(counts) for _ in r] for i, r in rungs.items()})
        windows = {i: (q.lo, q.hi, q.k) for i, q in asked.items() if isinstance(q, Window)}
        if windows:
            answers.update(zip(windows, pick(list(windows.values())), strict=True))
        for i, answer in answers.items():
            advance(i, answer)
    return results


def threshold_tensors(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-``k`` threshold of flat integer ``scores`` as two 0-dim tensors (score, split): no host sync.

    For GPUs, where a full selection is fast and reading a count back to choose a branch stalls the device.

    Examples:
        >>> score, split = threshold_tensors(torch.tensor([10, 30, 20, 30, 20]), 3)
        >>> score.item(), split.item()
        (20, 3)
    """
    n = scores.numel()
    if k <= 0 or k >= n:
        return threshold_tensors_of(threshold(scores, k), scores.device)
    value = torch.kthvalue(scores, n - k + 1).values
    wanted = k - (scores > value).sum()
    ties = scores == value
    # the wanted-th tie is at the index where the running count of ties reaches `wanted`; the split is past it
    split = (torch.cumsum(ties, 0) < wanted).sum() + 1
    return value, split


def threshold_tensors_of(t: Threshold, device: torch.device) -> tuple[Tensor, Tensor]:
    """``t`` as the two 0-dim tensors :func:`threshold_tensors` returns."""
    return torch.tensor(t.score, device=device), torch.tensor(t.split, device=device)
