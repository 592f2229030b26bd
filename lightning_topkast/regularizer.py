r"""The exploration penalty of Top-KAST and its exact gradient.

Per entry the penalty weight is c = 1 on the forward set A, 1/D on the exploration set B \ A and 0 outside the
backward set B; the penalty is ``strength / 2 * sum(c * θ²)`` on the dense θ (METHOD.md, rule 3). Weights in A are
kept from entrenching themselves, and weights in B \ A must earn their way in against a penalty 1/D times stronger.

How the penalty reaches the weights depends on the optimizer (:func:`resolve_penalty`). Through the gradient, Adam's
normalised step turns λ·c·θ into a step of about the learning rate toward zero for every weight whose loss gradient
is smaller, so A's smallest members collapse onto B \ A's and the sets churn; decoupled (θ -= lr·λ·c·θ after the
update, as AdamW's weight decay) it stays a shrinkage proportional to θ. Measured on the KJV character LM under
AdamW (docs/language-models.md): λ = 1e-3 through the gradient lost 0.29 bits/char against 1e-4 and tripled the
turnover of A; decoupled, every λ from 1e-3 to 1e-1 beat the coupled default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PENALTY = 1e-4  # λ through the gradient (SparseML's value): the default under SGD and every non-Adam optimizer
DECOUPLED_PENALTY = 3e-2  # λ decoupled: the default under Adam and AdamW, the best of 1e-4 ... 1e-1 on the KJV LM
ADAPTIVE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)


def resolve_penalty(
    strength: float | None, decoupled: bool | None, optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[float, bool]:
    """The penalty's λ and whether it is decoupled, with None choosing from the optimizers that step the masks.

    ``decoupled=None`` is decoupled when every one of ``optimizers`` is an Adam or AdamW (subclasses too), through the
    gradient otherwise; ``strength=None`` is :data:`DECOUPLED_PENALTY` when decoupled under those optimizers, else
    :data:`PENALTY`. A value given explicitly is kept as it is.

    Examples:
        >>> w = [torch.nn.Parameter(torch.zeros(2))]
        >>> resolve_penalty(None, None, [torch.optim.AdamW(w)]), resolve_penalty(None, None, [torch.optim.SGD(w)])
        ((0.03, True), (0.0001, False))
        >>> resolve_penalty(1e-3, None, [torch.optim.Adam(w)]), resolve_penalty(None, False, [torch.optim.Adam(w)])
        ((0.001, True), (0.0001, False))
    """
    adaptive = bool(optimizers) and all(isinstance(opt, ADAPTIVE_OPTIMIZERS) for opt in optimizers)
    if decoupled is None:
        decoupled = adaptive
    if strength is None:
        strength = DECOUPLED_PENALTY if decoupled and adaptive else PENALTY
    return strength, decoupled


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
