"""The TopKAST engine driven from a plain torch loop (no Lightning), checked against a naive reference of METHOD.md."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterable, Iterator

import pytest
import torch
from conftest import assert_alpha, make_engine, needs_cuda
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_topkast import kernels, selection
from lightning_topkast.selection import count, forward_backward_sets, global_forward_backward_sets
from lightning_topkast.state import STATE_VERSION, TopKAST

DENSITIES = {"0.weight": (0.25, 0.5), "2.weight": (0.5, 0.75)}
MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, MakeOptimizer] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
    # state that starts non-zero everywhere: zeroed outside B after every step (any optimizer but SGD/Adam/AdamW)
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05, initial_accumulator_value=0.1),
}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, hidden: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def masked_params(model: nn.Module, names: Iterable[str] = DENSITIES) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in names}


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Data that is a pure function of the step."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(5, 4, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype)


def train_step(model: nn.Module, engine: TopKAST, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step, next(model.parameters()).dtype)
    F.mse_loss(model(x), y).backward()
    engine.before_step(opt)
    opt.step()
    opt.zero_grad()


def setup(
    optimizer: str = "sgd", update_interval: int = 1, penalty: float = 0.0, device: str = "cpu", **kwargs
) -> tuple[nn.Sequential, TopKAST, torch.optim.Optimizer]:
    model = make_model().to(device)
    opt = OPTIMIZERS[optimizer](model.parameters())
    engine = make_engine(
        masked_params(model), DENSITIES, [opt], update_interval=update_interval, penalty=penalty, **kwargs
    )
    return model, engine, opt


# --- the naive reference ----------------------------------------------------------------------------------------------


def naive_sets(theta: Tensor, d: float, dm: float) -> tuple[Tensor, Tensor]:
    """TopK(θ, x): the round(x·n) entries of largest |θ| (random θ has no ties)."""
    sets = []
    for density in (d, dm):
        mask = torch.zeros(theta.numel(), dtype=torch.bool)
        mask[torch.topk(theta.abs().flatten(), int(density * theta.numel() + 0.5)).indices] = True
        sets.append(mask.view(theta.shape))
    return sets[0], sets[1]


def reference_run(steps: int, update_interval: int, lr: float, strength: float) -> list[dict[str, Tensor]]:
    """METHOD.md's three rules with plain SGD, written out: dense θ, α = θ on A, ∂L/∂α applied on B only."""
    params = {name: p.detach().clone() for name, p in make_model().named_parameters()}
    sets = {name: naive_sets(params[name], *DENSITIES[name]) for name in DENSITIES}
    history = []
    for step in range(steps):
        leaves = {
            name: (torch.where(sets[name][0], value, 0) if name in DENSITIES else value).clone().requires_grad_(True)
            for name, value in params.items()
        }
        x, y = batch(step)
        hidden = torch.tanh(x @ leaves["0.weight"].T + leaves["0.bias"])
        loss = F.mse_loss(hidden @ leaves["2.weight"].T + leaves["2.bias"], y)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        for name, grad in grads.items():
            if name in DENSITIES:
                a, b = sets[name]
                c = torch.where(a, 1.0, torch.where(b, 1.0 / DENSITIES[name][0], 0.0)).to(grad.dtype)
                params[name] = torch.where(b, params[name] - lr * (grad + strength * c * params[name]), params[name])
            else:
                params[name] = params[name] - lr * grad
        if (step + 1) % update_interval == 0:
            sets = {name: naive_sets(params[name], *DENSITIES[name]) for name in DENSITIES}
        record = dict(params)
        for name, (a, b) in sets.items():
            record[f"{name}/A"], record[f"{name}/B"] = a, b
        history.append(record)
    return history


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("update_interval", [1, 3])
@pytest.mark.parametrize("strength", [0.0, 0.05])
def test_engine_with_sgd_matches_the_naive_reference(update_interval: int, strength: float, compiled: bool) -> None:
    """Both kernel paths (the compiled C loops, used on CPU, and torch operations, used on GPU) follow the method."""
    steps, lr = 10, 0.5
    reference = reference_run(steps, update_interval, lr, strength)
    model, engine, _ = setup(update_interval=update_interval, penalty=strength, compiled=compiled)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine.attach([opt])
    refreshes_that_moved = 0
    for step in range(steps):
        before = {name: t.forward_set.clone() for name, t in engine.tensors.items()}
        train_step(model, engine, opt, step)
        expected = reference[step]
        for name, t in engine.tensors.items():
            assert torch.equal(t.forward_set, expected[f"{name}/A"]), (step, name)
            assert torch.equal(t.backward_set, expected[f"{name}/B"]), (step, name)
            torch.testing.assert_close(t.theta, expected[name], rtol=1e-12, atol=1e-14)
            refreshes_that_moved += int(not torch.equal(before[name], t.forward_set))
        for name in ("0.bias", "2.bias"):
            torch.testing.assert_close(
                dict(model.named_parameters())[name].detach(), expected[name], rtol=1e-12, atol=0
            )
        assert_alpha(engine)
    assert engine.steps == [steps]
    assert engine.refreshes == steps // update_interval  # the initial selection is not a refresh
    assert refreshes_that_moved > 0  # the comparison covers weights moving between the sets


