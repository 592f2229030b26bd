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
Triton kernels. The selection is a stable sort here (:func:`lightning_topkast.batched.segment_order`, whose order
also gives the new sets) and a radix select there, both exact. A refresh writes the sets through small tables
indexed by each entry's move (old set byte, new set, whether its unit is due): see :func:`_move_tables`.

:class:`FlatPasses` is the engine's :class:`~lightning_topkast.backend.Backend` over one group, whatever its class:
it turns an optimizer step (learning rates, penalty, optimizer state, the schedule) into the group's passes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.optim import Optimizer

from lightning_topkast import kernels
from lightning_topkast.batched import Queries, segment_order, thresholds_in_order
from lightning_topkast.kernels import A_BIT, B_BIT, EVER_BIT
from lightning_topkast.schedule import to_host

if TYPE_CHECKING:
    from lightning_topkast.backend import Moved, Step
    from lightning_topkast.masked import MaskedTensor, Unit
    from lightning_topkast.schedule import Schedule

Coefficients = tuple[Sequence[float], Sequence[float]]  # per tensor: on A, on B \ A


class FlatGroup:
    """Selection units whose tensors share a dtype and a device and are stepped by one optimizer.

    The units' tensors move their θ and set bytes into the group's flat buffers (and keep views of them), and the
    units their thresholds into its table (``[2 · units, 2]``: A's and B's (score, split) of each unit in turn).
    """

    def __init__(self, units: Sequence[Unit]) -> None:
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
        self._needed: dict[float | None, Tensor] = {}
        self._tables: dict[tuple[tuple[float, ...], tuple[float, ...]], tuple[Tensor, Tensor | None]] = {}
        # each unit's order in three runs: its first forward_k entries go to A, the next ones to B \ A, the rest out
        runs = [(unit.forward_k, unit.backward_k - unit.forward_k, unit.size - unit.backward_k) for unit in self.units]
        self._run_lengths = torch.tensor([n for run in runs for n in run], dtype=torch.int64, device=self.device)
        self._run_moves = torch.tensor([IN_A, IN_B, OUT] * len(runs), dtype=torch.int32, device=self.device)
        self._run_moves_due = self._run_moves + DUE
        self._moves = _move_tables(self.device)

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

    def apply(
        self, scores: Tensor, due: Tensor | None, states: Sequence[Sequence[Tensor | None]]
    ) -> tuple[Tensor, Tensor]:
        r"""The sets of the units ``due`` (a bool per unit; None: all) from :attr:`thresholds`; α in the parameters.

        ``states``: per kind of optimizer state (``exp_avg``, ...), each tensor's, or None; it survives where an
        entry stays in B. Returns, per tensor, the members that left A and the size A had (0 where not due).
        """
        in_a, in_b = self._at_least(scores, slice(0, 2))
        moves = torch.where(in_a, IN_A, torch.where(in_b, IN_B, OUT)) + self.code
        moves += DUE if due is None else self.queries.per_entry(due) * DUE
        return self._move(moves, states)

    def _move(self, moves: Tensor, states: Sequence[Sequence[Tensor | None]]) -> tuple[Tensor, Tensor]:
        """Writes the new sets that ``moves`` (per entry: old code + new set + whether due) give; see :meth:`apply`.

        Each entry's move is one of 128 cases: three tables (:func:`_move_tables`) say what each case writes and
        counts, so the whole write is three lookups whatever the sets.
        """
        counted, kept = (torch.index_select(table, 0, moves) for table in self._moves[:2])
        stay, in_a = kept.unbind(1)
        left, size = _segment_sums(counted, self.per_tensor).unbind(1)
        self._keep(states, stay)
        torch.index_select(self._moves[2], 0, moves, out=self.code)
        torch._foreach_copy_(self.params, self._pieces(torch.where(in_a, self.theta, 0)))
        return left, size

    def keep_states(self, states: Sequence[Sequence[Tensor | None]]) -> None:
        """Optimizer state zeroed outside B: per kind, each tensor's, or None."""
        self._keep(states, _bit(self.code, B_BIT))

    def _keep(self, states: Sequence[Sequence[Tensor | None]], where: Tensor) -> None:
        """Optimizer state zeroed where ``where`` is False: one pass for all kinds of one dtype."""
        by_dtype: dict[torch.dtype, list[Sequence[Tensor | None]]] = {}
        for kind in states:
            dtype = next((s.dtype for s in kind if s is not None), self.dtype)
            by_dtype.setdefault(dtype, []).append(kind)
        for kinds in by_dtype.values():
            every = [s for kind in kinds for s in kind]
            kept = torch.where(where, self._gather(every, self.theta).view(len(kinds), -1), 0)
            self._scatter(every, kept.view(-1))

    # --- the steps' decisions, from the passes ----------------------------------------------------------------------

    def early_flags(self, schedule: Schedule) -> Tensor:
        r"""Per unit, whether ``schedule``'s early refresh test calls for a refresh, from :meth:`explorers`."""
        fraction = schedule.early_refresh
        if fraction not in self._needed:
            needed = [schedule.needed(unit.forward_k) for unit in self.units]
            self._needed[fraction] = torch.tensor(needed, dtype=torch.float64, device=self.device)
        return self.explorers() >= self._needed[fraction]

    def refresh(self, due: Tensor | None, states: Sequence[Sequence[Tensor | None]]) -> tuple[Tensor, Tensor]:
        r"""Select A and B anew for the units ``due`` (None: all) and apply them; see :meth:`apply`.

        The sort that finds the thresholds also gives the sets: the entries at the first ``forward_k`` positions
        of a unit's order are A, the next ones B \ A. So no entry is compared against a threshold.
        """
        scores = kernels.scores(self.theta)
        order = segment_order(scores, self.queries, self.top)
        if due is None:
            thresholds_in_order(scores, order, self.queries, out=self.thresholds)
        else:
            found = thresholds_in_order(scores, order, self.queries)
            torch.where(torch.repeat_interleave(due, 2)[:, None], found, self.thresholds, out=self.thresholds)
        runs = (
            self._run_moves_due
            if due is None
            else torch.where(due.repeat_interleave(3), self._run_moves_due, self._run_moves)
        )
        moves = self.code.to(torch.int32).scatter_add_(0, order, torch.repeat_interleave(
            runs, self._run_lengths, output_size=self.numel
        ))  # fmt: skip
        return self._move(moves, states)

    # --- helpers -------------------------------------------------------------------------------------------------

    def _pieces(self, flat: Tensor) -> list[Tensor]:
        """Per tensor, its range of a flat buffer, in the shape of the parameter (of its local shard) (views).

        A buffer of several kinds of values (``kinds × numel`` entries) gives each kind's pieces in turn.
        """
        kinds = flat.numel() // self.numel if self.numel else 1
        shapes = [p.shape for p in self.params] * kinds
        return [piece.view(shape) for piece, shape in zip(flat.split(self.sizes * kinds), shapes, strict=True)]

    def _gather(self, tensors: Sequence[Tensor | None], filler: Tensor) -> Tensor:
        """One flat tensor of per-tensor ``tensors``; a missing one's range comes from the flat ``filler``.

        Several kinds of values (optimizer states) go in one call: a tensor per tensor of the group, kind after kind.
        """
        fill = self._pieces(filler)
        return torch.cat([(fill[i % len(fill)] if t is None else t).reshape(-1) for i, t in enumerate(tensors)])

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
        return self._coefficient_tables(coefficients)[0]

    def _coefficient_tables(self, coefficients: Coefficients) -> tuple[Tensor, Tensor | None]:
        """:meth:`coefficient_table`, and for shared coefficients the same by set byte (``[8]``), else None."""
        on_a, on_exploring = (tuple(c) for c in coefficients)
        tables = self._tables.get((on_a, on_exploring))
        if tables is None:  # a new learning rate: small copies that do not wait, through pinned memory
            uniform = len(set(on_a)) == 1 and len(set(on_exploring)) == 1
            rows = [(on_a[0], on_exploring[0])] if uniform else list(zip(on_a, on_exploring, strict=True))
            by_code = [on_a[0] if code & A_BIT else on_exploring[0] for code in range(8)] if uniform else None
            tables = (
                to_device(torch.tensor(rows, dtype=self.dtype), self.device),
                None if by_code is None else to_device(torch.tensor(by_code, dtype=self.dtype), self.device),
            )
            self._tables = {(on_a, on_exploring): tables}  # the last one only: learning rates change
        return tables

    def _per_set(self, coefficients: Coefficients) -> Tensor:
        r"""Per entry, its tensor's coefficient on A or on B \ A (outside B it multiplies 0: any will do)."""
        table, by_code = self._coefficient_tables(coefficients)
        if by_code is not None:  # the same for every tensor: a lookup by set byte
            return torch.index_select(by_code, 0, self.code.to(torch.int32))
        per_entry = self.per_tensor.per_entry(table)
        return torch.where(_bit(self.code, A_BIT), per_entry[:, 0], per_entry[:, 1])


