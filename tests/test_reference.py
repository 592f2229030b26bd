r"""Top-KAST against a naive reference written from the method's rules, sharing no code with the library.

The reference (:class:`Reference`) keeps the dense θ of every parameter, selects A and B by a stable sort of |θ| in
plain Python (ties to the lower index, NaN last, sizes rounded half up by ``conftest.half_up``), and steps in the
order of the method (docs: METHOD.md, "The three rules" and "Optimizer state"):

1. the forward pass sees α = θ on A, 0 elsewhere; the gradient ∂L/∂α comes from autograd;
2. on B, the gradient plus the penalty's λ·c·θ (c = 1 on A, 1/D on B \ A) goes through the optimizer's equations,
   weight decay included (or, decoupled, the update is followed by θ −= lr·λ·c·θ, the callback's default under
   AdamW); outside B nothing moves and the optimizer state is 0;
3. at a refresh A and B are re-selected from |θ| of all entries, and optimizer state survives only where an entry
   was in B before and after: a weight that enters B starts with fresh state. Adam's step count is the tensor's,
   not the weight's (the library, like every implementation METHOD.md names, does not restart bias correction).

The optimizers' equations are written out with the same elementwise torch operations in the same order as torch's
single-tensor SGD and AdamW, so the engine and a real ``Trainer.fit`` must match the reference bit for bit. Fused
AdamW runs one vectorised CPU kernel whose rounding differs from those operations, and the difference grows through
the moments; it is held to 1e-5 relative plus 1e-7 absolute (measured over 32 steps: at most 4e-5 relative, on
entries near 0), with A and B still exactly equal at every step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import pytest
import torch
from conftest import MLP, bit_exact, half_up, make_engine, make_loader, make_trainer
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F

from lightning_topkast import TopKAST, TopKASTCallback

FORWARD, BACKWARD = 0.2, 0.5  # densities D and D + M: the callback's default sparsities 0.8 and 0.5
PENALTY = 1e-4
MASKED = ("net.2.weight", "net.4.weight")  # the first layer is dense by default


# --- the reference -----------------------------------------------------------------------------------------------


def top_k(theta: Tensor, k: int) -> Tensor:
    """Bool mask of the first ``k`` entries of a stable sort: larger |θ| first, ties to the lower index, NaN last."""
    values = theta.flatten().tolist()
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -abs(values[i]), i))
    mask = [False] * len(values)
    for i in order[:k]:
        mask[i] = True
    return torch.tensor(mask).view(theta.shape)


@dataclass
class Optim:
    """One optimizer's hyperparameters, named as in torch."""

    kind: str  # "sgd" or "adamw"
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool = False

    def build(self, params: Iterable[Tensor]) -> torch.optim.Optimizer:
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, fused=self.fused
        )

    def state_names(self) -> tuple[str, ...]:
        if self.kind == "sgd":
            return ("momentum_buffer",) if self.momentum else ()
        return ("exp_avg", "exp_avg_sq")


