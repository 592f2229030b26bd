r"""How a step is done: the one interface every backend implements, and what the engine tells it of a step.

The engine (:class:`lightning_topkast.state.TopKAST`) splits the tensors each optimizer steps into backends and runs
every optimizer step through them in the same order::

    before the update   backend.prepare(step)       θ on B into the parameters; gradients on B only, plus the penalty's
    the optimizer's update
    after the update    backend.finish(step)        θ from the update, α into the parameters; per unit, why it
                                                    refreshes now (the schedule's verdict) or None
                        backend.refresh(step, due)  new sets for the units due; their optimizer state outside B zeroed
                    or  backend.keep_states(step)   optimizer state zeroed outside B (when the optimizer needs it)

The backends:

- :class:`lightning_topkast.per_tensor.PerTensorPasses` (``per_tensor.py``): a pass per tensor through the tensor's
  kernels, compiled C loops on CPU or torch operations (:mod:`lightning_topkast.kernels`). The CPU path; its
  ``SyncFreePerTensorPasses`` reads nothing back in a step, for the device tensors no flat group holds.
- :class:`lightning_topkast.device.FlatPasses` (``device.py``): a pass per flat group of tensors, with no host sync.
  The group's passes are torch operations (:class:`~lightning_topkast.device.FlatGroup`), fused Triton kernels
  (:class:`~lightning_topkast.triton_kernels.TritonGroup`), or the torch operations with the selection summed over
  the ranks that hold shards of the tensors (:class:`~lightning_topkast.sharded.ShardedGroup`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_topkast import sharded, triton_kernels
from lightning_topkast.device import FlatGroup, FlatPasses
from lightning_topkast.per_tensor import PerTensorPasses, SyncFreePerTensorPasses
from lightning_topkast.schedule import Schedule

if TYPE_CHECKING:
    from lightning_topkast.masked import MaskedTensor, Unit

Moved = dict[str, tuple[Any, Any]]  # per tensor refreshed: (members that left A, the size A had)


@dataclass
class Step:
    """What a backend is told of one optimizer step (or of the preparation for it)."""

    optimizer: Optimizer
    penalty: float  # λ of the penalty through the gradient, 0 when decoupled or off
    decoupled: float  # λ of the penalty applied after the update, 0 when through the gradient or off
    schedule: Schedule
    pending: set[str]  # the engine's: names prepared for an update that has not finished
    states: Callable[[MaskedTensor], list[Tensor]]  # a tensor's optimizer state (of the optimizer that owns it)
    zero_state: bool = False  # zero the optimizer state outside B after this update, whether or not B changes

    def rates(self) -> dict[int, float]:
        """The learning rate of each parameter the optimizer steps, by ``id``."""
        return {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}


class Backend(Protocol):
    """The passes over some of the tensors one optimizer steps: whole selection units, in the engine's order."""

    tensors: list[MaskedTensor]
    units: list[Unit]

    def prepare(self, step: Step) -> None:
        """Before the update: parameters = θ on B, 0 elsewhere; gradients on B only, plus the penalty's.

        Adds the names of the tensors it prepared to ``step.pending``; a tensor without a gradient is skipped.
        """

    def finish(self, step: Step) -> list[str | None]:
        """After the update: θ takes the update on B, the parameters α; per unit, why it refreshes now or None.

        Takes the tensors out of ``step.pending``. A parameter of a unit that refreshes may keep θ on B until
        :meth:`refresh` writes α.
        """

    def refresh(self, step: Step, due: Sequence[bool]) -> Moved:
        """New sets for the units ``due`` (one bool per unit, some true) and α; returns the turnover per tensor.

        Optimizer state survives where an entry stays in B, and is zeroed outside B for every unit when
        ``step.zero_state``.
        """

    def keep_states(self, step: Step) -> None:
        """Optimizer state zeroed outside B, after an update that refreshed nothing."""


# --- which backend steps which tensors ------------------------------------------------------------------------------


def flat_groups(
    units: Sequence[Unit], owner: Mapping[str, Optimizer], optimizers: Sequence[Optimizer]
) -> dict[int, list[FlatGroup]]:
    """Per optimizer (by index), its units by dtype and device, each in one flat buffer: a pass per group.

    A unit whose tensors two optimizers step, or of mixed dtypes or devices, stays on the per-tensor passes. The
    group's passes: summed over the ranks for sharded units, Triton's where it runs, else torch operations.
    """
    buckets: dict[tuple[int, torch.dtype, torch.device, Any], list[Unit]] = {}
    for unit in units:
        owners = {id(owner.get(t.name)) for t in unit.tensors}
        kinds = {(t.theta.dtype, t.theta.device) for t in unit.tensors}
        first = owner.get(unit.tensors[0].name)
        if first is None or len(owners) > 1 or len(kinds) > 1:
            continue
        index = next(i for i, opt in enumerate(optimizers) if opt is first)
        placement = unit.tensors[0].placement  # the ranks a sharded unit's sums go over
        buckets.setdefault((index, *kinds.pop(), None if placement is None else placement.group), []).append(unit)
    groups: dict[int, list[FlatGroup]] = {}
    for (index, _, device, shared_with), members in buckets.items():
        if shared_with is not None:
            batch: FlatGroup = sharded.ShardedGroup(members)
        elif triton_kernels.available(device):
            batch = triton_kernels.TritonGroup(members)
        else:
            batch = FlatGroup(members)
        groups.setdefault(index, []).append(batch)
    return groups


def per_optimizer(
    tensors: Sequence[Sequence[MaskedTensor]], flat: Mapping[int, Sequence[FlatGroup]], sync_free: bool
) -> list[list[Backend]]:
    """Per optimizer, the backends that step its ``tensors``: its ``flat`` groups, then one for the rest, per tensor."""
    in_flat = {id(t) for groups in flat.values() for group in groups for t in group.tensors}
    backends: list[list[Backend]] = []
    for index, owned in enumerate(tensors):
        rest = [t for t in owned if id(t) not in in_flat]
        passes: list[Backend] = [FlatPasses(group) for group in flat.get(index, [])]
        per_tensor = SyncFreePerTensorPasses if sync_free else PerTensorPasses
        backends.append(passes + ([per_tensor(rest)] if rest else []))
    return backends
