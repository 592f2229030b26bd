r"""Per-tensor Top-KAST state and the in-place step mechanics; works with any torch optimizer, no Lightning needed.

Between optimizer steps every masked parameter holds exactly its forward weights α = θ on A, 0 elsewhere, so
anything that reads the parameter (modules, functional calls, tied weights, ``state_dict``) sees the sparse model.
The dense θ lives here. One step (DESIGN.md):

1. :meth:`TopKAST.before_step` (after backward and unscaling, before clipping): the gradient is kept on B only, the
   exploration penalty's gradient is added, and θ on B \ A is written into the parameter so that the update
   applies to the true values of B.
2. the optimizer updates the parameter.
3. a step post-hook: θ takes the new values on B and keeps its old ones outside B (whatever the update wrote there,
   weight decay or momentum drift, is discarded); every ``update_interval`` steps A and B are re-selected from |θ|;
   optimizer state outside B is zeroed; α is written back. SGD, Adam and AdamW see a zero weight and a zero
   gradient outside B, so their state there stays zero and is zeroed only when B changes; any other optimizer's
   state is zeroed after every step.

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_topkast.regularizer import penalty_weights
from lightning_topkast.selection import forward_backward_sets, global_forward_backward_sets, turnover

STATE_VERSION = 1

RefreshListener = Callable[[dict[str, tuple[int, int]]], None]

# With a zero gradient and a zero weight, these optimizers leave a zero state entry zero (no element-wise term
# creates state from nothing), so their state outside B needs zeroing only when B changes. Any other optimizer is
# zeroed after every step. Exact types: a subclass may change the update.
_STATE_STAYS_ZERO: tuple[type[Optimizer], ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass
class MaskedTensor:
    """One masked parameter: its dense values θ, forward set A, backward set B and every weight ever in A."""

    name: str
    param: nn.Parameter
    forward_density: float
    backward_density: float
    in_global_pool: bool
    theta: Tensor = field(init=False)
    forward_set: Tensor = field(init=False)
    backward_set: Tensor = field(init=False)
    float_masks: bool = False
    ever_active: Tensor = field(init=False)
    penalty_coefficient: Tensor | None = field(init=False, default=None)
    scales: tuple[Tensor, Tensor, Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.theta = self.param.detach().clone()
        self.forward_set = torch.ones_like(self.theta, dtype=torch.bool)
        self.backward_set = torch.ones_like(self.theta, dtype=torch.bool)
        self.ever_active = torch.zeros_like(self.theta, dtype=torch.bool)

    @property
    def numel(self) -> int:
        """Number of weights in the tensor."""
        return self.theta.numel()

    def set_masks(self, forward_set: Tensor, backward_set: Tensor, penalty: float) -> tuple[int, int]:
        """Install new sets (and the penalty's λ·c for them); returns the turnover ``(left, size)`` of A."""
        moved = turnover(self.forward_set, forward_set)
        self.forward_set, self.backward_set = forward_set, backward_set
        self.ever_active |= forward_set
        self.penalty_coefficient = None
        masks = (forward_set, backward_set)
        if self.float_masks:
            forward, backward = forward_set.to(self.theta.dtype), backward_set.to(self.theta.dtype)
            self.scales = (forward, backward, torch.rsub(backward, 1))
            masks = (forward, backward)
        if penalty:
            # λ/D fits in half precision where 1/D may not (D = 1e-5 overflows float16): multiply, then narrow
            wide = torch.promote_types(self.theta.dtype, torch.float32)
            weights = penalty_weights(*masks, self.forward_density, wide)
            self.penalty_coefficient = weights.mul_(penalty).to(self.theta.dtype)
        return moved

    @torch.no_grad()
    def write_forward_weights(self, theta_finite: bool | None = None) -> None:
        """Make the parameter hold α: θ on A, exactly 0 elsewhere (``theta_finite``: already known, or None)."""
        self.keep(self.theta, on_forward_set=True, out=self.param, finite=theta_finite)

    def keep(self, x: Tensor, on_forward_set: bool, out: Tensor, finite: bool | None = None) -> None:
        """``out`` = ``x`` on A (or B), 0 elsewhere; ``finite`` says whether ``x`` is, when already known."""
        mask = self.forward_set if on_forward_set else self.backward_set
        if self.scales is not None and (_finite(x) if finite is None else finite):
            torch.mul(x, self.scales[0 if on_forward_set else 1], out=out)
        else:
            torch.where(mask, x, _zero(x), out=out)

    def merge(self, inside: Tensor, outside: Tensor, out: Tensor) -> bool:
        """``out`` = ``inside`` on B, ``outside`` elsewhere (``out`` may be ``outside``); True if all were finite."""
        if self.scales is not None and _finite(inside) and _finite(outside):
            # exact for finite values: x·1 + y·0 = x
            torch.mul(outside, self.scales[2], out=out).addcmul_(inside, self.scales[1])
            return True
        torch.where(self.backward_set, inside, outside, out=out)
        return False


class TopKAST:
    """Top-KAST over a set of named parameters, stepped by one or more torch optimizers.

    Args:
        params: the parameters to mask, by name, in a fixed order.
        densities: ``{name: (D, D + M)}``, the forward and backward density of each tensor.
        update_interval: optimizer steps between refreshes of A and B (counted per optimizer).
        penalty: the exploration penalty's strength λ; 0 turns it off.
        decoupled_penalty: apply the penalty to the weights after the update (scaled by the learning rate, outside
            momentum) instead of through the gradient.
        global_pool: names ranked together by one top-k at each refresh instead of per tensor; they must share
            one (D, D + M).
        float_masks: also keep A and B as 0/1 tensors in θ's dtype, so the per-step selects are multiplies
            (exact for finite values; non-finite ones take a ``where``). Bool-masked ``where`` runs ~40x slower
            than a multiply on CPU, while on GPUs both are memory-bound; default: on for CPU tensors only.
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
        float_masks: bool | None = None,
    ) -> None:
        self.tensors = {
            name: MaskedTensor(
                name,
                param,
                *densities[name],
                in_global_pool=name in global_pool,
                float_masks=param.device.type == "cpu" if float_masks is None else float_masks,
            )
            for name, param in params.items()
        }
        if len({self.tensors[name].forward_density for name in global_pool}) > 1:
            raise ValueError("tensors in the global pool must share one forward density")
        self.update_interval = update_interval
        self.penalty = penalty
        self.decoupled_penalty = decoupled_penalty
        self.steps: list[int] = []
        self.refreshes = 0
        self.skipped_steps = 0
        self.refresh_listeners: list[RefreshListener] = []
        self._groups: list[list[MaskedTensor]] = []
        self._optimizers: list[Optimizer] = []
        self._handles: list[RemovableHandle] = []
        self._pending: set[str] = set()
        self._unchecked: set[int] = set()
        self._depth: list[int] = []  # step() calls in progress per optimizer: a subclass's step may call super's
        self._select(list(self.tensors.values()))
        for tensor in self.tensors.values():
            tensor.write_forward_weights()

    # --- optimizer wiring -------------------------------------------------------------------------------------

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Step with ``optimizers``: each refreshes the tensors it owns after every ``update_interval`` of its steps."""
        self.detach()
        owner = {id(p): i for i, opt in enumerate(optimizers) for group in opt.param_groups for p in group["params"]}
        self._optimizers = list(optimizers)
        self._groups = [[] for _ in optimizers]
        for tensor in self.tensors.values():
            if id(tensor.param) in owner:
                self._groups[owner[id(tensor.param)]].append(tensor)
        self.steps += [0] * (len(optimizers) - len(self.steps))
        self._unchecked = set(range(len(optimizers)))
        self._depth = [0] * len(optimizers)
        for i, opt in enumerate(optimizers):
            # torch runs the hooks around every patched step() level, so a subclass whose step() calls super's
            # fires them twice: the update is done when the outermost call returns
            self._handles.append(opt.register_step_pre_hook(lambda opt, args, kwargs, i=i: self._enter_step(i)))
            self._handles.append(opt.register_step_post_hook(lambda opt, args, kwargs, i=i: self._leave_step(i)))

    @property
    def attached(self) -> bool:
        """Whether step post-hooks are registered on optimizers."""
        return bool(self._handles)

    def detach(self) -> None:
        """Remove the step post-hooks; the parameters keep holding α."""
        self.restore_forward_weights()
        for handle in self._handles:
            handle.remove()
        self._handles, self._groups, self._optimizers = [], [], []

    def _index(self, optimizer: Optimizer) -> int:
        for i, opt in enumerate(self._optimizers):
            if opt is optimizer:
                return i
        raise RuntimeError("TopKAST.before_step got an optimizer that was not attached; call attach() first")

    # --- one step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def before_step(self, optimizer: Optimizer) -> None:
        """Prepare the tensors ``optimizer`` owns for its update (after backward, before clipping and the step)."""
        index = self._index(optimizer)
        group = self._groups[index]
        self._restore(group)
        for tensor in group:
            grad = tensor.param.grad
            if grad is None:
                continue  # unused this step: the optimizer skips it too
            if grad.is_sparse:
                raise TypeError(
                    f"{tensor.name} has a sparse gradient (nn.Embedding(sparse=True)); Top-KAST masks dense "
                    "gradients: build the embedding with sparse=False or exclude it"
                )
            # θ on B goes into the parameter so the update applies to the true values of B \ A; zeros outside B
            # keep element-wise optimizers from creating state there.
            tensor.keep(tensor.theta, on_forward_set=False, out=tensor.param)
            # a NaN or inf outside B must not reach the update: `keep` selects rather than multiplies then
            tensor.keep(grad, on_forward_set=False, out=grad)
            if tensor.penalty_coefficient is not None and not self.decoupled_penalty:
                # λ·c·θ through the parameter, which holds θ on B and exactly 0 outside it: 0·θ would be NaN where
                # θ is not finite (a weight a bf16 step made NaN stays NaN outside B until a refresh)
                grad.addcmul_(tensor.penalty_coefficient, tensor.param)
            self._pending.add(tensor.name)

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
        if not pending and any(t.param.grad is not None for t in group):
            raise RuntimeError(
                "optimizer.step() ran without TopKAST.before_step(optimizer): the update used unmasked gradients. "
                "Under Lightning, step through the LightningOptimizer (self.optimizers()), not its .optimizer"
            )
        lrs = self._learning_rates(index) if self.decoupled_penalty and self.penalty else {}
        finite: dict[str, bool] = {}  # θ known finite after a fast merge (the penalty only shrinks it)
        for tensor in pending:
            finite[tensor.name] = tensor.merge(tensor.param, tensor.theta, out=tensor.theta)
            if lrs and tensor.penalty_coefficient is not None:
                tensor.theta.addcmul_(tensor.penalty_coefficient, tensor.theta, value=-lrs[id(tensor.param)])
            self._pending.discard(tensor.name)
        self.steps[index] += 1
        keep = {t.name: t.backward_set for t in group}
        others: list[MaskedTensor] = []  # refreshed with the group, through a shared global pool
        if bool(group) and self.steps[index] % self.update_interval == 0:
            moved = self._refresh(group)
            names = {t.name for t in group} | self._pending
            others = [self.tensors[name] for name in moved.keys() - names]
            # state survives only where an entry stayed in B: one entering B starts fresh even if a hook after
            # the callback (gradient noise, say) wrote outside B and built state there
            keep = {t.name: keep[t.name] & t.backward_set for t in group}
        elif index not in self._unchecked and type(self._optimizers[index]) in _STATE_STAYS_ZERO:
            keep = {}
        # the first step after attach too: the optimizer may arrive with state restored from a dense run
        self._unchecked.discard(index)
        self._zero_state_outside(self._optimizers[index], group, keep)
        for tensor in [*group, *others]:
            tensor.write_forward_weights(finite.get(tensor.name))

    def _zero_state_outside(self, optimizer: Optimizer, group: Sequence[MaskedTensor], keep: dict[str, Tensor]) -> None:
        # every state tensor shaped like the parameter, whatever the optimizer calls it
        for tensor in group:
            if tensor.name not in keep:
                continue
            for value in optimizer.state.get(tensor.param, {}).values():
                if not isinstance(value, Tensor) or value.shape != tensor.param.shape:
                    continue
                if keep[tensor.name] is tensor.backward_set:
                    tensor.keep(value, on_forward_set=False, out=value)
                elif tensor.scales is not None and _finite(value):
                    value.mul_(keep[tensor.name].to(value.dtype))  # exact for finite values, and a bool where is slow
                else:
                    torch.where(keep[tensor.name], value, _zero(value), out=value)

    def _learning_rates(self, index: int) -> dict[int, float]:
        return {id(p): g["lr"] for g in self._optimizers[index].param_groups for p in g["params"]}

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
            name: torch.where(tensor.forward_set, tensor.theta, _zero(tensor.theta))
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

    # --- refresh --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self, tensors: Sequence[MaskedTensor]) -> None:
        """Re-select A and B of ``tensors`` from |θ| over all entries (the whole global pool if any is in it)."""
        moved = self._refresh(tensors)
        for name in moved.keys() - self._pending:  # a pending tensor gets α when its own step finishes
            self.tensors[name].write_forward_weights()

    def _refresh(self, tensors: Sequence[MaskedTensor]) -> dict[str, tuple[int, int]]:
        # the sets only: the caller writes α once, after whatever else the step changes
        moved = self._select(tensors)
        self.refreshes += 1
        for listener in self.refresh_listeners:
            listener(moved)
        return moved

    def _select(self, tensors: Sequence[MaskedTensor]) -> dict[str, tuple[int, int]]:
        moved: dict[str, tuple[int, int]] = {}
        for tensor in tensors:
            if not tensor.in_global_pool:
                sets = forward_backward_sets(tensor.theta, tensor.forward_density, tensor.backward_density)
                moved[tensor.name] = tensor.set_masks(*sets, self.penalty)
        if any(t.in_global_pool for t in tensors):
            pool = [t for t in self.tensors.values() if t.in_global_pool]
            sets = global_forward_backward_sets(
                [t.theta for t in pool], pool[0].forward_density, pool[0].backward_density
            )
            for tensor, (forward_set, backward_set) in zip(pool, sets, strict=True):
                moved[tensor.name] = tensor.set_masks(forward_set, backward_set, self.penalty)
        return moved

    # --- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain state: versioned, tensors and numbers only, loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "steps": list(self.steps),
            "refreshes": self.refreshes,
            "skipped_steps": self.skipped_steps,
            "tensors": {
                name: {
                    "shape": list(t.theta.shape),
                    "forward_density": t.forward_density,
                    "backward_density": t.backward_density,
                    "in_global_pool": t.in_global_pool,
                    "theta": t.theta,
                    "forward_set": t.forward_set,
                    "backward_set": t.backward_set,
                    "ever_active": t.ever_active,
                }
                for name, t in self.tensors.items()
            },
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
            if list(now.theta.shape) != list(then["shape"]):
                problems.append(f"{name}: shape {list(then['shape'])} in the checkpoint, {list(now.theta.shape)} now")
            for key in ("forward_density", "backward_density", "in_global_pool"):
                if not math.isclose(float(getattr(now, key)), float(then[key]), rel_tol=1e-9, abs_tol=1e-12):
                    problems.append(
                        f"{name}: {key} {_show(then[key])} in the checkpoint, {_show(getattr(now, key))} now"
                    )
        return sorted(problems)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore θ, the sets and the counters; raises ``ValueError`` listing every difference."""
        problems = self.differences(state)
        if problems:
            raise ValueError("Top-KAST state does not fit the masked tensors: " + "; ".join(problems))
        for name, saved in state["tensors"].items():
            tensor = self.tensors[name]
            tensor.theta.copy_(saved["theta"])
            masks = [saved[key].to(device=tensor.theta.device, dtype=torch.bool, copy=True) for key in _MASK_KEYS]
            tensor.set_masks(masks[0], masks[1], self.penalty)
            tensor.ever_active = masks[2]
            tensor.write_forward_weights()
        self.steps = [int(s) for s in state["steps"]] + self.steps[len(state["steps"]) :]
        self.refreshes = int(state["refreshes"])
        self.skipped_steps = int(state["skipped_steps"])


_MASK_KEYS = ("forward_set", "backward_set", "ever_active")


def _finite(x: Tensor) -> bool:
    # one vectorised pass: a sum is non-finite iff an entry is (or, rarely, it overflows: the safe path then)
    return bool(torch.isfinite(x.sum()))


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _show(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