class FlatPasses:
    """The :class:`~lightning_topkast.backend.Backend` over one flat group: each pass once over the group.

    The early refresh decides on the test of the last step (its flags reach the host while the device runs on),
    so a step knows before its merge which units refresh, and writes α only where no refresh will.
    """

    def __init__(self, group: FlatGroup) -> None:
        self.group = group
        self.tensors, self.units = group.tensors, group.units

    def prepare(self, step: Step) -> None:
        """See :meth:`lightning_topkast.backend.Backend.prepare`."""
        grads = [t.local_grad for t in self.tensors]
        if any(g is not None for g in grads):
            penalty = step.penalty
            self.group.prepare(grads, self._coefficients([penalty] * len(grads)) if penalty else None)
            step.pending.update(t.name for t in self.tensors)

    def finish(self, step: Step) -> list[str | None]:
        """See :meth:`lightning_topkast.backend.Backend.finish`: θ from the update; α unless a refresh follows."""
        prepared = self.tensors[0].name in step.pending  # the group is prepared as a whole
        step.pending.difference_update(t.name for t in self.tensors)
        reasons = [step.schedule.due_on_last_test(unit) for unit in self.units]
        due = [why is not None for why in reasons]
        if prepared:
            decoupled = None
            if step.decoupled:
                rates = step.rates()
                decoupled = self._coefficients([-rates[id(t.param)] * step.decoupled for t in self.tensors])
            self.group.merge(decoupled, alpha=not any(due))
            if step.schedule.early_refresh is not None and not all(due):  # the test, read at the next step
                flags = to_host(self.group.early_flags(step.schedule)).entries(len(self.units))
                for unit, flag in zip(self.units, flags, strict=True):
                    unit.early_flag = flag
        return reasons

    def refresh(self, step: Step, due: Sequence[bool]) -> Moved:
        """See :meth:`lightning_topkast.backend.Backend.refresh`."""
        for unit, refreshes in zip(self.units, due, strict=True):
            if refreshes:  # this step's early test measured the old sets
                step.schedule.refreshed(unit)
        due_mask = None if all(due) else to_device(torch.tensor(due), self.group.device)
        left, size = self.group.refresh(due_mask, self.state_kinds(step.optimizer))
        refreshed = {id(unit) for unit, refreshes in zip(self.units, due, strict=True) if refreshes}
        return {t.name: (left[i], size[i]) for i, t in enumerate(self.tensors) if id(t.unit) in refreshed}

    def keep_states(self, step: Step) -> None:
        """See :meth:`lightning_topkast.backend.Backend.keep_states`."""
        self.group.keep_states(self.state_kinds(step.optimizer))

    def state_kinds(self, optimizer: Optimizer) -> list[list[Tensor | None]]:
        """The optimizer state of the group by key (``exp_avg``, ...): per key, each tensor's, or None."""
        per_tensor = [t.optimizer_states(optimizer) for t in self.tensors]
        keys = dict.fromkeys(key for states in per_tensor for key in states)
        return [[states.get(key) for states in per_tensor] for key in keys]

    def _coefficients(self, on_a: Sequence[float]) -> Coefficients:
        r"""The penalty's coefficients per tensor: ``on_a`` on A, ``on_a`` / D on B \ A."""
        on_a = list(on_a)
        return on_a, [c / t.forward_density for c, t in zip(on_a, self.tensors, strict=True)]