# --- invariants of every step -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("update_interval", [1, 3, 1000])
def test_every_step_keeps_alpha_and_freezes_weights_outside_b(
    optimizer: str, update_interval: int, compiled: bool
) -> None:
    model, engine, opt = setup(optimizer, update_interval, penalty=0.01, compiled=compiled)
    assert_alpha(engine)
    initial = {name: t.theta.clone() for name, t in engine.tensors.items()}
    for step in range(7):
        theta = {name: t.theta.clone() for name, t in engine.tensors.items()}
        backward = {name: t.backward_set.clone() for name, t in engine.tensors.items()}
        train_step(model, engine, opt, step)
        assert_alpha(engine)
        for name, t in engine.tensors.items():
            outside = ~backward[name]
            # the B of this step: nothing outside it moved, not by weight decay, momentum or Adam
            assert torch.equal(t.theta[outside], theta[name][outside]), (step, name)
            assert not torch.equal(t.theta[backward[name]], theta[name][backward[name]]), (step, name)
    if update_interval == 1000:  # never refreshed: outside the initial B, θ is the initial θ
        for name, t in engine.tensors.items():
            assert torch.equal(t.theta[~t.backward_set], initial[name][~t.backward_set])


@pytest.mark.parametrize(
    ("optimizer", "keys"),
    [("sgd-momentum-wd", {"momentum_buffer"}), ("adamw", {"exp_avg", "exp_avg_sq"}), ("adagrad", {"sum"})],
)
@pytest.mark.parametrize("update_interval", [1, 2])
def test_optimizer_state_is_zero_outside_b(optimizer: str, keys: set[str], update_interval: int) -> None:
    model, engine, opt = setup(optimizer, update_interval, penalty=0.01)
    for step in range(6):
        train_step(model, engine, opt, step)
        for name, t in engine.tensors.items():
            state = opt.state[t.param]
            assert keys <= set(state), name
            for key in keys:
                assert torch.equal(state[key][~t.backward_set], torch.zeros(int((~t.backward_set).sum()))), (name, key)
                assert bool(state[key][t.backward_set].ne(0).any()), (name, key)
        # parameters outside Top-KAST keep their full state
        assert bool(opt.state[model[2].bias][next(iter(keys))].ne(0).all())


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_non_finite_gradients_outside_b_never_reach_weights_or_state(optimizer: str, compiled: bool) -> None:
    clean_model, clean, clean_opt = setup(optimizer, update_interval=2, penalty=0.01, compiled=compiled)
    model, engine, opt = setup(optimizer, update_interval=2, penalty=0.01, compiled=compiled)
    for step in range(5):
        for m, e, o, poison in ((clean_model, clean, clean_opt, False), (model, engine, opt, True)):
            x, y = batch(step)
            F.mse_loss(m(x), y).backward()
            if poison:
                for t in e.tensors.values():
                    bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=t.param.dtype).repeat(t.numel)
                    t.param.grad[~t.backward_set] = bad[: int((~t.backward_set).sum())]
            e.before_step(o)
            o.step()
            o.zero_grad()
        for name, t in engine.tensors.items():
            assert bool(torch.isfinite(t.theta).all())
            assert bool(torch.isfinite(t.param).all())
            for value in opt.state[t.param].values():
                assert bool(torch.isfinite(value).all())
            # the poisoned run is the clean run, bit for bit
            assert torch.equal(t.theta, clean.tensors[name].theta)
            assert torch.equal(t.forward_set, clean.tensors[name].forward_set)
            for key, value in opt.state[t.param].items():
                assert torch.equal(value, clean_opt.state[clean.tensors[name].param][key])


