"""How a density budget is spread over the masked tensors.

Every distribution has the same signature: ``(shapes, density) -> {name: density}``, where ``shapes`` maps tensor
names to shapes in a fixed order. ``"global"`` has no per-tensor densities (one top-k ranks all weights together),
so :func:`densities` returns the budget for every tensor and selection does the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from lightning_topkast.selection import count
from lightning_topkast.validation import density as density_of

DISTRIBUTIONS = ("uniform", "erk", "global")

Shapes = Mapping[str, tuple[int, ...]]


def uniform(shapes: Shapes, density: float) -> dict[str, float]:
    """The same density for every tensor.

    Examples:
        >>> uniform({"a": (4, 4), "b": (2, 8)}, 0.25)
        {'a': 0.25, 'b': 0.25}
    """
    return dict.fromkeys(shapes, density)


def erk(shapes: Shapes, density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities, as RigL (Evci et al., 2020) defines them.

    Density of a tensor is proportional to ``sum(shape) / prod(shape)`` (small and thin tensors stay denser) and the
    total number of kept weights equals ``density * sum(numel)``. A tensor whose density would exceed 1 is kept
    dense and the rest is solved again, as in RigL's ``get_sparsities_erdos_renyi``.

    Examples:
        >>> {k: round(v, 4) for k, v in erk({"wide": (100, 100), "thin": (100, 2)}, 0.1).items()}
        {'wide': 0.082, 'thin': 1.0}
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        budget = density * sum(numel.values()) - sum(numel[name] for name in dense)
        divisor = sum(raw[name] * numel[name] for name in free)
        if not free or divisor == 0:
            return dict.fromkeys(shapes, 1.0)
        scale = budget / divisor
        too_dense = {name for name in free if scale * raw[name] > 1.0}
        if not too_dense:
            return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}
        dense |= too_dense


def global_(shapes: Shapes, density: float) -> dict[str, float]:
    """The budget for every tensor; the per-tensor split is decided by one top-k over all of them at each refresh."""
    return uniform(shapes, density)


_BY_NAME: dict[str, Callable[[Shapes, float], dict[str, float]]] = {"uniform": uniform, "erk": erk, "global": global_}


def densities(distribution: str, shapes: Shapes, density: float) -> dict[str, float]:
    """Per-tensor densities of ``distribution`` (one of :data:`DISTRIBUTIONS`) for the budget ``density``."""
    if distribution not in _BY_NAME:
        raise ValueError(f"distribution={distribution!r} is not known; use one of {', '.join(DISTRIBUTIONS)}")
    return _BY_NAME[distribution](shapes, density)


def forward_backward_densities(
    distribution: str, shapes: Shapes, forward_density: float, backward_density: float
) -> dict[str, tuple[float, float]]:
    """``{name: (D, D + M)}`` for every tensor, with D ≤ D + M per tensor.

    ERK densities grow with the budget, so the backward densities of the larger budget are never below the forward
    ones; ``max`` only guards the float rounding of that equality.
    """
    forward = densities(distribution, shapes, forward_density)
    backward = densities(distribution, shapes, backward_density)
    return {name: (forward[name], max(forward[name], backward[name])) for name in shapes}


def max_sparsity(distribution: str, shapes: Shapes) -> float:
    """The largest forward sparsity, rounded down to 4 decimals, that leaves every tensor a non-empty forward set.

    For ``"global"``, the tensors ranked together must keep at least one weight between them.

    Examples:
        >>> max_sparsity("uniform", {"a": (10, 10), "b": (3,)}), max_sparsity("global", {"a": (10, 10), "b": (3,)})
        (0.8333, 0.9951)
    """
    numels = {name: math.prod(shape) for name, shape in shapes.items()}

    def feasible(sparsity: float) -> bool:
        density = density_of(sparsity)  # as the callback turns a sparsity into D
        if distribution == "global":
            return count(density, sum(numels.values())) >= 1
        return all(count(d, numels[name]) >= 1 for name, d in densities(distribution, shapes, density).items())

    # ERK densities grow with the budget, so feasibility is monotone in the sparsity
    feasible_below, infeasible_above = 0.0, 1.0
    for _ in range(50):
        middle = (feasible_below + infeasible_above) / 2
        if feasible(middle):
            feasible_below = middle
        else:
            infeasible_above = middle
    return math.floor(feasible_below * 1e4) / 1e4
