"""What the callback reports: the metrics dict, FLOPs measured on the model, turnover, the summary rows and table."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from lightning_topkast.planning import Plan
from lightning_topkast.regularizer import penalty
from lightning_topkast.state import MaskedTensor

PREFIX = "topkast"


def flops_fractions(
    masked_flops: Mapping[str, float], dense_flops: float, densities: Mapping[str, tuple[float, float]]
) -> tuple[float, float]:
    """``(training, inference)`` FLOPs of the sparse model as a fraction of the dense one.

    ``masked_flops`` are the forward FLOPs of the operations that read each masked tensor, ``dense_flops`` those of
    every other counted operation (unmasked layers, attention scores), and ``densities`` the ``(|A|/n, |B|/n)`` of
    each masked tensor. A training step costs three times the forward (forward, input gradient, weight gradient);
    Top-KAST runs the first two on A (density D) and the weight gradient on B (density D + M), so a masked tensor
    costs (2D + (D + M)) / 3 of dense in training and D at inference.

    Examples:
        >>> flops_fractions({"w": 100.0}, 100.0, {"w": (0.2, 0.5)})
        (0.65, 0.6)
    """
    total = sum(masked_flops.values()) + dense_flops
    if total == 0:
        return 1.0, 1.0
    train = dense_flops + sum(f * (2 * densities[n][0] + densities[n][1]) / 3 for n, f in masked_flops.items())
    inference = dense_flops + sum(f * densities[n][0] for n, f in masked_flops.items())
    return train / total, inference / total


class FlopCounter:
    """Forward FLOPs per masked tensor, counted by ``torch.utils.flop_counter.FlopCounterMode`` while the model runs.

    Every operation FlopCounterMode has a formula for (matmuls, convolutions, attention kernels) is attributed to
    the masked tensor it reads, by memory address, so views (``weight.t()``, a chunk of ``in_proj_weight``, cuDNN's
    flat LSTM buffer) count for their tensor; the rest is dense. Two kernels torch does not count get a formula
    here: recurrent layers (CPU LSTMs run ``mkldnn_rnn_layer``), 2 FLOPs per weight per time step and sequence, and
    CPU flash attention, 2·L·S·(E + Ev) per head as torch counts it on GPUs. Embedding lookups count 0. Count the
    forward only: :meth:`start` at the batch, :meth:`pause` before a backward pass, :meth:`resume` after it,
    :meth:`finish` at the end of the batch.

    Only one counter runs at a time (dispatch modes nest as a stack): :meth:`start` returns False while another is
    active, and the caller counts on a later batch.
    """

    _active: FlopCounter | None = None

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.masked: dict[str, float] = dict.fromkeys(tensors, 0.0)
        self.dense = 0.0
        self.counted = False  # entered at least once
        self.finished = False  # the totals are final
        spans = [
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n) for n, t in tensors.items() if t.numel()
        ]
        self._spans = sorted(spans)
        self._starts = [s[0] for s in self._spans]
        formulas = {
            **dict.fromkeys(_rnn_ops(), _rnn_total),
            **dict.fromkeys(_cpu_attention_ops(), _attention_total),
            **dict.fromkeys(_copy_ops(), _no_flops),
        }
        self._copies: list[tuple[int, int, str]] = []  # copies of masked tensors made while counting (autocast's)
        self._mode: FlopCounterMode | None = FlopCounterMode(display=False, custom_mapping=formulas)
        # the same formulas, each wrapped to attribute its count; FlopCounterMode passes raw tensors to entries
        self._mode.flop_registry = {op: self._attributing(op, f) for op, f in self._mode.flop_registry.items()}

    def start(self) -> bool:
        """Count from now on; False once :meth:`finish` ended the count, or while another counter runs."""
        if self.finished or FlopCounter._active is not None:
            return FlopCounter._active is self
        FlopCounter._active = self
        assert self._mode is not None
        self._mode.__enter__()
        self.counted = True
        return True

    def resume(self) -> None:
        """Start again after :meth:`pause` if this window has counted (skips a batch another counter owns)."""
        if self.counted:
            self.start()

    def pause(self) -> None:
        """Stop counting (before a backward pass); :meth:`resume` goes on."""
        if FlopCounter._active is self:
            FlopCounter._active = None
            assert self._mode is not None
            self._mode.__exit__(None, None, None)

    def finish(self) -> None:
        """End the count if anything was counted (the totals are final); else the next :meth:`start` tries again."""
        self.pause()
        self.finished = self.counted
        if self.finished:
            self._mode = None  # not needed again; FlopCounterMode holds lambdas, which would stop a pickle

    def _owner(self, tensor: Tensor) -> str | None:
        address = tensor.data_ptr()
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._spans[i][1]:
            return self._spans[i][2]
        return next((name for start, end, name in self._copies if start <= address < end), None)

    def _record(self, owner: str | None, flops: float) -> None:
        if owner is None:
            self.dense += flops
        else:
            self.masked[owner] += flops

    def _attributing(self, op: Any, formula: Any) -> Any:
        rnn = op in _rnn_ops()
        if op in _copy_ops():

            def follow(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
                # under autocast a matmul reads a bf16/fp16 copy of the weight, not the weight: the copy counts for it
                owner = self._owner(args[0]) if args and isinstance(args[0], Tensor) else None
                if owner is not None and isinstance(out_val, Tensor):
                    start = out_val.data_ptr()
                    self._copies.append((start, start + out_val.numel() * out_val.element_size(), owner))
                return 0

            return follow

        def count(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
            flops = formula(*args, out_val=out_val, **kwargs)
            if rnn:
                weights, tokens = _rnn_weights(args)
                for weight in weights:
                    self._record(self._owner(weight), 2.0 * tokens * weight.numel())
                return flops
            owners = {self._owner(t) for t in _tensors((args, kwargs))} - {None}
            if not owners:
                self.dense += flops
            for owner in owners:  # an operation on two masked tensors (rare) counts half for each
                self._record(owner, flops / len(owners))
            return flops

        return count


def _copy_ops() -> list[Any]:
    return [torch.ops.aten._to_copy]


def _no_flops(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return 0


def _rnn_ops() -> list[Any]:
    aten = torch.ops.aten
    return [getattr(aten, name) for name in ("mkldnn_rnn_layer", "_cudnn_rnn", "miopen_rnn") if hasattr(aten, name)]


def _rnn_weights(args: tuple[Any, ...]) -> tuple[list[Tensor], int]:
    """The 2-D weights an RNN kernel multiplies by, and its time steps x sequences."""
    data = args[0]
    tokens = data.numel() // data.shape[-1]
    if isinstance(args[1], Tensor):  # mkldnn_rnn_layer(input, w_ih, w_hh, b_ih, b_hh, hx, cx, ...): one layer
        return [args[1], args[2]], tokens
    return [w for w in args[1] if isinstance(w, Tensor) and w.ndim == 2], tokens  # cuDNN, MIOpen: every layer


def _rnn_total(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
    weights, tokens = _rnn_weights(args)
    return sum(2 * tokens * w.numel() for w in weights)


def _cpu_attention_ops() -> list[Any]:
    aten = torch.ops.aten
    return (
        [aten._scaled_dot_product_flash_attention_for_cpu]
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu")
        else []
    )


def _attention_total(query: Tensor, key: Tensor, value: Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    # (batch, heads, L, E) x (batch, heads, S, E)^T, then x (batch, heads, S, Ev): torch's sdpa formula
    *batch, length, embed = query.shape
    return 2 * _numel(batch) * length * key.shape[-2] * (embed + value.shape[-1])


def _numel(shape: Iterable[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


for _formula in (_rnn_total, _attention_total, _no_flops):
    _formula._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode: pass tensors, not shapes


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class Turnover:
    """The fraction of forward-set members that changed, over the refreshes since the last :meth:`reset`.

    Weighted by |A|, the mean over refreshes is the fraction of all forward-set members that changed: the members
    that left A, summed, over the sizes of A, summed. Two running sums, so a refresh costs two additions (a
    torchmetrics update costs more than a small model's whole refresh), and they stay 0-dim device tensors when the
    engine reads nothing back (``sync_free``). Reading (:meth:`compute`) does not reset: the caller resets after
    logging, as torchmetrics separates the two.
    """

    def __init__(self) -> None:
        self.reset()

    def update(self, moved: Mapping[str, tuple[Any, Any]]) -> None:
        """Record one refresh: ``{name: (left, size)}``, the members of A that left it and the size of A."""
        if not moved:
            return
        lefts, sizes = zip(*moved.values(), strict=True)
        if isinstance(lefts[0], Tensor):  # device values: two sums for all tensors, not two additions per tensor
            self._left = self._left + torch.stack([t.to(lefts[0].device) for t in lefts]).sum()
            self._size = self._size + torch.stack([t.to(lefts[0].device) for t in sizes]).sum()
        else:
            self._left += sum(lefts)
            self._size += sum(sizes)

    def compute(self) -> float:
        """The |A|-weighted mean turnover since the last reset, 0.0 when no refresh happened (nothing moved)."""
        size = float(self._size)
        return float(self._left) / size if size else 0.0

    def reset(self) -> None:
        """Start a new window."""
        self._left: Any = 0
        self._size: Any = 0


def set_sizes(tensors: Mapping[str, MaskedTensor], penalty_strength: float) -> dict[str, Tensor]:
    """Per tensor, as held here (a shard's, under sharding): |A|, |B|, ever in A, non-zeros held, the penalty.

    One float64 vector per tensor, on its device, not read back: sum them over shards before reading.
    """
    return {
        name: torch.stack(
            [
                t.forward_set.sum().double(),
                t.backward_set.sum().double(),
                t.ever_active.sum().double(),
                torch.count_nonzero(t.local_param).double(),
                torch.as_tensor(_penalty(t, penalty_strength), dtype=torch.float64, device=t.theta.device),
            ]
        )
        for name, t in tensors.items()
    }


def density_metrics(
    tensors: Mapping[str, MaskedTensor],
    penalty_strength: float,
    per_tensor: bool = False,
    prefix: str = PREFIX,
    sizes: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, float]:
    """Forward and backward density (target and actual), cumulative exploration and the penalty's value.

    "Actual" forward density counts the non-zeros the model really holds; "target" is the configured density.
    Exploration is the fraction of weights that have ever been in a forward set. ``sizes``: :func:`set_sizes` of
    the whole tensors (summed over shards); default: as held here.
    """
    if sizes is None:
        sizes = {name: v.tolist() for name, v in set_sizes(tensors, penalty_strength).items()}
    numel = sum(t.total for t in tensors.values())
    _, backward, ever, nonzero, penalty_value = (sum(v[i] for v in sizes.values()) for i in range(5))
    metrics = {
        f"{prefix}/forward_density": nonzero / numel,
        f"{prefix}/forward_density_target": sum(t.forward_density * t.total for t in tensors.values()) / numel,
        f"{prefix}/backward_density": backward / numel,
        f"{prefix}/backward_density_target": sum(t.backward_density * t.total for t in tensors.values()) / numel,
        f"{prefix}/exploration": ever / numel,
        f"{prefix}/penalty": float(penalty_value),
    }
    if per_tensor:
        for name, t in tensors.items():
            metrics[f"{prefix}/forward_density/{name}"] = sizes[name][3] / t.total
            metrics[f"{prefix}/forward_density_target/{name}"] = t.forward_density
            metrics[f"{prefix}/backward_density/{name}"] = sizes[name][1] / t.total
            metrics[f"{prefix}/backward_density_target/{name}"] = t.backward_density
    return metrics


def _penalty(tensor: MaskedTensor, strength: float) -> Tensor | float:
    if strength == 0:
        return 0.0
    return penalty(tensor.theta, tensor.forward_set, tensor.backward_set, tensor.forward_density, strength)


def set_densities(tensors: Mapping[str, MaskedTensor]) -> dict[str, tuple[float, float]]:
    """``{name: (|A| / n, |B| / n)}``, the densities the sets really have."""
    return {
        name: (int(t.forward_set.sum()) / t.numel, int(t.backward_set.sum()) / t.numel) for name, t in tensors.items()
    }


def thresholds(theta: Tensor, forward_set: Tensor, backward_set: Tensor) -> tuple[float, float]:
    """The smallest |θ| in the forward set A and in the backward set B: the magnitudes a weight must beat to enter.

    Examples:
        >>> theta = torch.tensor([0.5, -0.1, 0.3, 0.05])
        >>> thresholds(theta, theta.abs() >= 0.5, theta.abs() >= 0.3)
        (0.5, 0.30000001192092896)
    """
    magnitude = theta.detach().abs().float()
    inf = torch.tensor(float("inf"))
    smallest = [torch.where(s, magnitude, inf).min() if s.any() else inf for s in (forward_set, backward_set)]
    return float(smallest[0]), float(smallest[1])


def summary_rows(
    tensors: Mapping[str, MaskedTensor], plan: Plan, sizes: Mapping[str, Sequence[float]] | None = None
) -> list[dict[str, object]]:
    """One row per candidate in registration order: masked tensors with their sets, kept-dense ones with why.

    ``sizes``: :func:`set_sizes` of the whole tensors (summed over shards); default: the sets as held here.
    """
    rows: list[dict[str, object]] = []
    for name, shape in plan.shapes.items():
        t = tensors.get(name)
        numel = _numel(shape)
        if t is None and name not in plan.selection.kept_dense:
            continue
        masked = t is not None
        rows.append(
            {
                "name": name,
                "shape": shape,
                "numel": numel,
                "masked": masked,
                "forward_density": t.forward_density if t is not None else 1.0,
                "backward_density": t.backward_density if t is not None else 1.0,
                "forward_set": _set_size(t, sizes, 0) if t is not None else numel,
                "backward_set": _set_size(t, sizes, 1) if t is not None else numel,
                "why": _why(name, plan) if masked else plan.selection.kept_dense[name],
            }
        )
    return rows


def _set_size(t: MaskedTensor, sizes: Mapping[str, Sequence[float]] | None, column: int) -> int:
    if sizes is not None:
        return int(sizes[t.name][column])
    return int((t.forward_set if column == 0 else t.backward_set).sum())


def _why(name: str, plan: Plan) -> str:
    why = plan.selection.reasons.get(name, "select_targets")
    pattern = plan.pinned.get(name)
    return f"{why}; sparsity_overrides {pattern!r}" if pattern is not None else why


def format_table(rows: list[dict[str, object]], never_masked: Mapping[str, str], overhead_bytes: int) -> str:
    """The summary as a text table, in the spirit of Lightning's ModelSummary.

    Examples:
        >>> rows = [
        ...     {"name": "stem.weight", "shape": (5, 3), "numel": 15, "masked": False, "forward_density": 1.0,
        ...      "backward_density": 1.0, "forward_set": 15, "backward_set": 15,
        ...      "why": "first layer (dense_first_layer=True)"},
        ...     {"name": "fc.weight", "shape": (4, 5), "numel": 20, "masked": True, "forward_density": 0.2,
        ...      "backward_density": 0.5, "forward_set": 4, "backward_set": 10, "why": "default"},
        ... ]
        >>> print(format_table(rows, {"fc.bias": "bias or other 1-D parameter"}, 140))
          | Name        | Shape  | Params | Fwd density | Bwd density | |A| | |B| | Why masked / kept dense
        ----------------------------------------------------------------------------------------------------------------
        0 | stem.weight | (5, 3) | 15     | dense       | dense       |     |     | first layer (dense_first_layer=True)
        1 | fc.weight   | (4, 5) | 20     | 0.200       | 0.500       | 4   | 10  | default
        ----------------------------------------------------------------------------------------------------------------
        Top-KAST masks 20 weights in 1 tensors: 4 in forward sets (0.200), 10 in backward sets (0.500)
        Kept dense: 1 tensors, 15 weights; never masked: bias or other 1-D parameter (1)
        Callback memory: 140 B, 7.00 B per masked weight (dense values and set bytes, measured)
    """
    header = ["", "Name", "Shape", "Params", "Fwd density", "Bwd density", "|A|", "|B|"]
    header.append("Why masked / kept dense")
    body = [_cells(i, r) for i, r in enumerate(rows)]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    ]
    rule = "-" * max(len(line) for line in lines)
    masked = [r for r in rows if r["masked"]]
    numel = sum(int(r["numel"]) for r in masked)  # type: ignore[call-overload]
    in_a = sum(int(r["forward_set"]) for r in masked)  # type: ignore[call-overload]
    in_b = sum(int(r["backward_set"]) for r in masked)  # type: ignore[call-overload]
    dense = [r for r in rows if not r["masked"]]
    never = {}
    for why in never_masked.values():
        never[why] = never.get(why, 0) + 1
    footer = [
        f"Top-KAST masks {numel} weights in {len(masked)} tensors: {in_a} in forward sets ({in_a / numel:.3f}), "
        f"{in_b} in backward sets ({in_b / numel:.3f})",
        f"Kept dense: {len(dense)} tensors, {sum(int(r['numel']) for r in dense)} weights; never masked: "  # type: ignore[call-overload]
        + (", ".join(f"{why} ({n})" for why, n in never.items()) or "nothing"),
        f"Callback memory: {_bytes(overhead_bytes)}, {overhead_bytes / max(numel, 1):.2f} B per masked weight (dense "
        "values and set bytes, measured)",
    ]
    return "\n".join([lines[0], rule, *lines[1:], rule, *footer])


def _cells(index: int, row: Mapping[str, object]) -> list[str]:
    masked = bool(row["masked"])
    return [
        str(index),
        str(row["name"]),
        str(row["shape"]),
        str(row["numel"]),
        f"{row['forward_density']:.3f}" if masked else "dense",
        f"{row['backward_density']:.3f}" if masked else "dense",
        str(row["forward_set"]) if masked else "",
        str(row["backward_set"]) if masked else "",
        str(row["why"]),
    ]


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"