# --- skipped steps and misuse -----------------------------------------------------------------------------------------


def test_skipped_step_restores_alpha() -> None:
    model, engine, opt = setup("sgd-momentum-wd", update_interval=1, penalty=0.01)
    train_step(model, engine, opt, 0)
    theta = {name: t.theta.clone() for name, t in engine.tensors.items()}
    alpha = {name: t.param.detach().clone() for name, t in engine.tensors.items()}
    x, y = batch(1)
    F.mse_loss(model(x), y).backward()
    engine.before_step(opt)
    # the update would see θ on B \ A: the parameter no longer holds α
    assert any(not torch.equal(t.param, alpha[name]) for name, t in engine.tensors.items())
    # ... the step is skipped (GradScaler found an inf, or the module chose to) ...
    assert engine.restore_forward_weights() == 2
    for name, t in engine.tensors.items():
        assert torch.equal(t.param.detach(), alpha[name])
        assert torch.equal(t.theta, theta[name])
    assert_alpha(engine)
    assert engine.skipped_steps == 1
    assert engine.steps == [1]
    assert engine.restore_forward_weights() == 0  # nothing pending any more
    assert engine.skipped_steps == 1
    opt.zero_grad()
    train_step(model, engine, opt, 1)
    assert engine.steps == [2]
    assert_alpha(engine)


def test_skipped_step_is_restored_by_the_next_before_step() -> None:
    model, engine, opt = setup(update_interval=1)
    x, y = batch(0)
    F.mse_loss(model(x), y).backward()
    engine.before_step(opt)
    opt.zero_grad()
    train_step(model, engine, opt, 1)
    assert engine.skipped_steps == 1
    assert engine.steps == [1]
    assert_alpha(engine)


def test_optimizer_step_without_before_step_raises() -> None:
    model, _, opt = setup()
    x, y = batch(0)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"optimizer\.step\(\) ran without TopKAST\.before_step\(optimizer\)"):
        opt.step()


def test_before_step_with_an_unattached_optimizer_raises() -> None:
    model, engine, _ = setup()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"not attached; call attach\(\) first"):
        engine.before_step(other)


def test_detach_removes_the_hooks() -> None:
    model, engine, opt = setup()
    train_step(model, engine, opt, 0)
    engine.detach()
    assert not engine.attached
    x, y = batch(1)
    F.mse_loss(model(x), y).backward()
    opt.step()  # a plain optimizer again: no error, no masking
    assert engine.steps == [1]


# --- the exploration penalty ------------------------------------------------------------------------------------------


def zero_loss_step(model: nn.Module, engine: TopKAST, opt: torch.optim.Optimizer) -> None:
    x, _ = batch(0)
    (0 * model(x).sum()).backward()
    engine.before_step(opt)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("decoupled", [False, True])
def test_penalty_shrinks_b_by_lr_lambda_c_theta(decoupled: bool) -> None:
    lr, strength = 0.5, 0.1
    runs = {}
    for penalty in (0.0, strength):
        model = make_model()
        engine = TopKAST(
            masked_params(model), DENSITIES, update_interval=1000, penalty=penalty, decoupled_penalty=decoupled
        )
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        engine.attach([opt])
        initial = {name: t.theta.clone() for name, t in engine.tensors.items()}
        zero_loss_step(model, engine, opt)
        runs[penalty] = engine
    for name, t in runs[strength].tensors.items():
        a, b, d = t.forward_set, t.backward_set, t.forward_density
        c = torch.where(a, 1.0, torch.where(b, 1.0 / d, 0.0)).to(torch.float64)
        expected = initial[name] - lr * (strength * c * initial[name])
        assert torch.equal(runs[0.0].tensors[name].theta, initial[name])  # no penalty, no gradient: nothing moves
        assert torch.equal(t.theta, expected), name
        assert torch.equal(t.theta[~b], initial[name][~b])
        shrink = 1 - t.theta[b] / initial[name][b]
        assert torch.allclose(shrink, lr * strength * c[b], rtol=1e-12, atol=0)
    assert_alpha(runs[strength])


