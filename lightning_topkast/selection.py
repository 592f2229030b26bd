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


def magnitude_scores(theta: Tensor) -> Tensor:
    """Flat ``|θ|`` with NaN ranked below every real magnitude, so the order is total and deterministic."""
    scores = theta.detach().flatten().abs()
    return torch.where(torch.isnan(scores), -1.0, scores)


def magnitude_order(theta: Tensor) -> Tensor:
    """Flat indices of ``theta`` by decreasing ``|θ|``; ties by increasing index, NaN last.

    This is the order every selection here follows; :func:`top_mask` computes its prefixes without sorting.

    Examples:
        >>> magnitude_order(torch.tensor([0.5, -2.0, 0.5, float("nan"), 1.0])).tolist()
        [1, 4, 0, 2, 3]
    """
    return torch.argsort(magnitude_scores(theta), descending=True, stable=True)


def top_mask(scores: Tensor, k: int) -> Tensor:
    """Flat bool mask of the ``k`` largest ``scores``, ties taken by increasing index: exactly ``k`` entries.

    Equal to the first ``k`` of a stable descending sort, in two passes (a k-th value select and a compare) instead of
    a sort, which is several times faster on large tensors.

    Examples:
        >>> top_mask(torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0]), 3).tolist()
        [False, True, True, True, False]
    """
    n = scores.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool, device=scores.device)
    threshold = torch.kthvalue(scores, n - k + 1).values
    mask = scores > threshold
    missing = k - int(mask.sum())
    if missing:
        mask[torch.nonzero(scores == threshold).flatten()[:missing]] = True
    return mask


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
    # both sets are prefixes of one total order, so A ⊆ B
    forward_set = top_mask(scores, count(forward_density, n)).view(theta.shape)
    backward_set = top_mask(scores, count(backward_density, n)).view(theta.shape)
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
    forward_flat = top_mask(scores, count(forward_density, n))
    backward_flat = top_mask(scores, count(backward_density, n))
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
    left = int((old_forward_set & ~new_forward_set).sum())
    return left, int(old_forward_set.sum())


def _check_densities(forward_density: float, backward_density: float) -> None:
    if not 0.0 <= forward_density <= backward_density <= 1.0:
        raise ValueError(
            f"densities must satisfy 0 <= forward ({forward_density}) <= backward ({backward_density}) <= 1, "
            "because the backward set contains the forward set"
        )
