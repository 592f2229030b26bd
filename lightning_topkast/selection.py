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

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_topkast.kernels import Threshold


def count(density: float, numel: int) -> int:
    """Number of entries a set of ``density`` keeps out of ``numel``: ``density * numel`` rounded half up.

    Examples:
        >>> count(0.2, 10), count(0.25, 10), count(0.5, 3), count(1.0, 7)
        (2, 3, 2, 7)
    """
    return min(numel, math.floor(density * numel + 0.5))


# Above this many entries the k-th largest score is found in a band around a sampled estimate of it.
_BAND_SELECT_ABOVE = 1 << 15
_SAMPLE_SIZE = 4096


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
    """The ``k``-th largest of flat, NaN-free ``scores`` and the split of its ties (``1 <= k <= numel``).

    The top ``k`` are the scores above the value and those equal to it at an index below the split.

    Examples:
        >>> value, split = kth_and_split(torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0]), 3)
        >>> value.item(), split
        (2.0, 3)
    """
    value = kth_largest(scores, k, sample)
    ties = scores == value
    wanted = k - int(torch.count_nonzero(scores > value))  # >= 1: the k-th itself is a tie
    if wanted == int(torch.count_nonzero(ties)):
        return value, scores.numel()
    return value, int(torch.nonzero(ties)[wanted - 1]) + 1