def test_decoupled_penalty_stays_outside_momentum() -> None:
    buffers = {}
    for decoupled in (False, True):
        model = make_model()
        engine = TopKAST(
            masked_params(model), DENSITIES, update_interval=1000, penalty=0.1, decoupled_penalty=decoupled
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        engine.attach([opt])
        theta = {name: t.theta.clone() for name, t in engine.tensors.items()}
        for _ in range(3):
            zero_loss_step(model, engine, opt)
        buffers[decoupled] = [opt.state[t.param]["momentum_buffer"] for t in engine.tensors.values()]
        for name, t in engine.tensors.items():
            assert bool((t.theta[t.backward_set].abs() < theta[name][t.backward_set].abs()).all())
    assert all(bool(buf.ne(0).any()) for buf in buffers[False])
    assert all(torch.equal(buf, torch.zeros_like(buf)) for buf in buffers[True])


def test_decoupled_penalty_uses_each_group_learning_rate() -> None:
    model = make_model()
    engine = TopKAST(masked_params(model), DENSITIES, update_interval=1000, penalty=0.1, decoupled_penalty=True)
    opt = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.5}, {"params": [model[2].weight], "lr": 0.25}])
    engine.attach([opt])
    initial = {name: t.theta.clone() for name, t in engine.tensors.items()}
    zero_loss_step(model, engine, opt)
    for name, lr in (("0.weight", 0.5), ("2.weight", 0.25)):
        t = engine.tensors[name]
        c = torch.where(t.forward_set, 1.0, torch.where(t.backward_set, 1.0 / t.forward_density, 0.0)).double()
        assert torch.equal(t.theta, initial[name] - lr * (0.1 * c * initial[name]))


# --- checkpointing ----------------------------------------------------------------------------------------------------


def trained_engine(steps: int = 4) -> tuple[nn.Sequential, TopKAST, torch.optim.Optimizer]:
    model, engine, opt = setup(update_interval=3, penalty=0.01)
    for step in range(steps):
        train_step(model, engine, opt, step)
    return model, engine, opt


def assert_same_engine_state(left: TopKAST, right: TopKAST) -> None:
    assert left.steps == right.steps
    assert left.refreshes == right.refreshes
    assert left.skipped_steps == right.skipped_steps
    for name, t in left.tensors.items():
        other = right.tensors[name]
        for key in ("theta", "forward_set", "backward_set", "ever_active"):
            assert torch.equal(getattr(t, key), getattr(other, key)), (name, key)
        assert torch.equal(t.param, other.param), name


def test_state_dict_is_plain_and_loads_with_weights_only() -> None:
    _, engine, _ = trained_engine()
    state = engine.state_dict()
    assert state["version"] == STATE_VERSION
    assert state["steps"] == [4]
    assert state["refreshes"] == 1  # at step 3; the initial selection is not counted
    assert state["tensors"]["0.weight"]["shape"] == [6, 4]
    assert state["tensors"]["2.weight"]["forward_density"] == 0.5
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["steps"] == [4]
    assert torch.equal(loaded["tensors"]["0.weight"]["theta"], engine.tensors["0.weight"].theta)


def test_state_dict_round_trip_onto_a_fresh_engine_continues_exactly() -> None:
    model, engine, opt = trained_engine()
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    buffer.seek(0)
    fresh_model = make_model(seed=123)
    fresh_model.load_state_dict(model.state_dict())  # the model's own state is α: the sparse model
    fresh = TopKAST(masked_params(fresh_model), DENSITIES, update_interval=3, penalty=0.01)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.1)
    fresh.attach([fresh_opt])
    assert_same_engine_state(engine, fresh)
    assert_alpha(fresh)
    for step in range(4, 9):  # straddles the refresh at step 6
        train_step(model, engine, opt, step)
        train_step(fresh_model, fresh, fresh_opt, step)
        assert_same_engine_state(engine, fresh)


