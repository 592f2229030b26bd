"""Pictures of the masks: per-tensor densities as a bar chart and |θ| histograms with the A and B thresholds marked.

matplotlib is optional (``pip install "lightning-topkast[figures]"``) and imported only here, when a figure is
drawn. Figures are rendered off-screen (Agg) to RGB arrays, which every media logger takes, so nothing touches
pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_topkast.reporting import thresholds

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from lightning_topkast.state import MaskedTensor

EXTRA = "figures"


def require_matplotlib(argument: str) -> None:
    """Raise ``ImportError`` naming ``argument`` and the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"TopKASTCallback({argument}) draws its figures with matplotlib, which is not installed: "
            f'pip install "lightning-topkast[{EXTRA}]" (or pip install matplotlib)'
        ) from error


def density_chart(rows: Sequence[Mapping[str, Any]], step: int) -> Figure:
    """Grouped bars: backward density |B|/n and forward density (non-zeros / n) of each masked tensor."""
    from matplotlib.figure import Figure

    names = [str(r["name"]) for r in rows]
    figure = Figure(figsize=(max(4.0, 0.5 * len(rows) + 2.0), 3.2), layout="constrained")
    ax = figure.subplots()
    positions = list(range(len(rows)))
    ax.bar([p - 0.2 for p in positions], [r["backward"] for r in rows], width=0.4, label="backward set B")
    ax.bar([p + 0.2 for p in positions], [r["forward"] for r in rows], width=0.4, label="forward set A")
    ax.set_xticks(positions, names, rotation=45 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
    ax.set(ylabel="density", ylim=(0, 1.05), title=f"Top-KAST densities per tensor, after {step} steps")
    ax.legend(loc="upper right")
    return figure


def magnitude_histogram(name: str, tensor: MaskedTensor, step: int, bins: int = 60) -> Figure:
    r"""Histogram of |θ| split by set (A, B \ A, outside B), with the A and B thresholds as vertical lines."""
    import numpy as np
    from matplotlib.figure import Figure

    magnitude = tensor.theta.detach().abs().float().flatten().cpu().numpy()
    in_a = tensor.forward_set.flatten().cpu().numpy()
    in_b = tensor.backward_set.flatten().cpu().numpy()
    finite = np.isfinite(magnitude)
    edges = np.histogram_bin_edges(magnitude[finite], bins=bins)
    groups = [finite & ~in_b, finite & in_b & ~in_a, finite & in_a]
    forward, backward = thresholds(tensor.theta, tensor.forward_set, tensor.backward_set)
    figure = Figure(figsize=(5.0, 3.0), layout="constrained")
    ax = figure.subplots()
    ax.hist(
        [magnitude[g] for g in groups],
        bins=edges,
        stacked=True,
        color=["0.75", "tab:blue", "tab:orange"],
        label=["outside B (frozen)", "B \\ A (exploring)", "A (forward)"],
        log=True,  # trained weights are heavy-tailed: the few large ones in A would not show on a linear scale
    )
    ax.axvline(backward, color="tab:blue", linestyle="--", label=f"B threshold {backward:.3g}")
    ax.axvline(forward, color="tab:orange", linestyle="--", label=f"A threshold {forward:.3g}")
    ax.set(xlabel="|θ|", ylabel="weights", title=f"{name}, after {step} steps")
    ax.legend(loc="upper right", fontsize="x-small")
    return figure


def to_rgb(figure: Figure) -> np.ndarray:
    """The figure rendered off-screen as an (H, W, 3) uint8 array."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def mask_images(tensors: Mapping[str, MaskedTensor], step: int, prefix: str) -> dict[str, np.ndarray]:
    """``{key: image}``: ``<prefix>/masks/densities`` and one ``<prefix>/masks/magnitude/<name>`` per tensor."""
    rows = [
        {
            "name": name,
            "forward": int(t.param.count_nonzero()) / t.numel,
            "backward": int(t.backward_set.sum()) / t.numel,
        }
        for name, t in tensors.items()
    ]
    images = {f"{prefix}/masks/densities": to_rgb(density_chart(rows, step))}
    for name, tensor in tensors.items():
        images[f"{prefix}/masks/magnitude/{name}"] = to_rgb(magnitude_histogram(name, tensor, step))
    return images
