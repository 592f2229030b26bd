r"""The device path: Top-KAST's passes over every masked tensor of one dtype and device at once, with no host sync.

On a GPU every torch operation is a kernel launch, so a pass per tensor costs launches in proportion to the number
of tensors (thousands per step on a language model). Here θ and the set bytes of all the tensors one optimizer
steps live in one flat buffer each (:class:`FlatGroup`; each tensor's ``theta`` and ``code`` are views into them),
and each pass runs once over the buffer: parameters, gradients and optimizer state are gathered with one
``torch.cat`` and written back with one ``torch._foreach_copy_``. The number of launches in a step does not depend
on the number of tensors.

:class:`FlatGroup` runs the passes as torch operations: what :class:`lightning_topkast.kernels.TorchKernels`
computes per tensor, with the same operations in the same order, so bit-identical to it and so to the compiled CPU
path. :class:`lightning_topkast.triton_kernels.TritonGroup` runs the same passes, with the same signatures, as fused
Triton kernels. The selection is :func:`lightning_topkast.batched.select_by_sort` here and a radix select there,
both exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_topkast import kernels
from lightning_topkast.batched import Queries, select_by_sort
from lightning_topkast.kernels import A_BIT, B_BIT, EVER_BIT

if TYPE_CHECKING:
    from lightning_topkast.state import MaskedTensor, _Unit

Coefficients = tuple[Sequence[float], Sequence[float]]  # per tensor: on A, on B \ A


class FlatGroup:
    """Selection units whose tensors share a dtype and a device and are stepped by one optimizer.

    The units' tensors move their θ and set bytes into the group's flat buffers (and keep views of them), and the
    units their thresholds into its table (``[2 · units, 2]``: A's and B's (score, split) of each unit in turn).
    """

    def __init__(self, units: Sequence[_Unit]) -> None:
        self.units = list(units)
        self.tensors: list[MaskedTensor] = [t for unit in self.units for t in unit.tensors]
        self.params: list[Tensor] = [t.local_param for t in self.tensors]  # a DTensor's local shard
        self.sizes = [t.numel for t in self.tensors]
        self.numel = sum(self.sizes)
        first = self.tensors[0].theta
        self.dtype, self.device, self.top = first.dtype, first.device, kernels.infinity_score(first.dtype)
        self.theta = torch.cat([t.theta.reshape(-1) for t in self.tensors])
        self.code = torch.cat([t.code.reshape(-1) for t in self.tensors])
        for tensor, theta, code in zip(self.tensors, self._pieces(self.theta), self._pieces(self.code), strict=True):
            tensor.theta, tensor.code = theta, code
        self.queries = Queries(
            tuple(unit.size for unit in self.units),
            tuple(u for u in range(len(self.units)) for _ in range(2)),
            tuple(k for unit in self.units for k in (unit.forward_k, unit.backward_k)),
            self.device,
        )
        self.per_tensor = Queries(tuple(self.sizes), (), (), self.device)  # repeats per-tensor values per entry
        self.thresholds = torch.zeros(2 * len(self.units), 2, dtype=torch.int64, device=self.device)
        self.adopt_thresholds()
        # a split is an index in the whole unit; a unit's entries here start at its first tensor's offset in it
        # (0, or where a shard begins in the whole tensor)
        starts = self.queries.tensors["segment_starts"]
        first = torch.tensor([unit.tensors[0].offset for unit in self.units], dtype=torch.int64, device=self.device)
        self._split_offsets = torch.stack([torch.zeros_like(starts), starts - first], dim=1)[:, None, :]  # [units,1,2]
        self._in_a_code = torch.tensor(A_BIT | B_BIT | EVER_BIT, dtype=torch.uint8, device=self.device)
        self._needed: dict[float, Tensor] = {}
        self._tables: dict[tuple[tuple[float, ...], tuple[float, ...]], Tensor] = {}

    def adopt_thresholds(self) -> None:
        """Take the units' thresholds into the table; the units then hold views of its rows.

        Thresholds held as device tensors are stacked where they are: nothing is read back.
        """
        with torch.no_grad():
            rows = [
                torch.stack([torch.as_tensor(v, dtype=torch.int64, device=self.device) for v in threshold])
                for unit in self.units
                for threshold in (unit.forward, unit.backward)
            ]
            self.thresholds.copy_(torch.stack(rows))
        for u, unit in enumerate(self.units):
            unit.forward = (self.thresholds[2 * u, 0], self.thresholds[2 * u, 1])
            unit.backward = (self.thresholds[2 * u + 1, 0], self.thresholds[2 * u + 1, 1])

    # --- the passes ------------------------------------------------------------------------------------------------

    def prepare(self, grads: Sequence[Tensor | None], coefficients: Coefficients | None) -> None:
        r"""Before the update: parameters = θ on B, 0 elsewhere; gradients on B only, plus c·θ.

        ``coefficients``: the penalty's c on A and on B \ A per tensor, or None. A tensor without a gradient gets
        θ on B too: the optimizer leaves it, and :meth:`merge` takes it back.
        """
        in_b = _bit(self.code, B_BIT)
        kept = torch.where(in_b, self.theta, 0)
        torch._foreach_copy_(self.params, self._pieces(kept))
        masked = torch.where(in_b, self._gather(grads, kept), 0)
        if coefficients is not None:
            masked = masked + self._per_set(coefficients) * kept  # g + (c·θ), as the per-tensor passes round it
        self._scatter(grads, masked)

    def merge(self, coefficients: Coefficients | None, alpha: bool) -> None:
        r"""After the update: θ = parameter on B (plus d·parameter, the decoupled penalty), θ elsewhere.

        ``coefficients``: d on A and on B \ A per tensor, or None. Then the parameters get α, unless ``alpha`` is
        False because a refresh follows, which writes it.
        """
        flat = torch.cat([p.reshape(-1) for p in self.params])
        if coefficients is not None:
            flat = flat + self._per_set(coefficients) * flat
        torch.where(_bit(self.code, B_BIT), flat, self.theta, out=self.theta)
        if alpha:
            torch._foreach_copy_(self.params, self._pieces(torch.where(_bit(self.code, A_BIT), self.theta, 0)))

    def explorers(self) -> Tensor:
        r"""Per unit, the members of B \ A at or above A's threshold: what the early refresh tests."""
        (above_a,) = self._at_least(kernels.scores(self.theta), slice(0, 1))
        return _segment_sums(above_a & ((self.code & (A_BIT | B_BIT)) == B_BIT), self.queries)

    def select(self, scores: Tensor) -> Tensor:
        """The thresholds of every unit's A and B from the flat ``scores``, as :attr:`thresholds` holds them."""
        return select_by_sort(scores, self.queries, self.top)

    def apply(
        self, scores: Tensor, due: Tensor | None, states: Sequence[Sequence[Tensor | None]]
    ) -> tuple[Tensor, Tensor]:
        r"""The sets of the units ``due`` (a bool per unit; None: all) from :attr:`thresholds`; α in the parameters.

        ``states``: per kind of optimizer state (``exp_avg``, ...), each tensor's, or None; it survives where an
        entry stays in B. Returns, per tensor, the members that left A and the size A had (0 where not due).
        """
        in_a, in_b = self._at_least(scores, slice(0, 2))
        was_a, was_b = _bit(self.code, A_BIT), _bit(self.code, B_BIT)
        if due is not None:  # the other units keep their sets
            due_here = self.queries.per_entry(due)
            in_a, in_b = torch.where(due_here, in_a, was_a), torch.where(due_here, in_b, was_b)
            was_a = was_a & due_here
        left, size = _segment_sums(torch.stack([was_a & ~in_a, was_a], dim=1), self.per_tensor).unbind(1)
        stay = was_b & in_b
        for kind in states:
            self._scatter(kind, torch.where(stay, self._gather(kind, self.theta), 0))
        ever = self.code & EVER_BIT
        torch.where(in_a, self._in_a_code, torch.where(in_b, ever | B_BIT, ever), out=self.code)
        torch._foreach_copy_(self.params, self._pieces(torch.where(in_a, self.theta, 0)))
        return left, size

    def keep_states(self, states: Sequence[Sequence[Tensor | None]]) -> None:
        """Optimizer state zeroed outside B: per kind, each tensor's, or None."""
        in_b = _bit(self.code, B_BIT)
        for kind in states:
            self._scatter(kind, torch.where(in_b, self._gather(kind, self.theta), 0))

    # --- the steps' decisions, from the passes ----------------------------------------------------------------------

    def early_flags(self, fraction: float) -> Tensor:
        r"""Per unit, whether the early refresh is due.

        It is when the members of B \ A at or above A's threshold number at least ``fraction`` of |A| (and one).
        """
        if fraction not in self._needed:
            needed = [max(1.0, fraction * unit.forward_k) for unit in self.units]
            self._needed[fraction] = torch.tensor(needed, dtype=torch.float64, device=self.device)
        return self.explorers() >= self._needed[fraction]

    def refresh(self, due: Tensor | None, states: Sequence[Sequence[Tensor | None]]) -> tuple[Tensor, Tensor]:
        """Select A and B anew for the units ``due`` (None: all) and apply them; see :meth:`apply`."""
        scores = kernels.scores(self.theta)
        found = self.select(scores)
        if due is None:
            self.thresholds.copy_(found)
        else:
            torch.where(torch.repeat_interleave(due, 2)[:, None], found, self.thresholds, out=self.thresholds)
        return self.apply(scores, due, states)

    # --- helpers -------------------------------------------------------------------------------------------------

    def _pieces(self, flat: Tensor) -> list[Tensor]:
        """Per tensor, its range of a flat buffer, in the parameter's shape (views)."""
        return [piece.view(p.shape) for piece, p in zip(flat.split(self.sizes), self.params, strict=True)]

    def _gather(self, tensors: Sequence[Tensor | None], filler: Tensor) -> Tensor:
        """One flat tensor of per-tensor ``tensors``; a missing one's range comes from the flat ``filler``."""
        fill = self._pieces(filler)
        return torch.cat([(fill[i] if t is None else t).reshape(-1) for i, t in enumerate(tensors)])

    def _scatter(self, tensors: Sequence[Tensor | None], flat: Tensor) -> None:
        """Write ``flat``'s ranges back into ``tensors``, skipping the missing ones."""
        pieces = self._pieces(flat)
        present = [i for i, t in enumerate(tensors) if t is not None]
        torch._foreach_copy_([tensors[i] for i in present], [pieces[i] for i in present])  # type: ignore[misc]

    def _at_least(self, scores: Tensor, sets: slice) -> list[Tensor]:
        """Per entry, whether it is at or above its unit's threshold of each set in ``sets`` (0: A, 1: B)."""
        rows = self.thresholds.view(len(self.units), 2, 2)[:, sets] + self._split_offsets  # splits as flat indices
        per_entry = self.queries.per_entry(rows)
        index = torch.arange(self.numel, device=self.device)
        return [
            (scores > per_entry[:, j, 0]) | ((scores == per_entry[:, j, 0]) & (index < per_entry[:, j, 1]))
            for j in range(rows.shape[1])
        ]

    def coefficient_table(self, coefficients: Coefficients) -> Tensor:
        r"""``[tensors, 2]`` (on A, on B \ A) in θ's dtype on the device; ``[1, 2]`` when every tensor shares them."""
        on_a, on_exploring = (tuple(c) for c in coefficients)
        table = self._tables.get((on_a, on_exploring))
        if table is None:  # a new learning rate: a small copy that does not wait, through pinned memory
            uniform = len(set(on_a)) == 1 and len(set(on_exploring)) == 1
            rows = [(on_a[0], on_exploring[0])] if uniform else list(zip(on_a, on_exploring, strict=True))
            table = to_device(torch.tensor(rows, dtype=self.dtype), self.device)
            self._tables = {(on_a, on_exploring): table}  # the last one only: learning rates change
        return table

    def _per_set(self, coefficients: Coefficients) -> Tensor:
        r"""Per entry, its tensor's coefficient on A or on B \ A (outside B it multiplies 0: any will do)."""
        table = self.coefficient_table(coefficients)
        if table.shape[0] == 1:  # the same for every tensor: no per-entry copy
            return torch.where(_bit(self.code, A_BIT), table[0, 0], table[0, 1])
        per_entry = self.per_tensor.per_entry(table)
        return torch.where(_bit(self.code, A_BIT), per_entry[:, 0], per_entry[:, 1])


def _bit(code: Tensor, bit: int) -> Tensor:
    """One set as bools: the 0/1 bytes reinterpreted, no copy."""
    shifted = code if bit == 1 else code >> (bit.bit_length() - 1)
    return (shifted & 1).view(torch.bool)


def _segment_sums(flags: Tensor, queries: Queries) -> Tensor:
    """Per segment, the number of true ``flags`` (per column, if 2-D): a cumulative sum read at the segments' ends."""
    padded = F.pad(torch.cumsum(flags, 0), (0, 0) * (flags.dim() - 1) + (1, 0))  # a 0 before the first entry
    ends = queries.cached("segment_ends", lambda: queries.tensors["segment_starts"] + queries.tensors["sizes"])
    return padded[ends] - padded[queries.tensors["segment_starts"]]


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without waiting for it: through pinned memory on a GPU."""
    if device.type == "cpu":
        return values
    return values.pin_memory().to(device, non_blocking=True)