def test_loading_a_state_dict_does_not_share_tensors_with_its_source() -> None:
    _, source, _ = trained_engine()
    tensors = source.state_dict()["tensors"]
    saved = {name: {k: v.clone() for k, v in t.items() if isinstance(v, Tensor)} for name, t in tensors.items()}
    model = make_model(seed=5)
    loaded = TopKAST(masked_params(model), DENSITIES, update_interval=1, penalty=0.01)
    loaded.load_state_dict(source.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loaded.attach([opt])
    for step in range(6):
        train_step(model, loaded, opt, step)
    for name, t in source.tensors.items():
        for key, value in saved[name].items():
            assert torch.equal(getattr(t, key), value), (name, key)


def test_differences_is_empty_for_a_fitting_state() -> None:
    _, engine, _ = trained_engine(1)
    model = make_model(seed=1)
    other = TopKAST(masked_params(model), DENSITIES)
    assert other.differences(engine.state_dict()) == []


def test_differences_report_names_shapes_and_densities() -> None:
    _, engine, _ = trained_engine(1)
    state = engine.state_dict()
    model = make_model(seed=1, hidden=7)
    model.add_module("3", nn.Linear(3, 2).double())
    other = TopKAST(masked_params(model, ["0.weight", "3.weight"]), {"0.weight": (0.3, 0.5), "3.weight": (0.5, 0.5)})
    expected = [
        "0.weight: forward_density 0.25 in the checkpoint, 0.3 now",
        "0.weight: shape [6, 4] in the checkpoint, [7, 4] now",
        "2.weight: in the checkpoint, not masked now",
        "3.weight: masked now, not in the checkpoint",
    ]
    assert other.differences(state) == expected
    with pytest.raises(ValueError, match=r"does not fit the masked tensors: 0\.weight: forward_density 0\.25"):
        other.load_state_dict(state)


def test_differences_report_backward_density_global_pool_and_version() -> None:
    _, engine, _ = trained_engine(1)
    state = engine.state_dict()
    model = make_model(seed=1)
    other = TopKAST(masked_params(model), {"0.weight": (0.25, 0.75), "2.weight": (0.5, 0.75)}, global_pool=["2.weight"])
    assert other.differences(state) == [
        "0.weight: backward_density 0.5 in the checkpoint, 0.75 now",
        "2.weight: in_global_pool False in the checkpoint, True now",
    ]
    assert other.differences({**state, "version": 99}) == [f"state version 99, expected {STATE_VERSION}"]


# --- global pool, several optimizers, listeners -----------------------------------------------------------------------


def test_global_pool_selects_the_exact_global_count() -> None:
    model = make_model()
    shared = {"0.weight": (0.3, 0.6), "2.weight": (0.3, 0.6)}
    engine = TopKAST(masked_params(model), shared, update_interval=1, penalty=0.01, global_pool=list(shared))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine.attach([opt])
    total = 24 + 18
    for step in range(4):
        tensors = list(engine.tensors.values())
        assert sum(int(t.forward_set.sum()) for t in tensors) == count(0.3, total) == 13
        assert sum(int(t.backward_set.sum()) for t in tensors) == count(0.6, total) == 25
        expected = global_forward_backward_sets([t.theta for t in tensors], 0.3, 0.6)
        for t, (a, b) in zip(tensors, expected, strict=True):
            assert torch.equal(t.forward_set, a)
            assert torch.equal(t.backward_set, b)
            assert torch.equal(t.param.detach(), torch.where(a, t.theta, 0))
        train_step(model, engine, opt, step)
    # per-tensor selection would keep 7 + 5 = 12, not 13: the split is the pool's
    assert count(0.3, 24) + count(0.3, 18) == 12


def test_global_pool_needs_one_forward_density() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="global pool must share one forward density"):
        TopKAST(masked_params(model), DENSITIES, global_pool=list(DENSITIES))


def test_global_pool_across_two_optimizers_keeps_alpha_in_both() -> None:
    model = make_model()
    shared = {"0.weight": (0.3, 0.6), "2.weight": (0.3, 0.6)}
    engine = TopKAST(masked_params(model), shared, update_interval=1, penalty=0.0, global_pool=list(shared))
    first = torch.optim.SGD(model[0].parameters(), lr=2.0)
    second = torch.optim.SGD(model[2].parameters(), lr=2.0)
    engine.attach([first, second])
    for step in range(4):
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        for opt in (first, second):
            engine.before_step(opt)
            opt.step()
            # between any two steps every masked parameter holds α, including those of the other optimizer
            for name, t in engine.tensors.items():
                assert torch.equal(t.param.detach(), torch.where(t.forward_set, t.theta, 0)), (step, name)
        first.zero_grad()
        second.zero_grad()
    assert engine.steps == [4, 4]


