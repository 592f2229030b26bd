"""The per-tensor backend: each pass runs per masked tensor, through the tensor's kernels.

The kernels (:mod:`lightning_topkast.kernels`) are compiled C loops for fp32/fp64 CPU tensors (:class:`CKernels`)
or the same passes as torch operations (:class:`TorchKernels`); tensors of one kind of kernels go in one call per
pass. Two classes:

- :class:`PerTensorPasses`, on the host (the CPU path): each step's counts against the thresholds are read back,
  the early refresh decides on this step's test, and a refresh searches near the old thresholds
  (:func:`lightning_topkast.selection.search_thresholds`), or does nothing when the counts say the sets still split
  where they did;
- :class:`SyncFreePerTensorPasses` (torch operations on a device, for tensors no flat group holds): no value is
  read back in a step, the early refresh decides on the test of the last step, and a refresh selects in full on the
  device.

:func:`select` is a unit's full selection, which the engine also runs at construction and on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_topkast import kernels, selection, sharded
from lightning_topkast.kernels import B_BIT, FinishCounts, Threshold
from lightning_topkast.masked import MaskedTensor, Unit
from lightning_topkast.schedule import Schedule

if TYPE_CHECKING:
    from lightning_topkast.backend import Moved, Step

States = Callable[[MaskedTensor], list[Tensor]]


class PerTensorPasses:
    """The :class:`~lightning_topkast.backend.Backend` over tensors one optimizer steps, a pass per tensor.

    On the host: the counts of each step are read back; a refresh searches near the old thresholds.

    Args:
        tensors: the tensors, in the engine's order.
    """

    def __init__(self, tensors: Sequence[MaskedTensor]) -> None:
        self.tensors = list(tensors)
        self.units = list(dict.fromkeys(t.unit for t in self.tensors))
        self._counts: dict[Unit, FinishCounts | Tensor] = {}  # of the last finish, per unit, for its refresh

    def prepare(self, step: Step) -> None:
        """See :meth:`lightning_topkast.backend.Backend.prepare`."""
        penalty = step.penalty
        jobs: dict[kernels.Kernels, list[kernels.PrepareJob]] = {}  # one call per kind of kernels
        for tensor in self.tensors:
            grad = tensor.param.grad
            if grad is None:
                continue  # unused this step: the optimizer skips it too
            # θ on B goes into the parameter so the update applies to the true values of B \ A; zeros outside B
            # keep element-wise optimizers from creating state there. The penalty's gradient λ·c·θ is taken
            # through the parameter, so a weight outside B that a bf16 step made NaN adds no NaN.
            lam_a, lam_e = penalty, penalty / tensor.forward_density if penalty else 0.0
            work = tensor.kernels_for(tensor.param, grad)
            jobs.setdefault(work, []).append((tensor.theta, tensor.code, tensor.param, grad, lam_a, lam_e))
            step.pending.add(tensor.name)
        for work, batch in jobs.items():
            work.prepare_many(batch)

    def finish(self, step: Step) -> list[str | None]:
        """See :meth:`lightning_topkast.backend.Backend.finish`."""
        self._counts = counts = self._finish(step, [t for t in self.tensors if t.name in step.pending])
        return [self._due(step.schedule, unit, counts.get(unit)) for unit in self.units]

    def refresh(self, step: Step, due: Sequence[bool]) -> Moved:
        """See :meth:`lightning_topkast.backend.Backend.refresh`."""
        moved: Moved = {}
        applied: set[Unit] = set()  # units whose sets were written anew, optimizer state with them
        for unit, refreshes in zip(self.units, due, strict=True):
            if refreshes:
                moved.update(self._refresh_unit(step, unit, self._counts.get(unit), applied))
        if step.zero_state:
            self._keep_states(step, applied)
        return moved

    def keep_states(self, step: Step) -> None:
        """See :meth:`lightning_topkast.backend.Backend.keep_states`."""
        self._keep_states(step, set())

    def _keep_states(self, step: Step, applied: set[Unit]) -> None:
        # the first step after attach too: the optimizer may arrive with state restored from a dense run
        for tensor in self.tensors:
            if tensor.unit not in applied:
                for state in step.states(tensor):
                    tensor.kernels_for(state).keep(state, tensor.code, B_BIT)

    def _finish(self, step: Step, pending: list[MaskedTensor]) -> dict[Unit, FinishCounts | Tensor]:
        """θ from the update, α back in the parameters, and the counts per unit against its thresholds."""
        rates = step.rates() if step.decoupled else {}
        totals: dict[Unit, Any] = {}
        jobs: dict[kernels.Kernels, tuple[list[MaskedTensor], list[kernels.FinishJob]]] = {}
        for tensor in pending:
            unit = tensor.unit
            dec_a = -rates[id(tensor.param)] * step.decoupled if step.decoupled else 0.0
            dec_e = dec_a / tensor.forward_density
            work = tensor.kernels_for(tensor.param)  # one call per kind of kernels
            if work not in jobs:
                jobs[work] = ([], [])
            tensors, batch = jobs[work]
            tensors.append(tensor)
            batch.append(
                (tensor.theta, tensor.code, tensor.param, dec_a, dec_e, unit.forward, unit.backward, tensor.offset)
            )
        for work, (tensors, batch) in jobs.items():
            for tensor, found in zip(tensors, work.finish_many(batch), strict=True):
                totals[tensor.unit] = _add(totals.get(tensor.unit), found)
        step.pending.difference_update(t.name for t in pending)
        _count_the_rest_of_pools(totals, pending, on_host=True)
        return totals

    def _due(self, schedule: Schedule, unit: Unit, counts: FinishCounts | Tensor | None) -> str | None:
        """Why ``unit`` refreshes now ("interval" or "early"), or None; counts this step for it."""
        if schedule.early_refresh is None or counts is None:
            return schedule.due(unit, early=False)
        return schedule.due(unit, schedule.early_test(unit.forward_k, counts.explorers_above))  # type: ignore[union-attr]

    def _refresh_unit(self, step: Step, unit: Unit, counts: FinishCounts | Tensor | None, applied: set[Unit]) -> Moved:
        """New sets for ``unit``; returns the turnover ``{name: (left, size)}`` of each of its tensors.

        ``unit`` joins ``applied`` when its sets (and optimizer state) are written, which a refresh that finds them
        unchanged skips.
        """
        step.schedule.refreshed(unit)  # this step's early test measured the old sets
        sizes = {t.name: t.forward_size for t in unit.tensors}
        if counts is not None and (
            counts.forward_kept == counts.forward_all == unit.forward_k  # type: ignore[union-attr]
            and counts.backward_kept == counts.backward_all == unit.backward_k  # type: ignore[union-attr]
        ):
            return {name: (0, size) for name, size in sizes.items()}  # the sets still split where they did
        applied.add(unit)
        if counts is None:
            return select(unit, False, step.states, step.pending, sizes)
        if len(unit.tensors) == 1 and unit.tensors[0].name not in step.pending:
            tensor = unit.tensors[0]
            done = tensor.kernels_for(tensor.param).refresh(
                tensor.theta,
                tensor.code,
                tensor.param,
                step.states(tensor),
                (unit.forward_k, unit.backward_k),
                (unit.forward, unit.backward),
                (counts.forward_all, counts.backward_all),  # type: ignore[union-attr]
                unit.spacing,
            )
            if done is not None:
                unit.forward, unit.backward, unit.spacing = done.forward, done.backward, done.spacing
                tensor.forward_size = done.size
                return {tensor.name: (done.left, sizes[tensor.name])}
        searches = [
            selection.search_threshold(k, previous, at_previous, unit.size, unit.mantissa, unit.top, spacing)
            for k, previous, at_previous, spacing in (
                (unit.forward_k, unit.forward, counts.forward_all, unit.spacing[0]),  # type: ignore[union-attr]
                (unit.backward_k, unit.backward, counts.backward_all, unit.spacing[1]),  # type: ignore[union-attr]
            )
        ]
        found = selection.search_thresholds(searches, partial(_count_at_least, unit), partial(_pick, unit))
        if None in found:
            return select(unit, False, step.states, step.pending, sizes)
        (unit.forward, forward_spacing), (unit.backward, backward_spacing) = found  # type: ignore[misc]
        unit.spacing = (forward_spacing, backward_spacing)
        return apply(unit, False, step.states, step.pending, sizes)


class SyncFreePerTensorPasses(PerTensorPasses):
    """:class:`PerTensorPasses` that read no device value back in a step: torch operations on a device.

    For the tensors no flat group holds (a unit two optimizers step, or of mixed dtypes), or all of them with the
    engine's ``batched_passes`` off. The counts stay on the device, the early refresh decides on the test of the
    last step, and a refresh selects in full on the device.
    """

    def _finish(self, step: Step, pending: list[MaskedTensor]) -> dict[Unit, FinishCounts | Tensor]:
        """θ from the update, α back in the parameters, and (for the early refresh) the counts as device tensors."""
        rates = step.rates() if step.decoupled else {}
        totals: dict[Unit, Any] = {}
        for tensor in pending:
            unit = tensor.unit
            dec_a = -rates[id(tensor.param)] * step.decoupled if step.decoupled else 0.0
            dec_e = dec_a / tensor.forward_density
            torch_kernels: kernels.TorchKernels = tensor.kernels  # type: ignore[assignment]
            torch_kernels.merge(tensor.theta, tensor.code, tensor.param, dec_a, dec_e)
            if step.schedule.early_refresh is None:
                continue
            found = torch_kernels.finish_counts(tensor.theta, tensor.code, unit.forward, unit.backward, tensor.offset)
            totals[unit] = _add(totals.get(unit), found)
        step.pending.difference_update(t.name for t in pending)
        _count_the_rest_of_pools(totals, pending, on_host=False)
        return totals

    def _due(self, schedule: Schedule, unit: Unit, counts: FinishCounts | Tensor | None) -> str | None:
        """Why ``unit`` refreshes now, deciding "early" on the last step's test, whose value has reached the host.

        This step's test is copied to the host while the device runs on, to be read at the next step.
        """
        if schedule.early_refresh is None or counts is None:
            return schedule.due(unit, early=False)
        flag, unit.early_flag = unit.early_flag, schedule.early_test(unit.forward_k, counts[4])
        return schedule.due(unit, flag is not None and flag.read())

    def _refresh_unit(self, step: Step, unit: Unit, counts: FinishCounts | Tensor | None, applied: set[Unit]) -> Moved:
        """A full selection of ``unit`` on the device; see :meth:`PerTensorPasses._refresh_unit`."""
        step.schedule.refreshed(unit)  # this step's early test measured the old sets
        sizes = {t.name: t.forward_size for t in unit.tensors}
        applied.add(unit)
        return select(unit, True, step.states, step.pending, sizes)


def _count_the_rest_of_pools(totals: dict[Unit, Any], pending: list[MaskedTensor], on_host: bool) -> None:
    """Add to ``totals`` the counts of the members of a pool that another optimizer steps: as they stand."""
    for unit in totals:
        for tensor in unit.tensors if len(unit.tensors) > 1 else ():
            if tensor not in pending:
                found = kernels.TorchKernels().finish_counts(
                    tensor.theta, tensor.code, unit.forward, unit.backward, tensor.offset
                )
                totals[unit] = _add(totals[unit], FinishCounts(*found.tolist()) if on_host else found)


# --- a unit's full selection --------------------------------------------------------------------------------------


def select(
    unit: Unit, sync_free: bool, states: States, pending: set[str], sizes: Mapping[str, Any] | None = None
) -> Moved:
    """A full selection: the thresholds from all of the unit's scores, then :func:`apply`.

    ``sizes``: the size A had, per tensor, for the turnover (default: as it stands).
    """
    sampled = None if sync_free else _sampled_thresholds(unit)
    placement = unit.tensors[0].placement
    if placement is not None:  # a collective: every rank selects the whole tensor's sets together
        scores = kernels.scores(unit.tensors[0].theta)
        unit.forward, unit.backward = sharded.unit_thresholds(scores, (unit.forward_k, unit.backward_k), placement)
    elif sampled is not None:
        unit.forward, unit.backward = sampled
    else:
        scores = torch.cat([kernels.scores(t.theta) for t in unit.tensors])
        find = selection.threshold_tensors if sync_free else selection.threshold
        unit.forward, unit.backward = find(scores, unit.forward_k), find(scores, unit.backward_k)
    return apply(unit, sync_free, states, pending, sizes or {t.name: t.forward_size for t in unit.tensors})


def apply(unit: Unit, sync_free: bool, states: States, pending: set[str], sizes: Mapping[str, Any]) -> Moved:
    """The sets from the unit's thresholds, α into parameters not ``pending``; optimizer state outside B zeroed.

    A pending parameter holds θ on B now: α comes when its step ends.
    """
    moved = {}
    for tensor in unit.tensors:
        held, offset = states(tensor), tensor.offset
        target = tensor.local_param if tensor.name not in pending else torch.empty_like(tensor.theta)
        if sync_free:
            work: kernels.TorchKernels = tensor.kernels  # type: ignore[assignment]
            left, _, tensor.forward_size = work.apply_counts(
                tensor.theta, tensor.code, target, unit.forward, unit.backward, offset, held
            )
        else:
            left, _, tensor.forward_size = tensor.kernels_for(tensor.param, *held).apply(
                tensor.theta, tensor.code, target, unit.forward, unit.backward, offset, held
            )
        moved[tensor.name] = (left, sizes[tensor.name])
    return moved


def _sampled_thresholds(unit: Unit) -> tuple[Threshold, Threshold] | None:
    """Both thresholds from a window a strided sample brackets: a pass or three over θ and no copy of it.

    None (a full selection then) for small units, which it would not speed up, for torch kernels, and when the
    sample missed.
    """
    if unit.size <= selection.BAND_SELECT_ABOVE or not all(
        isinstance(t.kernels, kernels.CKernels) for t in unit.tensors
    ):
        return None
    stride = max(1, unit.size // selection.SAMPLE_SIZE)
    sample = torch.cat([kernels.scores(t.theta.view(-1)[::stride]) for t in unit.tensors])
    sample = torch.sort(sample, descending=True).values
    searches = [
        selection.search_sampled(k, selection.sampled_window(sample, k, unit.size, unit.top), unit.size, unit.top)
        for k in (unit.forward_k, unit.backward_k)
    ]
    found = selection.search_thresholds(searches, partial(_count_at_least, unit), partial(_pick, unit))
    if None in found:
        return None
    return found[0][0], found[1][0]  # type: ignore[index]


def _count_at_least(unit: Unit, rungs: list[int]) -> list[int]:
    totals = [0] * len(rungs)
    for tensor in unit.tensors:
        for start in range(0, len(rungs), kernels.RUNGS):
            counts = tensor.kernels.count_at_least(tensor.theta, rungs[start : start + kernels.RUNGS])
            for i, c in enumerate(counts, start):
                totals[i] += c
    return totals


def _pick(unit: Unit, windows: list[tuple[int, int, int]]) -> list[kernels.Pick]:
    kinds = {(type(t.kernels), t.theta.dtype) for t in unit.tensors}
    work = unit.tensors[0].kernels if len(kinds) == 1 else kernels.TorchKernels()  # a pool of mixed dtypes
    return work.pick([t.theta for t in unit.tensors], windows)


def _add(total: Any, counts: Any) -> Any:
    if total is None:
        return counts
    if isinstance(counts, Tensor):
        return total + counts
    return FinishCounts(*(a + b for a, b in zip(total, counts, strict=True)))
