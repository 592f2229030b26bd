r"""The Top-KAST engine: masked tensors stepped in place by any torch optimizer; no Lightning needed.

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

Each concern has one place: *when* a refresh runs is :mod:`lightning_topkast.schedule`; *which* entries form A and
B is :mod:`lightning_topkast.selection` (on the device :mod:`~lightning_topkast.batched` and the radix selects of
:mod:`~lightning_topkast.triton_kernels` and :mod:`~lightning_topkast.sharded`); *how* each pass runs is a backend
behind one interface (:class:`lightning_topkast.backend.Backend`): a pass per tensor
(:mod:`~lightning_topkast.per_tensor`, through the C or torch kernels of :mod:`~lightning_topkast.kernels`) or a
pass per flat group of tensors (:mod:`~lightning_topkast.device`). This module wires them to the optimizers, runs
each step in order (prepare, the update, finish, refresh where due) and keeps the state.

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
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_topkast import backend, kernels, per_tensor, selection, sharded
from lightning_topkast.backend import Backend, Moved, Step
from lightning_topkast.device import FlatGroup
from lightning_topkast.kernels import A_BIT, Threshold
from lightning_topkast.masked import MaskedTensor, Unit, make_unit
from lightning_topkast.schedule import HostCopy, Schedule

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
        self._backends: list[list[Backend]] = []  # per optimizer: the flat groups' passes, then the per-tensor ones
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
        self._use_backends(flat=False)  # rebuilt on the new device below, after the state is loaded
        self.load_state_dict(state)  # copies across devices, thresholds as the new path holds them
        if self.attached:
            self._use_backends(flat=self.sync_free and self.batched_passes)
        return True

    # --- optimizer wiring -------------------------------------------------------------------------------------

    def attach(self, optimizers: Sequence[Optimizer], steps_in_progress: Sequence[int] | None = None) -> None:
        """Step with ``optimizers``: each refreshes the tensors it owns after its own steps.

        ``steps_in_progress``: what :meth:`steps_in_progress` of an engine this one replaces inside an optimizer's
        ``step()`` returned (Lightning runs the closure, and so the hooks before the update, inside it).
        """
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
        self._use_backends(flat=self.sync_free and self.batched_passes)
        alone = [t.name for t in self.tensors.values() if t.placement is not None and t.name not in self._in_flat]
        if alone:  # its rank-local decisions could differ between ranks, and the sums would wait forever
            raise ValueError(
                f"sharded parameters {', '.join(alone)} are not stepped by exactly one of the optimizers (or "
                "batched_passes is False): a sharded tensor's refreshes are decided on its optimizer's flat group"
            )
        self._unchecked = set(range(len(optimizers)))
        self._depth = list(steps_in_progress) if steps_in_progress is not None else [0] * len(optimizers)
        for i, opt in enumerate(optimizers):
            # torch runs the hooks around every patched step() level, so a subclass whose step() calls super's
            # fires them twice: the update is done when the outermost call returns
            self._handles.append(opt.register_step_pre_hook(lambda opt, args, kwargs, i=i: self._enter_step(i)))
            self._handles.append(opt.register_step_post_hook(lambda opt, args, kwargs, i=i: self._leave_step(i)))

    def steps_in_progress(self) -> list[int]:
        """Per attached optimizer, how many of its ``step()`` calls are running now."""
        return list(self._depth)

    def _use_backends(self, flat: bool) -> None:
        """Per optimizer, the backends that step its tensors: flat groups if ``flat``, then per tensor the rest."""
        groups = backend.flat_groups(self.units, self._owner, self._optimizers) if flat else {}
        self._flat = groups
        self._in_flat = {t.name for batches in groups.values() for batch in batches for t in batch.tensors}
        self._backends = backend.per_optimizer(self._groups, groups, self.sync_free)

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
        self._use_backends(flat=False)

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
        for tensor in group:
            if tensor.param.grad is not None and tensor.param.grad.is_sparse:
                raise TypeError(
                    f"{tensor.name} has a sparse gradient (nn.Embedding(sparse=True)); Top-KAST masks dense "
                    "gradients: build the embedding with sparse=False or exclude it"
                )
        step = self._step(index)
        for passes in self._backends[index]:
            passes.prepare(step)

    def _enter_step(self, index: int) -> None:
        self._depth[index] += 1

    def _leave_step(self, index: int) -> None:
        self._depth[index] -= 1
        if self._depth[index] == 0:
            self._after_step(index)

    @torch.no_grad()
    def _after_step(self, index: int) -> None:
        """The step post-hook: finish the update of each backend, then refresh what the schedule says is due."""
        group = self._groups[index]
        if not any(t.name in self._pending for t in group):
            if _creates_state_only(self._optimizers[index]):
                return  # not a training step: it changed nothing but the optimizer state that a load then overwrites
            if any(t.param.grad is not None for t in group):
                raise RuntimeError(
                    "optimizer.step() ran without TopKAST.before_step(optimizer): the update used unmasked "
                    "gradients. Under Lightning, step through the LightningOptimizer (self.optimizers()), not its "
                    ".optimizer"
                )
        self.steps[index] += 1
        zero_state = index in self._unchecked or type(self._optimizers[index]) not in _STATE_STAYS_ZERO
        step = self._step(index, zero_state)
        moved: Moved = {}
        reasons: list[str] = []
        for passes in self._backends[index]:
            why = passes.finish(step)
            due = [reason is not None for reason in why]
            if any(due):
                moved.update(passes.refresh(step, due))
            elif zero_state:
                passes.keep_states(step)
            reasons += [reason for reason in why if reason is not None]
        if reasons:
            self.refreshes += 1
            self.early_refreshes += "early" in reasons
            for listener in self.refresh_listeners:
                listener(moved)
        self._unchecked.discard(index)

    def _step(self, index: int, zero_state: bool = False) -> Step:
        """What the backends of optimizer ``index`` are told of its step."""
        penalty, decoupled = (0.0, self.penalty) if self.decoupled_penalty else (self.penalty, 0.0)
        return Step(self._optimizers[index], penalty, decoupled, self.schedule, self._pending, self._states, zero_state)

    # --- refresh --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self, tensors: Sequence[MaskedTensor] | None = None) -> None:
        """Re-select A and B of ``tensors`` (default: all; the whole global pool if any is in it) from |θ|."""
        chosen = self.tensors.values() if tensors is None else tensors
        units = list(dict.fromkeys(t.unit for t in chosen))
        moved: Moved = {}
        for unit in units:
            self.schedule.refreshed(unit)
            moved.update(self._select(unit))
        self._adopt_thresholds()
        self.refreshes += 1
        for listener in self.refresh_listeners:
            listener(moved)

    def _select(self, unit: Unit) -> Moved:
        """A full selection of ``unit``'s sets, now."""
        return per_tensor.select(unit, self.sync_free, self._states, self._pending)

    def _states(self, tensor: MaskedTensor) -> list[Tensor]:
        """The optimizer state of ``tensor`` (of the optimizer that steps it) in the parameter's shape."""
        optimizer = self._owner.get(tensor.name)
        return [] if optimizer is None else list(tensor.optimizer_states(optimizer).values())

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
