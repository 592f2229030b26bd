r"""Per-tensor Top-KAST state and the in-place step mechanics; works with any torch optimizer, no Lightning needed.

Between optimizer steps every masked parameter holds exactly its forward weights α = θ on A, 0 elsewhere, so
anything that reads the parameter (modules, functional calls, tied weights, ``state_dict``) sees the sparse model.
The dense θ lives here, with one byte per weight for the sets (:mod:`lightning_topkast.kernels`). One step:

1. :meth:`TopKAST.before_step` (after backward and unscaling, before clipping): the gradient is kept on B only, the
   exploration penalty's gradient is added, and θ on B \ A is written into the parameter so that the update
   applies to the true values of B.
2. the optimizer updates the parameter.
3. a step post-hook: θ takes the new values on B and keeps its old ones outside B (whatever the update wrote there,
   weight decay or momentum drift, is discarded), and α is written back; the same pass counts where θ stands
   against the current thresholds of A and B. A refresh re-selects A and B exactly from |θ| when it is due:
   ``update_interval`` steps after the last one, or earlier when ``early_refresh`` says the exploring weights have
   outgrown A. Optimizer state outside B is zeroed.

A refresh is exact and cheap: only B moved since the last one, so the new k-th largest |θ| is found by counting
near the old one (:func:`lightning_topkast.selection.search_thresholds`), and nothing at all changes when the counts
say the sets still split where they did.

Use without Lightning::

    engine = TopKAST(params, densities)      # params: {name: nn.Parameter}; densities: {name: (D, D + M)}
    engine.attach([optimizer])
    for batch in data:
        loss(model, batch).backward()
        engine.before_step(optimizer)
        optimizer.step()                     # the post-hook finishes the step
        optimizer.zero_grad()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_topkast import kernels, selection, sharded, triton_kernels
from lightning_topkast.device import FlatGroup, to_device
from lightning_topkast.kernels import A_BIT, B_BIT, FinishCounts, Threshold
from lightning_topkast.masked import MaskedTensor, Unit, make_unit
from lightning_topkast.schedule import HostCopy, Schedule, to_host

STATE_VERSION = 2

RefreshListener = Callable[[dict[str, tuple[Any, Any]]], None]

# With a zero gradient and a zero weight, these optimizers leave a zero state entry zero (no element-wise term
# creates state from nothing), so their state outside B needs zeroing only when B changes. Any other optimizer is
# zeroed after every step. Exact types: a subclass may change the update.
_STATE_STAYS_ZERO: tuple[type[Optimizer], ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class TopKAST:
    r"""Top-KAST over a set of named parameters, stepped by one or more torch optimizers.

    Args:
        params: the parameters to mask, by name, in a fixed order.
        densities: ``{name: (D, D + M)}``, the forward and backward density of each tensor.
        update_interval: the most optimizer steps between refreshes of A and B (counted per optimizer).
        penalty: the exploration penalty's strength λ; 0 turns it off.
        decoupled_penalty: apply the penalty to the weights after the update (scaled by the learning rate, outside
            momentum) instead of through the gradient.
        global_pool: names ranked together by one top-k at each refresh instead of per tensor; they must share
            one (D, D + M).
        early_refresh: refresh a tensor before ``update_interval`` is up once the weights of B \ A that have grown
            past A's threshold number at least this fraction of |A| (at least one); None never refreshes early.
        compiled: use the compiled C kernels (True), torch operations (False), or the C kernels where they apply
            (None: fp32/fp64 CPU tensors, when a C compiler is at hand).
        sync_free: never read a device value back on the host during a step (default: on for CUDA tensors). A
            refresh then runs a full selection on the device, and the early-refresh test of one step decides at
            the next one.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        densities: Mapping[str, tuple[float, float]],
        *,
        update_interval: int = 1,
        penalty: float = 1e-4,
        decoupled_penalty: bool = False,
        global_pool: Collection[str] = (),
        early_refresh: float | None = None,
        compiled: bool | None = None,
        sync_free: bool | None = None,
    ) -> None:
        self._sync_free, self._compiled = sync_free, compiled  # as asked: None follows the device
        shards = {name: sharded.placement_of(name, param) for name, param in params.items()}
        self.sharded = any(p is not None for p in shards.values())
        if self.sharded and sync_free is False:
            raise ValueError(
                "sync_free=False with sharded parameters: their selection is summed over the ranks on the device "
                "path only; leave sync_free=None"
            )
        # sharded: the device path, whose passes run over the local shards and sum what needs the whole tensors
        self.sync_free = (_on_cuda(params.values()) or self.sharded) if sync_free is None else sync_free
        pooled = sorted(name for name in global_pool if shards.get(name) is not None)
        if pooled:
            raise ValueError(
                f"global_pool holds sharded parameters ({', '.join(pooled)}): one top-k over several sharded "
                "tensors is not supported; select per tensor (distribution 'uniform' or 'erk')"
            )
        self.tensors = {
            name: MaskedTensor(
                name, param, *densities[name], in_global_pool=name in global_pool, kernels=self._kernels_for(param)
            )
            for name, param in params.items()
        }
        pool = [t for t in self.tensors.values() if t.in_global_pool]
        if len({t.forward_density for t in pool}) > 1:
            raise ValueError("tensors in the global pool must share one forward density")
        self.units = [make_unit([t]) for t in self.tensors.values() if not t.in_global_pool]
        self.units += [make_unit(pool)] if pool else []
        self.schedule = Schedule(update_interval, early_refresh)
        self.penalty = penalty
        self.decoupled_penalty = decoupled_penalty
        self.steps: list[int] = []
        self.refreshes = 0
        self.early_refreshes = 0
        self.skipped_steps = 0
        self.refresh_listeners: list[RefreshListener] = []
        self._groups: list[list[MaskedTensor]] = []
        self._optimizers: list[Optimizer] = []
        self._owner: dict[str, Optimizer] = {}
        self._handles: list[RemovableHandle] = []
        self._pending: set[str] = set()
        self._unchecked: set[int] = set()
        self._depth: list[int] = []  # step() calls in progress per optimizer: a subclass's step may call super's
        self._flat: dict[int, list[FlatGroup]] = {}  # per optimizer, without host syncs: its tensors' flat groups
        self._in_flat: set[str] = set()  # the names of their tensors
        self.batched_passes = True  # without host syncs: a pass per flat group (False: per tensor, as the CPU path)
        with torch.no_grad():
            for unit in self.units:
                self._select(unit)

    @property
    def update_interval(self) -> int:
        """The most optimizer steps between refreshes (:attr:`schedule`'s)."""
        return self.schedule.update_interval

    @property
    def early_refresh(self) -> float | None:
        """The early refresh's fraction of |A|, or None (:attr:`schedule`'s)."""
        return self.schedule.early_refresh

    def _kernels_for(self, param: Tensor) -> kernels.Kernels:
        return kernels.TorchKernels() if self.sync_free else kernels.for_tensor(sharded.local(param), self._compiled)

    @torch.no_grad()
    def follow_parameters(self) -> bool:
        """Move θ, the set bytes and the thresholds to the parameters' devices; returns whether anything moved.

        Lightning moves a module to the CPU at the end of a fit and back to the GPU at the next.
        """
        if all(t.theta.device == t.param.device for t in self.tensors.values()):
            return False
        state = self.state_dict()
        if self._sync_free is None:
            self.sync_free = _on_cuda(t.param for t in self.tensors.values())
        for tensor in self.tensors.values():
            tensor.theta = torch.empty_like(tensor.theta, device=tensor.param.device)
            tensor.code = torch.empty_like(tensor.code, device=tensor.param.device)
            tensor.kernels = self._kernels_for(tensor.param)
        self._set_flat({})  # rebuilt on the new device below, after the state is loaded
        self.load_state_dict(state)  # copies across devices, thresholds as the new path holds them
        if self.attached and self.sync_free and self.batched_passes:
            self._set_flat(self._flat_groups())
        return True

    # --- optimizer wiring -------------------------------------------------------------------------------------

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Step with ``optimizers``: each refreshes the tensors it owns after its own steps."""
        self.detach()
        owner = {id(p): i for i, opt in enumerate(optimizers) for group in opt.param_groups for p in group["params"]}
        self._optimizers = list(optimizers)
        self._groups = [[] for _ in optimizers]
        self._owner = {}
        for tensor in self.tensors.values():
            if id(tensor.param) in owner:
                self._groups[owner[id(tensor.param)]].append(tensor)
                self._owner[tensor.name] = optimizers[owner[id(tensor.param)]]
        self.steps += [0] * (len(optimizers) - len(self.steps))
        self._set_flat(self._flat_groups() if self.sync_free and self.batched_passes else {})
        alone = [t.name for t in self.tensors.values() if t.placement is not None and t.name not in self._in_flat]
        if alone:  # its rank-local decisions could differ between ranks, and the sums would wait forever
            raise ValueError(
                f"sharded parameters {', '.join(alone)} are not stepped by exactly one of the optimizers (or "
                "batched_passes is False): a sharded tensor's refreshes are decided on its optimizer's flat group"
            )
        self._unchecked = set(range(len(optimizers)))
        self._depth = [0] * len(optimizers)
        for i, opt in enumerate(optimizers):
            # torch runs the hooks around every patched step() level, so a subclass whose step() calls super's
            # fires them twice: the update is done when the outermost call returns
            self._handles.append(opt.register_step_pre_hook(lambda opt, args, kwargs, i=i: self._enter_step(i)))
            self._handles.append(opt.register_step_post_hook(lambda opt, args, kwargs, i=i: self._leave_step(i)))

    def _flat_groups(self) -> dict[int, list[FlatGroup]]:
        """Per optimizer, its units by dtype and device, each in one flat buffer: a pass per group, not per tensor.

        A unit whose tensors two optimizers step, or of mixed dtypes or devices, stays on the per-tensor passes.
        """
        buckets: dict[tuple[int, torch.dtype, torch.device, Any], list[Unit]] = {}
        for unit in self.units:
            owners = {id(self._owner.get(t.name)) for t in unit.tensors}
            kinds = {(t.theta.dtype, t.theta.device) for t in unit.tensors}
            owner = self._owner.get(unit.tensors[0].name)
            if owner is None or len(owners) > 1 or len(kinds) > 1:
                continue
            index = next(i for i, opt in enumerate(self._optimizers) if opt is owner)
            placement = unit.tensors[0].placement  # the ranks a sharded unit's sums go over
            buckets.setdefault((index, *kinds.pop(), None if placement is None else placement.group), []).append(unit)
        groups: dict[int, list[FlatGroup]] = {}
        for (index, _, device, shared_with), units in buckets.items():
            if shared_with is not None:
                batch: FlatGroup = sharded.ShardedGroup(units)
            elif triton_kernels.available(device):
                batch = triton_kernels.TritonGroup(units)
            else:
                batch = FlatGroup(units)
            groups.setdefault(index, []).append(batch)
        return groups

    def _set_flat(self, groups: dict[int, list[FlatGroup]]) -> None:
        self._flat = groups
        self._in_flat = {t.name for batches in groups.values() for batch in batches for t in batch.tensors}

    @property
    def attached(self) -> bool:
        """Whether step post-hooks are registered on optimizers."""
        return bool(self._handles)

    def detach(self) -> None:
        """Remove the step post-hooks; the parameters keep holding α."""
        self.restore_forward_weights()
        for handle in self._handles:
            handle.remove()
        self._handles, self._groups, self._optimizers, self._owner = [], [], [], {}
        self._set_flat({})

    def _adopt_thresholds(self) -> None:
        """Flat groups take their units' thresholds anew, after a per-unit selection or a load replaced them."""
        for groups in self._flat.values():
            for batch in groups:
                batch.adopt_thresholds()

    def _index(self, optimizer: Optimizer) -> int:
        for i, opt in enumerate(self._optimizers):
            if opt is optimizer:
                return i
        raise RuntimeError("TopKAST.before_step got an optimizer that was not attached; call attach() first")

    @torch.no_grad()
    def start_from_parameters(self) -> None:
        """Take θ anew from the parameters and select A and B from it, as at construction; counters are kept.

        For weights loaded after the engine was built (a strategy that restores a checkpoint after setup).
        """
        for tensor in self.tensors.values():
            tensor.theta.copy_(tensor.local_param)
            tensor.code.zero_()
        for unit in self.units:
            self.schedule.refreshed(unit)
            self._select(unit)
        self._adopt_thresholds()

    # --- one step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def before_step(self, optimizer: Optimizer) -> None:
        """Prepare the tensors ``optimizer`` owns for its update (after backward, before clipping and the step)."""
        index = self._index(optimizer)
        group = self._groups[index]
        self._restore(group)
        penalty = 0.0 if self.decoupled_penalty else self.penalty
        for tensor in group:
            if tensor.param.grad is not None and tensor.param.grad.is_sparse:
                raise TypeError(
                    f"{tensor.name} has a sparse gradient (nn.Embedding(sparse=True)); Top-KAST masks dense "
                    "gradients: build the embedding with sparse=False or exclude it"
                )
        for batch in self._flat.get(index, []):
            grads = [None if t.param.grad is None else sharded.local(t.param.grad) for t in batch.tensors]
            if any(g is not None for g in grads):
                batch.prepare(grads, self._coefficients(batch, [penalty] * len(grads)) if penalty else None)
                self._pending.update(t.name for t in batch.tensors)
        jobs: dict[kernels.Kernels, list[kernels.PrepareJob]] = {}  # one call per kind of kernels
        for tensor in group:
            grad = tensor.param.grad
            if grad is None or tensor.name in self._in_flat:
                continue  # unused this step: the optimizer skips it too
            # θ on B goes into the parameter so the update applies to the true values of B \ A; zeros outside B
            # keep element-wise optimizers from creating state there. The penalty's gradient λ·c·θ is taken
            # through the parameter, so a weight outside B that a bf16 step made NaN adds no NaN.
            lam_a, lam_e = penalty, penalty / tensor.forward_density if penalty else 0.0
            work = tensor.kernels_for(tensor.param, grad)
            jobs.setdefault(work, []).append((tensor.theta, tensor.code, tensor.param, grad, lam_a, lam_e))
            self._pending.add(tensor.name)
        for work, batch in jobs.items():
            work.prepare_many(batch)

    def _enter_step(self, index: int) -> None:
        self._depth[index] += 1

    def _leave_step(self, index: int) -> None:
        self._depth[index] -= 1
        if self._depth[index] == 0:
            self._after_step(index)

    @torch.no_grad()
    def _after_step(self, index: int) -> None:
        group = self._groups[index]
        pending = [t for t in group if t.name in self._pending]
        if not pending and _creates_state_only(self._optimizers[index]):
            return  # not a training step: it changed nothing but the optimizer state that a load then overwrites
        if not pending and any(t.param.grad is not None for t in group):
            raise RuntimeError(
                "optimizer.step() ran without TopKAST.before_step(optimizer): the update used unmasked gradients. "
                "Under Lightning, step through the LightningOptimizer (self.optimizers()), not its .optimizer"
            )
        self.steps[index] += 1
        zero_state = index in self._unchecked or type(self._optimizers[index]) not in _STATE_STAYS_ZERO
        moved: dict[str, tuple[Any, Any]] = {}
        reasons: list[str] = []
        for batch in self._flat.get(index, []):
            reasons += self._after_step_flat(index, batch, moved, zero_state)
        rest, rest_pending = ([t for t in tensors if t.name not in self._in_flat] for tensors in (group, pending))
        reasons += self._after_step_per_tensor(index, rest, rest_pending, moved, zero_state)
        if reasons:
            self.refreshes += 1
            self.early_refreshes += "early" in reasons
            for listener in self.refresh_listeners:
                listener(moved)
        self._unchecked.discard(index)

    def _after_step_per_tensor(
        self,
        index: int,
        group: list[MaskedTensor],
        pending: list[MaskedTensor],
        moved: dict[str, tuple[Any, Any]],
        zero_state: bool,
    ) -> list[str]:
        """:meth:`_after_step` for tensors outside flat groups; returns why each unit that refreshed did."""
        counts = self._finish(index, pending)
        units = list(dict.fromkeys(t.unit for t in group))
        due = [self._due(unit, counts.get(unit)) for unit in units]
        applied: set[Unit] = set()  # units whose sets were written anew, optimizer state with them
        for unit, why in zip(units, due, strict=True):
            if why is not None:
                moved.update(self._refresh_unit(unit, counts.get(unit), applied))
        if zero_state:
            # the first step after attach too: the optimizer may arrive with state restored from a dense run
            for tensor in group:
                if tensor.unit not in applied:
                    for state in self._states(tensor):
                        tensor.kernels_for(state).keep(state, tensor.code, B_BIT)
        return [why for why in due if why is not None]

    def _after_step_flat(
        self, index: int, batch: FlatGroup, moved: dict[str, tuple[Any, Any]], zero_state: bool
    ) -> list[str]:
        """:meth:`_after_step` for one flat group: the same rules, each pass once over the group.

        Returns why each of its units refreshed ("interval" or "early"), one entry per unit that did.
        """
        prepared = batch.tensors[0].name in self._pending  # the group is prepared as a whole
        self._pending.difference_update(t.name for t in batch.tensors)
        reasons = []
        for unit in batch.units:
            reasons.append(self.schedule.due_on_last_test(unit) or "")
        due = [bool(why) for why in reasons]
        if prepared:
            self._merge_flat(index, batch, due)
        if any(due):
            self._refresh_flat(batch, due, moved)
        elif zero_state:
            batch.keep_states(self._state_kinds(batch))
        return [why for why in reasons if why]

    def _merge_flat(self, index: int, batch: FlatGroup, due: list[bool]) -> None:
        """θ from the update; α unless a refresh follows; the early refresh's test, read at the next step."""
        decoupled = None
        if self.decoupled_penalty and self.penalty:
            rates = {id(p): g["lr"] for g in self._optimizers[index].param_groups for p in g["params"]}
            decoupled = self._coefficients(batch, [-rates[id(t.param)] * self.penalty for t in batch.tensors])
        batch.merge(decoupled, alpha=not any(due))
        if self.schedule.early_refresh is not None and not all(due):
            flags = to_host(batch.early_flags(self.schedule)).entries(len(batch.units))
            for unit, flag in zip(batch.units, flags, strict=True):
                unit.early_flag = flag

    def _refresh_flat(self, batch: FlatGroup, due: list[bool], moved: dict[str, tuple[Any, Any]]) -> None:
        """New sets for the units of ``batch`` that are ``due``; their tensors' turnover into ``moved``."""
        for unit, refreshes in zip(batch.units, due, strict=True):
            if refreshes:  # this step's early test measured the old sets
                self.schedule.refreshed(unit)
        due_mask = None if all(due) else to_device(torch.tensor(due), batch.device)
        left, size = batch.refresh(due_mask, self._state_kinds(batch))
        refreshed = {id(unit) for unit, refreshes in zip(batch.units, due, strict=True) if refreshes}
        for i, tensor in enumerate(batch.tensors):
            if id(tensor.unit) in refreshed:
                moved[tensor.name] = (left[i], size[i])

    def _coefficients(self, batch: FlatGroup, on_a: Sequence[float]) -> tuple[list[float], list[float]]:
        r"""The penalty's coefficients per tensor of ``batch``: ``on_a`` on A, ``on_a`` / D on B \ A."""
        on_a = list(on_a)
        return on_a, [c / t.forward_density for c, t in zip(on_a, batch.tensors, strict=True)]

    def _state_kinds(self, batch: FlatGroup) -> list[list[Tensor | None]]:
        """The optimizer state of ``batch`` by key (``exp_avg``, ...): per key, each tensor's, or None."""
        optimizer = self._owner.get(batch.tensors[0].name)
        per_tensor = [
            {key: sharded.local(v) for key, v in optimizer.state.get(t.param, {}).items() if _shaped_like(v, t.param)}
            if optimizer is not None
            else {}
            for t in batch.tensors
        ]
        keys = dict.fromkeys(key for states in per_tensor for key in states)
        return [[states.get(key) for states in per_tensor] for key in keys]

    def _finish(self, index: int, pending: list[MaskedTensor]) -> dict[Unit, FinishCounts | Tensor]:
        """θ from the update, α back in the parameters, and the counts per unit against its thresholds."""
        decoupled = self.decoupled_penalty and self.penalty
        rates = {id(p): g["lr"] for g in self._optimizers[index].param_groups for p in g["params"]} if decoupled else {}
        totals: dict[Unit, Any] = {}
        jobs: dict[kernels.Kernels, tuple[list[MaskedTensor], list[kernels.FinishJob]]] = {}
        for tensor in pending:
            unit = tensor.unit
            dec_a = -rates[id(tensor.param)] * self.penalty if decoupled else 0.0
            dec_e = dec_a / tensor.forward_density
            if self.sync_free:
                torch_kernels: kernels.TorchKernels = tensor.kernels  # type: ignore[assignment]
                torch_kernels.merge(tensor.theta, tensor.code, tensor.param, dec_a, dec_e)
                if self.schedule.early_refresh is None:
                    continue
                found = torch_kernels.finish_counts(
                    tensor.theta, tensor.code, unit.forward, unit.backward, tensor.offset
                )
                totals[unit] = _add(totals.get(unit), found)
            else:  # one call per kind of kernels
                work = tensor.kernels_for(tensor.param)
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
        self._pending.difference_update(t.name for t in pending)
        for unit in totals:  # members of a pool that another optimizer steps were not finished here: as they stand
            for tensor in unit.tensors if len(unit.tensors) > 1 else ():
                if tensor not in pending:
                    found = kernels.TorchKernels().finish_counts(
                        tensor.theta, tensor.code, unit.forward, unit.backward, tensor.offset
                    )
                    totals[unit] = _add(totals[unit], found if self.sync_free else FinishCounts(*found.tolist()))
        return totals

    def _due(self, unit: Unit, counts: FinishCounts | Tensor | None) -> str | None:
        """Why ``unit`` refreshes now ("interval" or "early"), or None; counts this step for it."""
        schedule = self.schedule
        if schedule.early_refresh is None or counts is None:
            return schedule.due(unit, early=False)
        if self.sync_free:  # decide on the last step's test, whose value has long reached the host
            flag, unit.early_flag = unit.early_flag, schedule.early_test(unit.forward_k, counts[4])
            return schedule.due(unit, flag is not None and flag.read())
        return schedule.due(unit, schedule.early_test(unit.forward_k, counts.explorers_above))

    # --- refresh --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self, tensors: Sequence[MaskedTensor] | None = None) -> None:
        """Re-select A and B of ``tensors`` (default: all; the whole global pool if any is in it) from |θ|."""
        chosen = self.tensors.values() if tensors is None else tensors
        units = list(dict.fromkeys(t.unit for t in chosen))
        moved: dict[str, tuple[Any, Any]] = {}
        for unit in units:
            moved.update(self._refresh_unit(unit, None, set()))
        self._adopt_thresholds()
        self.refreshes += 1
        for listener in self.refresh_listeners:
            listener(moved)

    def _refresh_unit(
        self, unit: Unit, counts: FinishCounts | Tensor | None, applied: set[Unit]
    ) -> dict[str, tuple[Any, Any]]:
        """New sets for ``unit``; returns the turnover ``{name: (left, size)}`` of each of its tensors.

        ``unit`` joins ``applied`` when its sets (and optimizer state) are written, which a refresh that finds them
        unchanged skips.
        """
        self.schedule.refreshed(unit)  # this step's early test measured the old sets
        sizes = {t.name: t.forward_size for t in unit.tensors}
        if (
            not self.sync_free
            and counts is not None
            and (
                counts.forward_kept == counts.forward_all == unit.forward_k
                and counts.backward_kept == counts.backward_all == unit.backward_k
            )
        ):
            return {name: (0, size) for name, size in sizes.items()}  # the sets still split where they did
        applied.add(unit)
        if self.sync_free or counts is None:
            return self._select(unit, sizes)
        if len(unit.tensors) == 1 and unit.tensors[0].name not in self._pending:
            tensor = unit.tensors[0]
            done = tensor.kernels_for(tensor.param).refresh(
                tensor.theta,
                tensor.code,
                tensor.param,
                self._states(tensor),
                (unit.forward_k, unit.backward_k),
                (unit.forward, unit.backward),
                (counts.forward_all, counts.backward_all),
                unit.spacing,
            )
            if done is not None:
                unit.forward, unit.backward, unit.spacing = done.forward, done.backward, done.spacing
                tensor.forward_size = done.size
                return {tensor.name: (done.left, sizes[tensor.name])}
        searches = [
            selection.search_threshold(k, previous, at_previous, unit.size, unit.mantissa, unit.top, spacing)
            for k, previous, at_previous, spacing in (
                (unit.forward_k, unit.forward, counts.forward_all, unit.spacing[0]),
                (unit.backward_k, unit.backward, counts.backward_all, unit.spacing[1]),
            )
        ]
        found = selection.search_thresholds(searches, partial(_count_at_least, unit), partial(_pick, unit))
        if None in found:
            return self._select(unit, sizes)
        (unit.forward, forward_spacing), (unit.backward, backward_spacing) = found  # type: ignore[misc]
        unit.spacing = (forward_spacing, backward_spacing)
        return self._apply(unit, sizes)

    def _select(self, unit: Unit, sizes: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
        """A full selection: the thresholds from all of the unit's scores."""
        sampled = None if self.sync_free else self._sampled_thresholds(unit)
        placement = unit.tensors[0].placement
        if placement is not None:  # a collective: every rank selects the whole tensor's sets together
            scores = kernels.scores(unit.tensors[0].theta)
            unit.forward, unit.backward = sharded.unit_thresholds(scores, (unit.forward_k, unit.backward_k), placement)
        elif sampled is not None:
            unit.forward, unit.backward = sampled
        else:
            scores = torch.cat([kernels.scores(t.theta) for t in unit.tensors])
            find = selection.threshold_tensors if self.sync_free else selection.threshold
            unit.forward, unit.backward = find(scores, unit.forward_k), find(scores, unit.backward_k)
        return self._apply(unit, sizes or {t.name: t.forward_size for t in unit.tensors})

    def _sampled_thresholds(self, unit: Unit) -> tuple[Threshold, Threshold] | None:
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

    def _apply(self, unit: Unit, sizes: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        moved = {}
        for tensor in unit.tensors:
            states, offset = self._states(tensor), tensor.offset
            pending = tensor.name in self._pending  # its parameter holds θ on B now: α comes when its step ends
            target = tensor.local_param if not pending else torch.empty_like(tensor.theta)
            if self.sync_free:
                work: kernels.TorchKernels = tensor.kernels  # type: ignore[assignment]
                left, _, tensor.forward_size = work.apply_counts(
                    tensor.theta, tensor.code, target, unit.forward, unit.backward, offset, states
                )
            else:
                left, _, tensor.forward_size = tensor.kernels_for(tensor.param, *states).apply(
                    tensor.theta, tensor.code, target, unit.forward, unit.backward, offset, states
                )
            moved[tensor.name] = (left, sizes[tensor.name])
        return moved

    def _states(self, tensor: MaskedTensor) -> list[Tensor]:
        """Every optimizer-state tensor shaped like the parameter, whatever the optimizer calls it."""
        optimizer = self._owner.get(tensor.name)
        if optimizer is None:
            return []
        states = optimizer.state.get(tensor.param, {}).values()
        return [sharded.local(v) for v in states if _shaped_like(v, tensor.param)]

    # --- skipped steps ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def restore_forward_weights(self) -> int:
        r"""Write α back into parameters prepared by :meth:`before_step` whose step never ran; returns how many.

        A GradScaler skips steps with non-finite gradients, and a module may skip a step itself: the parameter
        then still holds θ on B \ A and must hold α before the next forward.
        """
        self._depth = [0] * len(self._depth)  # no step runs now: forget one that raised midway
        return self._restore(self.tensors.values())

    def pending_forward_weights(self) -> dict[str, Tensor]:
        r"""α of the tensors prepared by :meth:`before_step` whose step has not finished: they hold θ on B \ A now."""
        return {
            name: torch.where(tensor.forward_set, tensor.theta, 0)
            for name, tensor in self.tensors.items()
            if name in self._pending
        }

    def _restore(self, tensors: Iterable[MaskedTensor]) -> int:
        skipped = [t for t in tensors if t.name in self._pending]
        for tensor in skipped:
            tensor.write_forward_weights()
            self._pending.discard(tensor.name)
        if skipped:
            self.skipped_steps += 1
        return len(skipped)

    # --- memory ---------------------------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Bytes of every tensor the engine holds (θ, the set bytes, thresholds), each storage counted once."""
        seen: dict[int, int] = {}
        held = [v for t in self.tensors.values() for v in vars(t).values() if v is not t.param]
        held += [v for u in self.units for v in vars(u).values()]
        for value in _tensors_in(held):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def summed_over_shards(self, values: Mapping[str, Tensor]) -> dict[str, list[float]]:
        """Per-tensor vectors (counts over what each rank holds) summed over the shards of each sharded tensor.

        A collective when any tensor is sharded: every rank must call it. One read-back for all tensors.
        """
        by_group: dict[Any, list[str]] = {}
        for name, tensor in self.tensors.items():
            if tensor.placement is not None:
                by_group.setdefault(tensor.placement.group, []).append(name)
        summed = dict(values)
        for group, names in by_group.items():
            total = sharded.all_reduce(torch.stack([values[name] for name in names]), group)
            summed.update(zip(names, total.unbind(0), strict=True))
        if not summed:
            return {}
        device = next(iter(summed.values())).device
        host = torch.stack([v.to(device) for v in summed.values()]).tolist()
        return dict(zip(summed, host, strict=True))

    # --- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain state: versioned, tensors and numbers only, loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "steps": list(self.steps),
            "refreshes": self.refreshes,
            "early_refreshes": self.early_refreshes,
            "skipped_steps": self.skipped_steps,
            "tensors": {
                name: {
                    "shape": t.shape,
                    "forward_density": t.forward_density,
                    "backward_density": t.backward_density,
                    "in_global_pool": t.in_global_pool,
                    # a shard as a DTensor laid out as its parameter: torch's distributed checkpoint saves the whole
                    "theta": t.theta if t.placement is None else t.placement.wrap(t.theta),
                    "code": t.code if t.placement is None else t.placement.wrap(t.code),
                }
                for name, t in self.tensors.items()
            },
            "units": [
                {
                    "tensors": [t.name for t in unit.tensors],
                    "forward_threshold": _plain(unit.forward),
                    "backward_threshold": _plain(unit.backward),
                    "since_refresh": unit.since_refresh,
                    "early_flag": None if unit.early_flag is None else unit.early_flag.read(),
                }
                for unit in self.units
            ],
        }

    def differences(self, state: Mapping[str, Any]) -> list[str]:
        """What in ``state`` does not fit these tensors (names, shapes, densities); empty when it loads as is."""
        if state.get("version") != STATE_VERSION:
            return [f"state version {state.get('version')!r}, expected {STATE_VERSION}"]
        saved: Mapping[str, Any] = state["tensors"]
        problems = [f"{name}: in the checkpoint, not masked now" for name in saved if name not in self.tensors]
        problems += [f"{name}: masked now, not in the checkpoint" for name in self.tensors if name not in saved]
        for name in saved.keys() & self.tensors.keys():
            now, then = self.tensors[name], saved[name]
            if now.shape != list(then["shape"]):
                problems.append(f"{name}: shape {list(then['shape'])} in the checkpoint, {now.shape} now")
            for key in ("forward_density", "backward_density", "in_global_pool"):
                if not math.isclose(float(getattr(now, key)), float(then[key]), rel_tol=1e-9, abs_tol=1e-12):
                    problems.append(
                        f"{name}: {key} {_show(then[key])} in the checkpoint, {_show(getattr(now, key))} now"
                    )
        return sorted(problems)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore θ, the sets, thresholds and counters; raises ``ValueError`` listing every difference."""
        problems = self.differences(state)
        if problems:
            raise ValueError("Top-KAST state does not fit the masked tensors: " + "; ".join(problems))
        for name, saved in state["tensors"].items():
            tensor = self.tensors[name]
            tensor.theta.copy_(_this_shard(tensor, saved["theta"]))
            tensor.code.copy_(_this_shard(tensor, saved["code"]))
            tensor.forward_size = int(torch.count_nonzero(tensor.code & A_BIT))
            tensor.write_forward_weights()
        for saved in state["units"]:
            unit = self.tensors[saved["tensors"][0]].unit
            device = unit.tensors[0].theta.device
            unit.forward, unit.backward = (
                _threshold(saved[key], self.sync_free, device) for key in ("forward_threshold", "backward_threshold")
            )
            unit.since_refresh = int(saved["since_refresh"])
            flag = saved["early_flag"]
            unit.early_flag = None if flag is None else HostCopy(torch.tensor(flag))
            if self.sync_free:
                for tensor in unit.tensors:
                    tensor.forward_size = torch.tensor(tensor.forward_size, device=device)
        self._adopt_thresholds()
        self.steps = [int(s) for s in state["steps"]] + self.steps[len(state["steps"]) :]
        self.refreshes = int(state["refreshes"])
        self.early_refreshes = int(state["early_refreshes"])
        self.skipped_steps = int(state["skipped_steps"])


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


def _this_shard(tensor: MaskedTensor, saved: Tensor) -> Tensor:
    """Of a saved θ or set bytes, the part ``tensor`` holds.

    That is a DTensor's local shard, or this rank's rows of a whole tensor (a consolidated checkpoint's).
    """
    if hasattr(saved, "to_local"):
        return saved.to_local()
    if tensor.placement is None or list(saved.shape) != tensor.shape:
        return saved
    return tensor.placement.shard_of(saved)


def _creates_state_only(optimizer: Optimizer) -> bool:
    """Whether a step was torch.distributed.checkpoint's, which creates state to load into: lr 0, zero gradients."""
    return all(group["lr"] == 0 for group in optimizer.param_groups) and all(
        p.grad is None or not bool(sharded.local(p.grad).any()) for g in optimizer.param_groups for p in g["params"]
    )


def _shaped_like(value: object, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == param.shape


def _on_cuda(params: Iterable[Tensor]) -> bool:
    return any(p.device.type == "cuda" for p in params)


def _plain(threshold: Any) -> list[int]:
    return [int(v) for v in threshold]  # tensors are read back here, at checkpoint time


def _threshold(values: Sequence[int], as_tensors: bool, device: torch.device) -> Any:
    threshold = Threshold(int(values[0]), int(values[1]))
    return selection.threshold_tensors_of(threshold, device) if as_tensors else threshold


def _tensors_in(values: Iterable[Any]) -> Iterable[Tensor]:
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, tuple | list):
            yield from _tensors_in(value)


def _show(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
