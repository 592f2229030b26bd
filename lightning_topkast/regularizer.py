r"""The exploration penalty of Top-KAST and its exact gradient.

Per entry the penalty weight is c = 1 on the forward set A, 1/D on the exploration set B \ A and 0 outside the
backward set B; the penalty is ``strength / 2 * sum(c * θ²)`` on the dense θ (METHOD.md, rule 3). Weights in A are
kept from entrenching themselves, and weights in B \ A must earn their way in against a penalty 1/D times stronger.
"""

from __future__ import annotations

import torch
from torch import Tensor


def penalty_weights(
    forward_set: Tensor, backward_set: Tensor, forward_density: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    r"""Per-entry weight c: 1 on A, 1/D on B \ A, 0 outside B.

    ``forward_set`` and ``backward_set`` are bool masks, or 0/1 float masks (in ``dtype``, they save two conversions).

    Examples:
        >>> penalty_weights(torch.tensor([True, False, False]), torch.tensor([True, True, False]), 0.25).tolist()
        [1.0, 4.0, 0.0]
    """
    if not 0.0 < forward_density <= 1.0:
        raise ValueError(f"forward_density must be in (0, 1], got {forward_density}")
    # built in the target dtype, so 1/D is exact to that precision (float64 θ gets a float64 1/D); A and B \ A are
    # disjoint, so 1·1/D + 0 and 0·1/D + 1 are exact, and arithmetic on 0/1 tensors beats a bool masked_fill on CPU
    if forward_set.dtype == torch.bool:
        exploring = (backward_set ^ forward_set).to(dtype)
    else:
        exploring = (backward_set - forward_set).to(dtype)  # A ⊆ B: B - A is B \ A, exactly
    forward = forward_set.to(dtype)  # no copy when already in dtype
    return exploring.mul_(1.0 / forward_density).add_(forward)


def penalty(
    theta: Tensor, forward_set: Tensor, backward_set: Tensor, forward_density: float, strength: float
) -> Tensor:
    """The penalty's value, ``strength / 2 * sum(c * θ²)``, as a 0-dim tensor in θ's dtype.

    Examples:
        >>> a, b = torch.tensor([True, False, False]), torch.tensor([True, True, False])
        >>> penalty(torch.tensor([2.0, 1.0, 5.0]), a, b, 0.5, strength=0.1).item()
        0.30000001192092896
    """
    c = penalty_weights(forward_set, backward_set, forward_density, theta.dtype)
    return 0.5 * strength * (c * theta.detach() * theta.detach()).sum()


def penalty_grad(
    theta: Tensor, forward_set: Tensor, backward_set: Tensor, forward_density: float, strength: float
) -> Tensor:
    """The exact gradient of :func:`penalty` with respect to θ: ``strength * c * θ``.

    Examples:
        >>> a, b = torch.tensor([True, False, False]), torch.tensor([True, True, False])
        >>> penalty_grad(torch.tensor([2.0, 1.0, 5.0]), a, b, 0.5, strength=0.1).tolist()
        [0.20000000298023224, 0.20000000298023224, 0.0]
    """
    c = penalty_weights(forward_set, backward_set, forward_density, theta.dtype)
    return strength * c * theta.detach()
