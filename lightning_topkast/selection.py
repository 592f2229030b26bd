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


def magnitude_order(theta: Tensor) -> Tensor:
    """Flat indices of ``theta`` by decreasing ``|θ|``; ties by increasing index, NaN last.

    Examples:
        >>> magnitude_order(torch.tensor([0.5, -2.0, 0.5, float("nan"), 1.0])).tolist()
        [1, 4, 0, 2, 3]
    """
    scores = theta.detach().flatten().abs()
    # NaN would sort arbitrarily; ranking it below every real magnitude keeps the order total and deterministic.
    scores = torch.where(torch.isnan(scores), -1.0, scores)
    return torch.argsort(scores, descending=True, stable=True)


def nested_masks(order: Tensor, counts: Sequence[int], shape: torch.Size) -> list[Tensor]:
    """Boolean masks of ``shape`` holding the first ``counts[i]`` entries of ``order``; nested when counts grow."""
    masks = []
    for k in counts:
        mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
        mask[order[:k]] = True
        masks.append(mask.view(shape))
    return masks


def forward_backward_sets(theta: Tensor, forward_density: float, backward_density: float) -> tuple[Tensor, Tensor]:
    """Forward set A = TopK(θ, D) and backward set B = TopK(θ, D + M) of one tensor.

    Both come from one ordering, so A ⊆ B always holds.

    Examples:
        >>> a, b = forward_backward_sets(torch.tensor([[0.1, -0.9], [0.4, 0.3]]), 0.25, 0.5)
        >>> a.int().tolist(), b.int().tolist()
        ([[0, 1], [0, 0]], [[0, 1], [1, 0]])
    """
    _check_densities(forward_density, backward_density)
    n = theta.numel()
    forward_set, backward_set = nested_masks(
        magnitude_order(theta), [count(forward_density, n), count(backward_density, n)], theta.shape
    )
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
    flat = torch.cat([t.detach().flatten() for t in thetas])
    n = flat.numel()
    forward_flat, backward_flat = nested_masks(
        magnitude_order(flat), [count(forward_density, n), count(backward_density, n)], flat.shape
    )
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