@dataclass
class Reference:
    """Top-KAST in a plain loop over steps: dense θ, sets by a stable sort, optimizer equations by hand."""

    module: torch.nn.Module
    optim: Optim
    interval: int = 1
    penalty: float = PENALTY
    decoupled: bool = False  # the penalty applied to θ after the update (× lr, outside the optimizer), not in ∂L
    theta: dict[str, Tensor] = field(init=False)
    forward_set: dict[str, Tensor] = field(init=False)
    backward_set: dict[str, Tensor] = field(init=False)
    state: dict[str, dict[str, Tensor]] = field(init=False)
    step_count: int = 0
    entered: int = 0  # entries that joined B at a refresh
    reentered: int = 0  # of those, entries that had been in B before
    left: int = 0  # entries that left B at a refresh

    def __post_init__(self) -> None:
        self.module = copy.deepcopy(self.module)
        self.theta = {n: p.detach().clone() for n, p in self.module.named_parameters()}
        self.forward_set, self.backward_set, self.been_in_b = {}, {}, {}
        for name in MASKED:
            self._select(name)
            self.been_in_b[name] = self.backward_set[name].clone()
        self.state = {n: {k: torch.zeros_like(t) for k in self.optim.state_names()} for n, t in self.theta.items()}

    def _select(self, name: str) -> None:
        n = self.theta[name].numel()
        self.forward_set[name] = top_k(self.theta[name], half_up(FORWARD, n))
        self.backward_set[name] = top_k(self.theta[name], half_up(BACKWARD, n))

    def alpha(self, name: str) -> Tensor:
        if name not in MASKED:
            return self.theta[name]
        return torch.where(self.forward_set[name], self.theta[name], 0)

    def step(self, x: Tensor, y: Tensor) -> None:
        alpha = {n: self.alpha(n).clone().requires_grad_() for n in self.theta}
        loss = F.cross_entropy(functional_call(self.module, alpha, (x,)), y)
        grads = dict(zip(alpha, torch.autograd.grad(loss, list(alpha.values())), strict=True))
        self.step_count += 1
        for name, theta in self.theta.items():
            if name in MASKED:
                in_a, in_b = self.forward_set[name], self.backward_set[name]
                scale = -self.optim.lr * self.penalty if self.decoupled else self.penalty
                c = torch.where(in_a, scale, torch.where(in_b, scale / FORWARD, 0.0)).to(theta.dtype)
                grad = grads[name] if self.decoupled else grads[name] + c * theta  # ∂L/∂α and the penalty
                grad = torch.where(in_b, grad, 0)  # on B only
                p = torch.where(in_b, theta, 0)
            else:
                in_b, grad, p = None, grads[name], theta.clone()
            state = self.state[name]
            self._update(p, grad, state)
            if in_b is not None and self.decoupled:  # θ shrinks by lr·λ·c after the update, outside the optimizer
                p = p + c * p
            if in_b is not None:  # outside B nothing moves and the state stays 0
                p = torch.where(in_b, p, theta)
                for key in state:
                    state[key] = torch.where(in_b, state[key], 0)
            self.theta[name] = p
        if self.step_count % self.interval == 0:
            for name in MASKED:
                self._refresh(name)

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Tensor]) -> None:
        """The optimizer's equations, in place, in torch's single-tensor operations and order."""
        o = self.optim
        if o.kind == "sgd":
            if o.weight_decay:
                grad = grad.add(p, alpha=o.weight_decay)  # L2 weight decay, through momentum
            if o.momentum:
                buf = state["momentum_buffer"]
                if self.step_count == 1:
                    buf.copy_(grad)  # torch starts the buffer at the first gradient
                else:
                    buf.mul_(o.momentum).add_(grad, alpha=1)  # a fresh (zero) entry gets the gradient: 0·μ + g
                grad = buf
            p.add_(grad, alpha=-o.lr)
            return
        beta1, beta2 = o.betas
        p.mul_(1 - o.lr * o.weight_decay)  # decoupled weight decay (AdamW)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)  # β1·m + (1 − β1)·g
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1**self.step_count, 1 - beta2**self.step_count
        denom = (v.sqrt() / bias2**0.5).add_(o.eps)
        p.addcdiv_(m, denom, value=-(o.lr / bias1))

    def _refresh(self, name: str) -> None:
        was_b = self.backward_set[name]
        self._select(name)
        now_b = self.backward_set[name]
        joined = now_b & ~was_b
        self.entered += int(joined.sum())
        self.reentered += int((joined & self.been_in_b[name]).sum())
        self.left += int((was_b & ~now_b).sum())
        self.been_in_b[name] |= now_b
        for key, value in self.state[name].items():  # state survives only in B before and after
            self.state[name][key] = torch.where(was_b & now_b, value, 0)


# --- what the library holds after a step, and the comparison ----------------------------------------------------


def snapshot(engine: TopKAST, module: torch.nn.Module, optimizer: torch.optim.Optimizer, names: Iterable[str]) -> dict:
    """θ, α, A, B and the optimizer state of every parameter, as the library holds them between steps."""
    params = dict(module.named_parameters())
    out: dict[str, Any] = {}
    for name, param in params.items():
        held = optimizer.state.get(param, {})
        entry = {"param": param.detach().clone(), "state": {k: held[k].clone() for k in names if k in held}}
        if name in engine.tensors:
            t = engine.tensors[name]
            entry |= {"theta": t.theta.clone(), "A": t.forward_set, "B": t.backward_set}
        else:
            entry["theta"] = param.detach().clone()
        out[name] = entry
    return out


def assert_matches(got: dict, ref: Reference, step: int, rtol: float = 0.0) -> None:
    """Bit for bit (``rtol`` 0: equal bits, NaN and the sign of 0 included), or within ``rtol`` with equal sets."""
    for name, entry in got.items():
        where = f"step {step}, {name}"
        if name in MASKED:
            assert torch.equal(entry["A"], ref.forward_set[name]), where
            assert torch.equal(entry["B"], ref.backward_set[name]), where
        pairs = [("theta", entry["theta"], ref.theta[name]), ("param", entry["param"], ref.alpha(name))]
        pairs += [(key, value, ref.state[name][key]) for key, value in entry["state"].items()]
        assert {k for k, _, _ in pairs[2:]} == set(ref.state[name]), where
        for what, a, b in pairs:
            if rtol == 0.0:
                assert bit_exact(a, b), (where, what, (a - b).abs().max())
            else:
                torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7, msg=f"{where}, {what}")