def threshold(scores: Tensor, k: int, offset: int = 0) -> Threshold:
    """The :class:`Threshold` of the top ``k`` of integer ``scores`` (:func:`lightning_topkast.kernels.scores`).

    ``offset`` is the index of the first score in a global pool, so the split is a global index.

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
    if n <= _BAND_SELECT_ABOVE:
        return None
    return torch.sort(scores[:: n // _SAMPLE_SIZE], descending=True).values


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
    m = sample.numel()
    # the answer's rank in the sample has a standard deviation below sqrt(m)/2: a margin of 4 of them
    margin = 2 * math.isqrt(m) + 2
    position = k * m / n
    upper, lower = math.floor(position) - margin, math.ceil(position) + margin
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


def forward_backward_sets(theta: Tensor, forward_density: float, backward_density: float) -> tuple[Tensor, Tensor]:
    """Forward set A = TopK(θ, D) and backward set B = TopK(θ, D + M) of one tensor.

    Both come from one ordering, so A ⊆ B always holds.

    Examples:
        >>> a, b = forward_backward_sets(torch.tensor([[0.1, -0.9], [0.4, 0.3]]), 0.25, 0.5)
        >>> a.int().tolist(), b.int().tolist()
        ([[0, 1], [0, 0]], [[0, 1], [1, 0]])
    """
    _check_densities(forward_density, backward_density)
    scores, n = magnitude_scores(theta), theta.numel()
    sample = sorted_sample(scores)
    # both sets are prefixes of one total order, so A ⊆ B
    forward_set = top_mask(scores, count(forward_density, n), sample).view(theta.shape)
    backward_set = top_mask(scores, count(backward_density, n), sample).view(theta.shape)
    return forward_set, backward_set


def global_forward_backward_sets(
    thetas: Sequence[Tensor], forward_density: float, backward_density: float
) -> list[tuple[Tensor, Tensor]]:
    """One top-k over all ``thetas`` together (the "global" distribution); returns (A, B) per tensor.

    Examples:
        >>> sets = global_forward_backward_sets([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])], 0.5, 0.75)
        >>> [(a.int().tolist(), b.int().tolist()) for a, b in sets]
        [([1, 0], [1, 0]), ([0, 1], [1, 1])]
    """
    _check_densities(forward_density, backward_density)
    scores = magnitude_scores(torch.cat([t.detach().flatten() for t in thetas]))
    n = scores.numel()
    sample = sorted_sample(scores)
    forward_flat = top_mask(scores, count(forward_density, n), sample)
    backward_flat = top_mask(scores, count(backward_density, n), sample)
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
class TieSplit:
    """A query of :func:`search_threshold`: the split that takes the first ``wanted`` entries scoring ``score``."""

    score: int
    wanted: int


Query = CountAtLeast | TieSplit
Search = Generator[Query, "list[int] | int", "Threshold | None"]

RUNGS_PER_SEARCH = 8  # two searches (A and B) share a 16-rung counting pass
MAX_PASSES = 8  # beyond this many counting passes, a full selection is cheaper


def search_threshold(k: int, previous: Threshold, at_previous: int, size: int, mantissa: int, top: int) -> Search:
    """Find the :class:`Threshold` of the top ``k`` of ``size`` scores near the ``previous`` one, exactly.

    A generator: it yields queries (:class:`CountAtLeast`, answered with the counts; :class:`TieSplit`, answered
    with the split) and returns the threshold, or None when a full selection is cheaper. ``at_previous`` is how
    many scores are at or above ``previous`` now; ``mantissa`` the significand bits of θ's dtype (a score step of
    ``2 ** mantissa`` doubles |θ|); ``top`` the largest score (that of inf).

    Let F(x) count the scores >= x. The answer is the largest x with F(x) >= k, cut within its ties. The first
    pass counts at a ladder of scores away from the previous threshold, relative steps from 2^-12 up to the end of
    the range, which brackets it; each further pass counts at scores inside the bracket, evenly spaced and
    clustered where linear interpolation of F puts k, until some F(x) is exactly k or the bracket is one score
    wide (a tie).
    """
    if at_previous == k:
        return previous
    if k <= 0 or k >= size:
        return Threshold(top + 1, 0) if k <= 0 else Threshold(-1, size)
    t = previous.score
    steps = sorted({1 << max(0, mantissa - 12 + 2 * i) for i in range(RUNGS_PER_SEARCH - 2)})
    if at_previous > k:  # F(t) >= at_previous > k: the answer is at or above t
        rungs = [t, *(min(t + step, top + 1) for step in steps), top + 1]
    else:  # F(t + 1) <= at_previous < k: the answer is below t + 1
        rungs = [t + 1, *(max(t + 1 - step, -1) for step in steps), -1]
    counts = yield CountAtLeast(sorted(set(rungs)))
    known = dict(zip(sorted(set(rungs)), counts, strict=True))
    for _ in range(MAX_PASSES):
        exact = [x for x, f in known.items() if f == k]
        if exact:
            return Threshold(max(exact), size)  # F(x) == k: the scores >= x are exactly the top k
        lo = max(x for x, f in known.items() if f > k)
        hi = min(x for x, f in known.items() if f < k)
        if hi == lo + 1:  # every score in the bracket is lo: a tie to cut
            wanted = k - known[hi]
            return Threshold(lo, (yield TieSplit(lo, wanted)))
        rungs = _rungs_inside(lo, hi, known[lo], known[hi], k)
        counts = yield CountAtLeast(rungs)
        known.update(zip(rungs, counts, strict=True))
    return None


def _rungs_inside(lo: int, hi: int, f_lo: int, f_hi: int, k: int) -> list[int]:
    """Up to :data:`RUNGS_PER_SEARCH` scores strictly between ``lo`` and ``hi``.

    Half are evenly spaced, half around the interpolated position of rank ``k`` at widening distances.
    """
    width, half = hi - lo, RUNGS_PER_SEARCH // 2
    even = {lo + width * (i + 1) // (half + 1) for i in range(half)}
    guess = lo + width * (f_lo - k) / (f_lo - f_hi)
    per_entry = width / (f_lo - f_hi)  # scores per entry, were F linear in the bracket
    near = {round(guess + sign * per_entry * 4**i) for i in range(half // 2) for sign in (-1, 1)}
    return sorted(x for x in even | near if lo < x < hi)[:RUNGS_PER_SEARCH]


def search_thresholds(
    searches: Sequence[Search],
    count_at_least: Callable[[list[int]], list[int]],
    tie_split: Callable[[int, int], int],
) -> list[Threshold | None]:
    """Run :func:`search_threshold` generators together: their rungs share one counting pass per round.

    ``count_at_least(rungs)`` counts the scores at or above each rung (one pass); ``tie_split(score, wanted)``
    returns the split that takes the first ``wanted`` entries scoring ``score``.
    """
    results: list[Threshold | None] = [None] * len(searches)
    pending: dict[int, Query] = {}
    for i, search in enumerate(searches):
        try:
            pending[i] = next(search)
        except StopIteration as done:
            results[i] = done.value
    while pending:
        answers: dict[int, list[int] | int] = {}
        rungs = {i: q.rungs for i, q in pending.items() if isinstance(q, CountAtLeast)}
        if rungs:
            counts = count_at_least([x for r in rungs.values() for x in r])
            start = 0
            for i, r in rungs.items():
                answers[i], start = counts[start : start + len(r)], start + len(r)
        for i, q in pending.items():
            if isinstance(q, TieSplit):
                answers[i] = tie_split(q.score, q.wanted)
        pending = {}
        for i, answer in answers.items():
            try:
                pending[i] = searches[i].send(answer)
            except StopIteration as done:
                results[i] = done.value
    return results


def tie_split(scores: Tensor, score: int, wanted: int, offset: int = 0) -> tuple[int, int]:
    """``(split, left)``: where the first ``wanted`` entries of ``scores`` equal to ``score`` end, and how many remain.

    The split is a global index (``offset`` is the first score's), past the end when there are too few ties here.
    """
    ties = torch.nonzero(scores == score).flatten()
    if ties.numel() >= wanted:
        return offset + int(ties[wanted - 1]) + 1, 0
    return offset + scores.numel(), wanted - ties.numel()


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
