"""What the callback reports: the metrics dict, the theoretical FLOPs fraction and the summary table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_topkast.regularizer import penalty
from lightning_topkast.state import MaskedTensor

PREFIX = "topkast"


@dataclass(frozen=True)
class LayerCost:
    """Forward FLOPs of one Linear/Conv call and the densities its weight runs at (1.0 for a dense layer)."""

    flops: float
    forward_density: float
    backward_density: float


def flops_fractions(layers: Iterable[LayerCost]) -> tuple[float, float]:
    """Theoretical ``(training, inference)`` FLOPs of the sparse model as a fraction of the dense one.

    A dense training step costs 3F per layer (forward, input gradient, weight gradient). Top-KAST runs the forward
    and the input gradient on A (density D) and the weight gradient on B (density D + M): (2D + (D + M)) / 3 of
    dense. Inference costs D.

    Examples:
        >>> flops_fractions([LayerCost(100.0, 0.2, 0.5), LayerCost(100.0, 1.0, 1.0)])
        (0.65, 0.6)
    """
    layers = list(layers)
    total = sum(layer.flops for layer in layers)
    if total == 0:
        return 1.0, 1.0
    train = sum(layer.flops * (2 * layer.forward_density + layer.backward_density) / 3 for layer in layers)
    inference = sum(layer.flops * layer.forward_density for layer in layers)
    return train / total, inference / total


def density_metrics(
    tensors: Mapping[str, MaskedTensor], penalty_strength: float, per_tensor: bool = False
) -> dict[str, float]:
    """Forward and backward density (target and actual), cumulative exploration and the penalty's value.

    "Actual" forward density counts the non-zeros the model really holds; "target" is the configured density.
    Exploration is the fraction of weights that have ever been in a forward set.
    """
    numel = sum(t.numel for t in tensors.values())
    nonzero = {name: int(torch.count_nonzero(t.param)) for name, t in tensors.items()}
    metrics = {
        f"{PREFIX}/forward_density": sum(nonzero.values()) / numel,
        f"{PREFIX}/forward_density_target": sum(t.forward_density * t.numel for t in tensors.values()) / numel,
        f"{PREFIX}/backward_density": sum(int(t.backward_set.sum()) for t in tensors.values()) / numel,
        f"{PREFIX}/backward_density_target": sum(t.backward_density * t.numel for t in tensors.values()) / numel,
        f"{PREFIX}/exploration": sum(int(t.ever_active.sum()) for t in tensors.values()) / numel,
        f"{PREFIX}/penalty": float(sum(_penalty(t, penalty_strength) for t in tensors.values())),
    }
    if per_tensor:
        for name, t in tensors.items():
            metrics[f"{PREFIX}/forward_density/{name}"] = nonzero[name] / t.numel
            metrics[f"{PREFIX}/forward_density_target/{name}"] = t.forward_density
            metrics[f"{PREFIX}/backward_density/{name}"] = int(t.backward_set.sum()) / t.numel
            metrics[f"{PREFIX}/backward_density_target/{name}"] = t.backward_density
    return metrics


def _penalty(tensor: MaskedTensor, strength: float) -> Tensor | float:
    if strength == 0:
        return 0.0
    return penalty(tensor.theta, tensor.forward_set, tensor.backward_set, tensor.forward_density, strength)


def summary_rows(tensors: Mapping[str, MaskedTensor]) -> list[dict[str, object]]:
    """One row per masked tensor: name, shape, numel, target densities and the sizes of A and B."""
    return [
        {
            "name": name,
            "shape": tuple(t.theta.shape),
            "numel": t.numel,
            "forward_density": t.forward_density,
            "backward_density": t.backward_density,
            "forward_set": int(t.forward_set.sum()),
            "backward_set": int(t.backward_set.sum()),
        }
        for name, t in tensors.items()
    ]


def format_table(rows: list[dict[str, object]], kept_dense: Mapping[str, str], overhead_bytes: int) -> str:
    """The summary as a text table, in the spirit of Lightning's ModelSummary.

    Examples:
        >>> row = {"name": "fc.weight", "shape": (4, 5), "numel": 20, "forward_density": 0.2,
        ...        "backward_density": 0.5, "forward_set": 4, "backward_set": 10}
        >>> print(format_table([row], {"stem.weight": "first layer"}, 140))
          | Name      | Shape  | Params | Fwd density | Bwd density | |A| | |B|
        -----------------------------------------------------------------------
        0 | fc.weight | (4, 5) | 20     | 0.200       | 0.500       | 4   | 10
        -----------------------------------------------------------------------
        Top-KAST masks 20 weights in 1 tensors: 4 in forward sets (0.200), 10 in backward sets (0.500)
        Kept dense: stem.weight (first layer)
        Callback memory: 140 B, 7.00 B per masked weight (dense values and set bytes, measured)
    """
    header = ["", "Name", "Shape", "Params", "Fwd density", "Bwd density", "|A|", "|B|"]
    body = [
        [
            str(i),
            str(r["name"]),
            str(r["shape"]),
            str(r["numel"]),
            f"{r['forward_density']:.3f}",
            f"{r['backward_density']:.3f}",
            str(r["forward_set"]),
            str(r["backward_set"]),
        ]
        for i, r in enumerate(rows)
    ]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    ]
    rule = "-" * max(len(line) for line in lines)
    numel = sum(int(r["numel"]) for r in rows)  # type: ignore[call-overload]
    in_a = sum(int(r["forward_set"]) for r in rows)  # type: ignore[call-overload]
    in_b = sum(int(r["backward_set"]) for r in rows)  # type: ignore[call-overload]
    footer = [
        f"Top-KAST masks {numel} weights in {len(rows)} tensors: {in_a} in forward sets ({in_a / numel:.3f}), "
        f"{in_b} in backward sets ({in_b / numel:.3f})",
        f"Kept dense: {', '.join(f'{n} ({r})' for n, r in kept_dense.items()) or 'none'}",
        f"Callback memory: {_bytes(overhead_bytes)}, {overhead_bytes / max(numel, 1):.2f} B per masked weight (dense "
        "values and set bytes, measured)",
    ]
    return "\n".join([lines[0], rule, *lines[1:], rule, *footer])


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"