def exercised(ref: Reference) -> None:
    """The run moved entries in and out of B, and some back in: the state rules were compared, not assumed."""
    assert ref.entered > 0
    assert ref.left > 0
    assert ref.reentered > 0


# --- the engine in a plain loop ------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": Optim("sgd", lr=0.1, momentum=0.9),
    "sgd-momentum-weight-decay": Optim("sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adamw": Optim("adamw", lr=1e-2, weight_decay=0.1),
    "adamw-fused": Optim("adamw", lr=1e-2, weight_decay=0.1, fused=True),
}
STEPS = 32


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_engine_equals_the_reference_at_every_step(optimizer: str, interval: int) -> None:
    optim = OPTIMIZERS[optimizer]
    model = MLP()
    ref = Reference(model, optim, interval)
    params = dict(model.named_parameters())
    opt = optim.build(model.parameters())
    masked = {n: params[n] for n in MASKED}
    engine = make_engine(masked, (FORWARD, BACKWARD), [opt], update_interval=interval, penalty=PENALTY)
    rtol = 1e-5 if optim.fused else 0.0
    loader = make_loader(n=STEPS * 8, batch_size=8)
    for step, (x, y) in enumerate(loader, 1):
        F.cross_entropy(model(x), y).backward()
        engine.before_step(opt)
        opt.step()
        opt.zero_grad()
        ref.step(x, y)
        assert_matches(snapshot(engine, model, opt, optim.state_names()), ref, step, rtol)
    assert engine.steps == [STEPS]
    exercised(ref)


# --- a real Trainer.fit with the callback -------------------------------------------------------------------------


class Snapshots(L.Callback):
    """What the library holds at the end of every training batch (after the callback's own batch end)."""

    def __init__(self, topkast: TopKASTCallback, names: tuple[str, ...]) -> None:
        self.topkast, self.names, self.taken = topkast, names, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        assert self.topkast.engine is not None
        self.taken.append(snapshot(self.topkast.engine, pl_module, trainer.optimizers[0], self.names))


TRAINER_OPTIMIZERS = {  # the optimizers conftest.MLP configures (SGD: momentum 0.9, weight decay 1e-2)
    "sgd": Optim("sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adamw": Optim("adamw", lr=1e-2, weight_decay=0.1),
    "adamw-fused": Optim("adamw", lr=1e-2, weight_decay=0.1, fused=True),
}
# the callback's default penalty, as README's arguments table states it: through the gradient at 1e-4 under SGD,
# decoupled at 3e-2 under Adam and AdamW
DEFAULT_PENALTY = {"sgd": (1e-4, False), "adamw": (3e-2, True)}


@pytest.mark.parametrize("optimizer", list(TRAINER_OPTIMIZERS))
def test_trainer_fit_equals_the_reference_at_every_step(tmp_path: Any, optimizer: str) -> None:
    optim = TRAINER_OPTIMIZERS[optimizer]
    model = MLP(optimizer=optimizer, lr=optim.lr)
    penalty, decoupled = DEFAULT_PENALTY[optim.kind]
    ref = Reference(model, optim, penalty=penalty, decoupled=decoupled)
    topkast = TopKASTCallback(verbose=False)
    snapshots = Snapshots(topkast, optim.state_names())
    loader = make_loader(n=STEPS * 8, batch_size=8)
    make_trainer(tmp_path, [topkast, snapshots]).fit(model, loader)
    assert topkast.engine is not None
    assert sorted(topkast.engine.tensors) == list(MASKED)
    assert [(t.forward_density, t.backward_density) for t in topkast.engine.tensors.values()] == [
        (pytest.approx(FORWARD, abs=1e-12), pytest.approx(BACKWARD, abs=1e-12))
    ] * 2
    assert (topkast.engine.penalty, topkast.engine.decoupled_penalty) == (penalty, decoupled)
    assert len(snapshots.taken) == STEPS
    for step, ((x, y), got) in enumerate(zip(loader, snapshots.taken, strict=True), 1):
        ref.step(x, y)
        assert_matches(got, ref, step, 1e-5 if optim.fused else 0.0)
    exercised(ref)