def test_two_optimizers_step_and_count_separately() -> None:
    model = make_model()
    engine = TopKAST(masked_params(model), DENSITIES, update_interval=2, penalty=0.01)
    first = torch.optim.SGD(model[0].parameters(), lr=0.5)
    second = torch.optim.AdamW(model[2].parameters(), lr=0.05)
    engine.attach([first, second])
    untouched = engine.tensors["2.weight"].theta.clone()
    for step in range(3):
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        engine.before_step(first)
        first.step()
        model.zero_grad()
    assert engine.steps == [3, 0]
    assert torch.equal(engine.tensors["2.weight"].theta, untouched)
    x, y = batch(3)
    F.mse_loss(model(x), y).backward()
    engine.before_step(second)
    second.step()
    assert engine.steps == [3, 1]
    assert_alpha(engine)


def test_refresh_listeners_get_the_turnover_of_every_tensor() -> None:
    model, engine, opt = setup(update_interval=2, penalty=0.01)
    calls: list[dict[str, tuple[int, int]]] = []
    engine.refresh_listeners.append(calls.append)
    for step in range(5):
        train_step(model, engine, opt, step)
    assert len(calls) == 2
    for moved in calls:
        assert set(moved) == set(DENSITIES)
        for name, (left, size) in moved.items():
            assert size == count(DENSITIES[name][0], engine.tensors[name].numel)
            assert 0 <= left <= size
    for t in engine.tensors.values():
        assert not bool((t.forward_set & ~t.ever_active).any())