# A refresh's move of one entry, as an index into the tables of :func:`_move_tables`: its old set byte (0-7) plus
# where the new selection puts it plus whether its unit refreshes now (else it keeps its sets).
OUT, IN_B, IN_A, DUE = 0, 8, 16, 64


@functools.cache
def _move_tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    r"""What each move writes and counts, by move (128 of them).

    ``counted`` ``[128, 2]``: whether the entry left A, whether it was in A (both only for the units due);
    ``kept`` ``[128, 2]``: whether its optimizer state survives (in B before and after), whether it is in the new A;
    and its new set byte ``[128]``: the old one where the unit is not due.
    """
    counted, kept, code = [], [], []
    for move in range(2 * DUE):
        old, new, due = move % IN_B, move % DUE // IN_B, move >= DUE
        was_a, was_b, ever = bool(old & A_BIT), bool(old & B_BIT), old & EVER_BIT
        in_a, in_b = (new * IN_B == IN_A, new * IN_B in (IN_A, IN_B)) if due else (was_a, was_b)
        counted.append((due and was_a and not in_a, due and was_a))
        kept.append((was_b and in_b, in_a))
        code.append((A_BIT | B_BIT | EVER_BIT) if in_a else (ever | B_BIT if in_b else ever) if due else old)
    return (
        torch.tensor(counted, device=device),
        torch.tensor(kept, device=device),
        torch.tensor(code, dtype=torch.uint8, device=device),
    )


def _bit(code: Tensor, bit: int) -> Tensor:
    """One set as bools: the 0/1 bytes reinterpreted, no copy."""
    shifted = code if bit == 1 else code >> (bit.bit_length() - 1)
    return (shifted & 1).view(torch.bool)


def _segment_sums(flags: Tensor, queries: Queries) -> Tensor:
    """Per segment, the number of true ``flags`` (per column, if 2-D): a cumulative sum read at the segments' ends."""
    padded = F.pad(torch.cumsum(flags, 0), (0, 0) * (flags.dim() - 1) + (1, 0))  # a 0 before the first entry
    bounds = queries.cached(
        "segment_bounds",
        lambda: torch.stack(
            [queries.tensors["segment_starts"] + queries.tensors["sizes"], queries.tensors["segment_starts"]]
        ),
    )
    ends, starts = padded[bounds].unbind(0)
    return ends - starts


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without waiting for it: through pinned memory on a GPU."""
    if device.type == "cpu":
        return values
    return values.pin_memory().to(device, non_blocking=True)
