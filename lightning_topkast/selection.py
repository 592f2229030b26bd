"""Exact top-k selection of the forward set A and the backward set B by weight magnitude.

Counts are exact (``count(density, n)`` entries, never "about") and ties are broken by position, so every process
that holds the same θ computes the same masks: DDP ranks need no mask broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


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
    threshold = kth_largest(scores, k, sample)
    mask = scores >= threshold
    extra = int(torch.count_nonzero(mask)) - k
    if extra:  # ties at the threshold: keep the first by index, as a stable sort would
        mask[torch.nonzero(scores == threshold).flatten()[-extra:]] = False
    return mask


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