def test_unused_parameter_is_left_alone() -> None:
    model = make_model()
    engine = TopKAST(masked_params(model), DENSITIES, update_interval=1, penalty=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine.attach([opt])
    theta = engine.tensors["2.weight"].theta.clone()
    x, _ = batch(0)
    torch.tanh(model[0](x)).sum().backward()  # 2.weight gets no gradient
    engine.before_step(opt)
    opt.step()
    assert engine.tensors["2.weight"].param.grad is None
    assert torch.equal(engine.tensors["2.weight"].theta, theta)
    assert_alpha(engine)


def test_two_optimizers_prepared_together_then_stepped() -> None:
    # DESIGN.md: with several optimizers, each one's preparation touches only the parameters that optimizer owns
    runs = []
    for interleaved in (False, True):
        model = make_model()
        engine = TopKAST(masked_params(model), DENSITIES, update_interval=2, penalty=0.01)
        first = torch.optim.SGD(model[0].parameters(), lr=0.5)
        second = torch.optim.SGD(model[2].parameters(), lr=0.5)
        engine.attach([first, second])
        for step in range(3):
            x, y = batch(step)
            F.mse_loss(model(x), y).backward()
            if interleaved:
                engine.before_step(first)
                engine.before_step(second)
                first.step()
                second.step()
            else:
                for opt in (first, second):
                    engine.before_step(opt)
                    opt.step()
            model.zero_grad()
        assert engine.steps == [3, 3]
        assert engine.skipped_steps == 0
        assert_alpha(engine)
        runs.append(engine)
    for name, t in runs[0].tensors.items():
        assert torch.equal(t.theta, runs[1].tensors[name].theta), name


def test_compiled_kernels_default_to_cpu_fp32_and_fp64_tensors() -> None:
    _, engine, _ = setup()
    assert all(isinstance(t.kernels, kernels.CKernels) for t in engine.tensors.values())
    _, engine, _ = setup(compiled=False)
    assert all(isinstance(t.kernels, kernels.TorchKernels) for t in engine.tensors.values())


# --- refresh schedule: the longest gap, and early refreshes -----------------------------------------------------------


def _explorer_step(engine: TopKAST, opt: torch.optim.Optimizer, name: str, grow: int) -> None:
    """One step whose gradient pushes ``grow`` members of B \\ A past the largest weight of A, and nothing else."""
    t = engine.tensors[name]
    exploring = (t.backward_set & ~t.forward_set).flatten().nonzero().flatten()[:grow]
    target = t.theta.abs().max() * 2
    for p in engine._optimizers[0].param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    grad = t.param.grad.view(-1)
    grad[exploring] = (t.theta.view(-1)[exploring] - target * t.theta.view(-1)[exploring].sign()) / 0.5  # lr 0.5
    engine.before_step(opt)
    opt.step()


def test_update_interval_is_the_longest_gap_and_early_refresh_fires_on_explorers() -> None:
    model = make_model(hidden=40)
    names = {"0.weight": (0.25, 0.75)}
    engine = TopKAST(masked_params(model, names), names, update_interval=10, penalty=0.0, early_refresh=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine.attach([opt])
    k = engine.units[0].forward_k  # 40 of 160: 5% is 2 explorers
    assert k == 40
    _explorer_step(engine, opt, "0.weight", grow=1)  # one explorer above A: below 5% of |A|
    assert (engine.refreshes, engine.early_refreshes) == (0, 0)
    _explorer_step(engine, opt, "0.weight", grow=2)  # two: a refresh now, five steps before the interval
    assert (engine.refreshes, engine.early_refreshes) == (1, 1)
    assert engine.units[0].since_refresh == 0
    for _ in range(9):
        _explorer_step(engine, opt, "0.weight", grow=0)
    assert (engine.refreshes, engine.early_refreshes) == (1, 1)
    _explorer_step(engine, opt, "0.weight", grow=0)  # ten steps after the last refresh: the interval is up
    assert (engine.refreshes, engine.early_refreshes) == (2, 1)
    assert_alpha(engine)


def test_without_early_refresh_the_interval_alone_decides() -> None:
    model = make_model(hidden=40)
    names = {"0.weight": (0.25, 0.75)}
    engine = TopKAST(masked_params(model, names), names, update_interval=3, penalty=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine.attach([opt])
    for step in range(1, 10):
        _explorer_step(engine, opt, "0.weight", grow=20)
        assert engine.refreshes == step // 3
    assert engine.early_refreshes == 0


# --- no host sync: the GPU path, run on CPU ---------------------------------------------------------------------------

# ops that read a device value back to the host (a GPU stall) or whose output size depends on the data
_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "is_nonzero", "equal")


class _CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in _SYNCING_OPS):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def _train_watching(
    model: nn.Module,
    engine: TopKAST,
    opt: torch.optim.Optimizer,
    steps: int,
    watch: Callable[[], contextlib.AbstractContextManager[object]],
) -> None:
    """``steps`` training steps, with the engine's own code (not the optimizer's) inside ``watch()``."""
    after_step = engine._after_step

    def watched_after_step(index: int) -> None:
        with watch():  # the optimizer's own reads (AdamW's step count) are not the engine's
            after_step(index)

    engine._after_step = watched_after_step  # type: ignore[method-assign]
    device = next(model.parameters()).device
    for step in range(steps):
        x, y = (t.to(device) for t in batch(step))
        F.mse_loss(model(x), y).backward()
        with watch():
            engine.before_step(opt)
        opt.step()
        opt.zero_grad()


def _train_counting_syncs(model: nn.Module, engine: TopKAST, opt: torch.optim.Optimizer, steps: int) -> _CountSyncs:
    """``steps`` training steps, counting the syncing operations the engine's own code calls."""
    counter = _CountSyncs()
    _train_watching(model, engine, opt, steps, lambda: counter)
    return counter


@contextlib.contextmanager
def _cuda_syncs_raise() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _assert_same_as_host_path(
    host: TopKAST, device: TopKAST, update_interval: int, early_refresh: float | None, steps: int = 8
) -> None:
    if early_refresh is None:  # the same schedule: the same θ and sets, bit for bit
        assert device.refreshes == host.refreshes == steps // update_interval
        for name, t in host.tensors.items():
            assert torch.equal(t.theta, device.tensors[name].theta), name
            assert torch.equal(t.code, device.tensors[name].code), name
    assert_alpha(device)


@pytest.mark.parametrize("early_refresh", [None, 0.05])
@pytest.mark.parametrize("update_interval", [1, 3])
def test_sync_free_steps_read_nothing_back_and_select_the_same_sets(
    update_interval: int, early_refresh: float | None
) -> None:
    """What a CUDA run does, on CPU: no step reads a tensor value on the host; the sets are the host path's."""
    runs = {}
    for sync_free in (False, True):
        model, engine, opt = setup(
            "adamw", update_interval, penalty=0.01, compiled=False, sync_free=sync_free, early_refresh=early_refresh
        )
        counter = _train_counting_syncs(model, engine, opt, steps=8)
        runs[sync_free] = engine
        if sync_free:
            assert counter.syncs == []
        else:
            assert counter.syncs  # the host path reads counts back: the counter sees them
    host, device = runs[False], runs[True]
    assert host.sync_free is False
    assert device.sync_free is True
    _assert_same_as_host_path(host, device, update_interval, early_refresh)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("early_refresh", [None, 0.05])
@pytest.mark.parametrize("update_interval", [1, 3])
def test_on_a_gpu_no_step_waits_for_the_device(update_interval: int, early_refresh: float | None) -> None:
    """The test above on a real device, with CUDA's own check: it raises on any call of the engine's that would
    wait for the GPU. The sets are those of the host path (``sync_free=False``) on the same device."""
    runs = {}
    for sync_free in (False, True):
        model, engine, opt = setup(
            "adamw", update_interval, penalty=0.01, device="cuda", sync_free=sync_free, early_refresh=early_refresh
        )
        _train_watching(model, engine, opt, 8, _cuda_syncs_raise if sync_free else contextlib.nullcontext)
        runs[sync_free] = engine
    host, device = runs[False], runs[True]
    assert device.sync_free is True
    assert all(isinstance(t.kernels, kernels.TorchKernels) for t in device.tensors.values())
    assert device.refreshes >= 8 // update_interval  # update_interval is the longest gap
    _assert_same_as_host_path(host, device, update_interval, early_refresh)


def test_sync_free_early_refresh_acts_one_step_after_its_test() -> None:
    model = make_model(hidden=40)
    names = {"0.weight": (0.25, 0.75)}
    engine = TopKAST(
        masked_params(model, names), names, update_interval=10, penalty=0.0, early_refresh=0.05, sync_free=True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine.attach([opt])
    _explorer_step(engine, opt, "0.weight", grow=2)  # the test passes here ...
    assert engine.refreshes == 0
    _explorer_step(engine, opt, "0.weight", grow=0)  # ... and the refresh runs at the next step
    assert (engine.refreshes, engine.early_refreshes) == (1, 1)
    assert_alpha(engine)


@pytest.mark.parametrize("update_interval", [1, 100])
def test_compiled_kernels_read_nothing_back_through_torch(update_interval: int) -> None:
    """On CPU the counts come back through ctypes: no step calls ``.item()``, ``bool(t)`` or a data-sized op."""
    model, engine, opt = setup("sgd-momentum-wd", update_interval, penalty=0.01, compiled=True, early_refresh=0.01)
    counter = _train_counting_syncs(model, engine, opt, steps=12)
    assert engine.refreshes > 0
    assert counter.syncs == []


def test_a_refresh_that_changes_no_set_still_zeroes_state_outside_b() -> None:
    """Nothing moves (lr 0), so every refresh finds the sets where they were; Adagrad's state starts at 0.1
    everywhere and must still be zeroed outside B after the first step."""
    model = make_model()
    engine = TopKAST(masked_params(model), DENSITIES, update_interval=1, penalty=0.0)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.0, initial_accumulator_value=0.1)
    engine.attach([opt])
    train_step(model, engine, opt, 0)
    assert engine.refreshes == 1
    for t in engine.tensors.values():
        state = opt.state[t.param]["sum"]
        assert not bool(state[~t.backward_set].any())
        assert bool((state[t.backward_set] >= 0.1).all())


@pytest.mark.parametrize("case", ["normal", "few_values", "strided_outliers"])
def test_first_selection_of_a_large_tensor_is_one_pick_and_exact(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the band-select size the first selection picks both thresholds in a window a strided sample brackets
    (no copy of θ); a sample that misses (every stride-th entry an outlier) falls back to the full selection."""
    n = 300 * 301
    g = torch.Generator().manual_seed(0)
    values = {
        "normal": torch.randn(n, generator=g),
        "few_values": torch.randint(0, 7, (n,), generator=g).float(),
        "strided_outliers": torch.where(torch.arange(n) % (n // 4096) == 0, 1e6, torch.rand(n, generator=g)),
    }[case]
    full = []
    threshold = selection.threshold
    monkeypatch.setattr(selection, "threshold", lambda *a: full.append(1) or threshold(*a))
    param = nn.Parameter(values.view(300, 301).clone())
    engine = TopKAST({"w": param}, {"w": (0.2, 0.5)})
    assert len(full) == (2 if case == "strided_outliers" else 0)
    a, b = forward_backward_sets(values.view(300, 301), 0.2, 0.5)
    assert torch.equal(engine.tensors["w"].forward_set, a)
    assert torch.equal(engine.tensors["w"].backward_set, b)
