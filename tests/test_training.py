"""Real ``Trainer.fit`` runs: the step invariants of Top-KAST, hook by hook, under every training setup we support."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import ACCELERATORS, GAN, MLP, assert_alpha, engine_of, fit, half_up, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import TopKASTCallback, kernels, validation
from lightning_topkast.state import TopKAST

MASKED = ["net.2.weight", "net.4.weight"]  # the MLP's first Linear stays dense (dense_first_layer=True)
BATCHES = 8  # make_loader(n=64, batch_size=8)

Snapshot = dict[str, dict[str, Tensor]]


def _loader() -> DataLoader:
    return make_loader(n=64, batch_size=8)


def _snapshot(engine: TopKAST) -> Snapshot:
    return {
        name: {
            "param": t.param.detach().clone(),
            "theta": t.theta.clone(),
            "A": t.forward_set.clone(),
            "B": t.backward_set.clone(),
            "ever": t.ever_active.clone(),
            "grad": t.param.grad.clone() if t.param.grad is not None else torch.full_like(t.theta, float("nan")),
        }
        for name, t in engine.tensors.items()
    }


def _grads(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


class Recorder(Callback):
    """Listed after TopKASTCallback, so each of its hooks sees the state TopKAST's hook of the same name left."""

    def __init__(self, topkast: TopKASTCallback) -> None:
        self.topkast = topkast
        self.start: Snapshot = {}
        self.end: Snapshot = {}
        self.before: list[Snapshot] = []  # at on_before_optimizer_step, after TopKAST masked the gradients
        self.after: list[Snapshot] = []  # at on_train_batch_end, after TopKAST restored the forward weights
        self.steps: list[list[int]] = []
        self.refreshes: list[int] = []  # refreshes since fit start, so the masks chosen at setup do not count
        self.start_refreshes = 0
        self.skipped: list[int] = []
        self.optimizer_state: list[dict[str, dict[str, Tensor]]] = []
        self.refresh_log: list[tuple[list[str], list[int]]] = []
        self.sync_free: bool | None = None  # as the fit ran: the engine follows the module to the CPU at its end

    def _listen(self, moved: dict[str, tuple[int, int]]) -> None:
        self.refresh_log.append((sorted(moved), list(engine_of(self.topkast).steps)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = engine_of(self.topkast)
        if self._listen not in engine.refresh_listeners:
            engine.refresh_listeners.append(self._listen)
        self.start = _snapshot(engine)
        self.start_refreshes = engine.refreshes
        self.sync_free = engine.sync_free

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.before.append(_snapshot(engine_of(self.topkast)))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = engine_of(self.topkast)
        self.after.append(_snapshot(engine))
        self.steps.append(list(engine.steps))
        self.refreshes.append(engine.refreshes - self.start_refreshes)
        self.skipped.append(engine.skipped_steps)
        states = {}
        for name, t in engine.tensors.items():
            for optimizer in trainer.optimizers:
                if t.param in optimizer.state:
                    states[name] = {k: v.clone() for k, v in optimizer.state[t.param].items() if k != "step"}
        self.optimizer_state.append(states)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = _snapshot(engine_of(self.topkast))


class Spy(MLP):
    """The conftest MLP, recording gradients right after backward and exactly when Lightning clips them.

    ``optimizer="plain"`` is SGD without momentum or weight decay, so one update is exactly ``-lr * grad``.
    """

    def __init__(
        self, optimizer: str = "sgd", lr: float = 0.1, zero_loss: bool = False, loss_scale: float = 1.0
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr)
        self.zero_loss, self.loss_scale = zero_loss, loss_scale
        self.after_backward: list[dict[str, Tensor]] = []
        self.at_clipping: list[dict[str, Tensor]] = []
        self.after_clipping: list[dict[str, Tensor]] = []
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x)
        # float(): an fp16 loss times a GradScaler's 65536 is inf, and 0 * inf would make every gradient NaN
        loss = 0 * out.float().sum() if self.zero_loss else self.loss_scale * F.cross_entropy(out, y)
        self.losses.append(float(loss.detach()))
        return loss

    def on_after_backward(self) -> None:
        self.after_backward.append(_grads(self))

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        self.at_clipping.append(_grads(self))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.after_clipping.append(_grads(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "plain":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return super().configure_optimizers()


def _fit_recorded(
    tmp_path: Path, model: L.LightningModule, callback: TopKASTCallback, loader: DataLoader | None = None, **kwargs: Any
) -> tuple[Recorder, L.Trainer]:
    """:func:`conftest.fit` with a :class:`Recorder` listed after ``callback``."""
    recorder = Recorder(callback)
    return recorder, fit(tmp_path, model, [callback, recorder], loader if loader is not None else _loader(), **kwargs)


def _assert_top_k(theta: Tensor, mask: Tensor) -> None:
    """``mask`` holds entries of largest |θ|: none outside is larger than any inside."""
    magnitude = theta.abs()
    assert float(magnitude[mask].min()) >= float(magnitude[~mask].max())


def _assert_sets_equal(a: Snapshot, b: Snapshot) -> None:
    for name in a:
        assert torch.equal(a[name]["A"], b[name]["A"]), name
        assert torch.equal(a[name]["B"], b[name]["B"]), name


# --- 1. the invariants after every optimizer step ---------------------------------------------------------------


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adamw-fused"])
@pytest.mark.parametrize("update_interval", [1, 3])
def test_every_step_holds_forward_weights_and_exact_sets(
    tmp_path: Path, update_interval: int, optimizer: str, accelerator: str
) -> None:
    callback = TopKASTCallback(update_interval=update_interval, early_refresh=None, verbose=False)
    recorder, trainer = _fit_recorded(tmp_path, MLP(optimizer=optimizer), callback, accelerator=accelerator)
    engine = engine_of(callback)

    assert sorted(engine.tensors) == MASKED
    assert recorder.sync_free is (accelerator == "gpu")  # on a GPU no step waits for a value read back
    assert trainer.global_step == engine.steps[0] == BATCHES
    assert recorder.steps == [[step] for step in range(1, BATCHES + 1)]
    assert recorder.refreshes == [step // update_interval for step in range(1, BATCHES + 1)]
    assert [names for names, _ in recorder.refresh_log] == [MASKED] * (BATCHES // update_interval)
    assert engine.skipped_steps == 0

    assert_alpha(engine, recorder.start)
    for s in recorder.start.values():
        _assert_top_k(s["theta"], s["A"])
        _assert_top_k(s["theta"], s["B"])
    previous = recorder.start
    forward_set_changes = 0
    for step, snapshot in enumerate(recorder.after, start=1):
        assert_alpha(engine, snapshot)
        if step % update_interval == 0:
            for name, s in snapshot.items():
                _assert_top_k(s["theta"], s["A"])
                _assert_top_k(s["theta"], s["B"])
                forward_set_changes += int((s["A"] != previous[name]["A"]).sum())
        else:
            _assert_sets_equal(snapshot, previous)
        previous = snapshot
    assert forward_set_changes > 0  # the sets really moved, so the checks above saw refreshes that mattered

    assert_alpha(engine, recorder.end)
    for name, s in recorder.end.items():
        assert torch.equal(s["theta"], recorder.after[-1][name]["theta"].cpu()), name
        assert torch.equal(dict(trainer.lightning_module.named_parameters())[name].detach(), s["param"]), name
    for t in engine.tensors.values():  # Lightning's teardown put the module on the CPU, and the engine followed it
        assert t.param.device.type == t.theta.device.type == t.code.device.type == "cpu"
    assert engine.sync_free is False


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize(("optimizer", "early_refresh"), [("sgd", 0.02), ("adamw", 0.2)])
def test_early_refresh_keeps_every_invariant(
    tmp_path: Path, optimizer: str, early_refresh: float, accelerator: str
) -> None:
    """Refreshes at steps θ chooses, per tensor: each holds the top-k right after it, and sets stay put between.
    On a GPU the test of one step decides the refresh at the next (``sync_free``): the same invariants hold."""
    callback = TopKASTCallback(update_interval=BATCHES + 1, early_refresh=early_refresh, verbose=False)
    recorder, _ = _fit_recorded(tmp_path, MLP(optimizer=optimizer), callback, accelerator=accelerator)
    engine = engine_of(callback)
    assert 0 < engine.early_refreshes == engine.refreshes < BATCHES
    refreshed_at = {steps[0]: names for names, steps in recorder.refresh_log}
    assert len(refreshed_at) == engine.refreshes
    previous = recorder.start
    for step, snapshot in enumerate(recorder.after, start=1):
        assert_alpha(engine, snapshot)
        for name, s in snapshot.items():
            if name in refreshed_at.get(step, []):
                _assert_top_k(s["theta"], s["A"])
                _assert_top_k(s["theta"], s["B"])
            else:
                assert torch.equal(s["A"], previous[name]["A"]), (step, name)
                assert torch.equal(s["B"], previous[name]["B"]), (step, name)
        previous = snapshot
    assert any(len(names) < len(MASKED) for names in refreshed_at.values())  # tensors decide one by one


# --- 2. nothing outside B moves ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "state_keys"),
    [("sgd", ["momentum_buffer"]), ("adamw", ["exp_avg", "exp_avg_sq"]), ("adamw-fused", ["exp_avg", "exp_avg_sq"])],
)
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_nothing_outside_backward_set_moves(
    tmp_path: Path, optimizer: str, state_keys: list[str], accelerator: str
) -> None:
    callback = TopKASTCallback(update_interval=3, early_refresh=None, verbose=False)
    model = Spy(optimizer=optimizer)
    recorder, _ = _fit_recorded(tmp_path, model, callback, accelerator=accelerator)
    engine = engine_of(callback)

    assert len(recorder.before) == len(model.at_clipping) == len(recorder.after) == BATCHES
    for step, (before, clipping, after, state) in enumerate(
        zip(recorder.before, model.at_clipping, recorder.after, recorder.optimizer_state, strict=True), start=1
    ):
        for name in MASKED:
            B, new_B = before[name]["B"], after[name]["B"]
            # the gradient the optimizer will use is zero outside B, seen by the callback hook and by clipping
            assert torch.equal(clipping[name], before[name]["grad"]), (step, name)
            assert not clipping[name][~B].any(), (step, name)
            assert clipping[name][B].count_nonzero() > 0, (step, name)
            # θ outside B is untouched by momentum and weight decay; θ on B moved
            assert torch.equal(after[name]["theta"][~B], before[name]["theta"][~B]), (step, name)
            assert (after[name]["theta"][B] != before[name]["theta"][B]).any(), (step, name)
            if step % 3:
                assert torch.equal(new_B, B), (step, name)
            # optimizer state is zero outside the (possibly refreshed) B, and alive inside it
            assert sorted(state[name]) == sorted(state_keys), (step, name)
            for key in state_keys:
                assert not state[name][key][~new_B].any(), (step, name, key)
                assert state[name][key][new_B].count_nonzero() > 0, (step, name, key)
    # dense θ between refreshes: the values outside every B seen never changed from the start
    never_in_b = ~torch.stack([s["B"] for s in [b["net.2.weight"] for b in recorder.before]]).any(0).cpu()
    assert never_in_b.any()
    assert torch.equal(  # on the CPU, where the fit's end left the module and θ
        recorder.end["net.2.weight"]["theta"][never_in_b], recorder.start["net.2.weight"]["theta"].cpu()[never_in_b]
    )
    assert_alpha(engine, recorder.end)


@pytest.mark.parametrize(("optimizer", "hinted"), [("adamw", True), ("adamw-fused", False), ("sgd", False)])
def test_unfused_adamw_on_cpu_gets_a_hint_at_fit_start(tmp_path: Path, optimizer: str, hinted: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit_recorded(tmp_path, MLP(optimizer=optimizer), TopKASTCallback(verbose=False))
    hints = [str(w.message) for w in caught if "fused=True" in str(w.message)]
    expected = "AdamW updates masked CPU tensors without fused=True: its step is several times slower"
    assert [h.startswith(expected) for h in hints] == ([True] if hinted else [])


def test_slow_optimizers_names_unfused_adam_over_masked_cpu_tensors_only() -> None:
    masked, other = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    optimizers = [
        torch.optim.Adam([masked]),
        torch.optim.Adam([masked], fused=True),
        torch.optim.AdamW([other]),
        torch.optim.SGD([masked], lr=0.1),
    ]
    hints = validation.slow_optimizers(optimizers, [masked])
    assert len(hints) == 1
    assert hints[0].startswith("Adam updates masked CPU tensors without fused=True")
    assert hints[0].endswith("Build it with torch.optim.Adam(..., fused=True).")


class LateEdit(Spy):
    """Its ``on_before_optimizer_step`` runs after the callback's and writes into the gradient outside B.

    ``"noise"`` adds Gaussian gradient noise to every entry, as gradient-noise training does; ``"inf"`` writes inf.
    """

    def __init__(self, topkast: TopKASTCallback, edit: str) -> None:
        super().__init__(optimizer="sgd")
        self.topkast, self.edit = topkast, edit

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        t = engine_of(self.topkast).tensors["net.2.weight"]
        assert t.param.grad is not None
        if self.edit == "inf":
            t.param.grad[~t.backward_set] = float("inf")
        else:
            t.param.grad += 0.01 * torch.randn_like(t.param.grad)


@pytest.mark.parametrize("edit", ["noise", "inf"])
def test_gradient_edited_after_the_callback_cannot_leak_outside_backward_set(tmp_path: Path, edit: str) -> None:
    """Whatever the update writes outside B, even from a gradient edited after the callback's hook, is dropped:
    θ keeps its values there, and a weight entering B at a refresh starts with fresh (zero) optimizer state."""
    callback = TopKASTCallback(update_interval=3, early_refresh=None, verbose=False)
    model = LateEdit(callback, edit)
    recorder, _ = _fit_recorded(tmp_path, model, callback, max_steps=6)
    engine = engine_of(callback)

    entered_total = 0
    for step, (before, clipping, after, state) in enumerate(
        zip(recorder.before, model.at_clipping, recorder.after, recorder.optimizer_state, strict=True), start=1
    ):
        B, new_B = before["net.2.weight"]["B"], after["net.2.weight"]["B"]
        assert clipping["net.2.weight"][~B].count_nonzero() == int((~B).sum()), step  # the optimizer saw it
        assert torch.equal(after["net.2.weight"]["theta"][~B], before["net.2.weight"]["theta"][~B]), step
        assert torch.isfinite(after["net.2.weight"]["theta"]).all(), step
        entered = new_B & ~B
        entered_total += int(entered.sum())
        assert not state["net.2.weight"]["momentum_buffer"][entered].any(), step
        assert_alpha(engine, after)
    assert entered_total > 0  # refreshes did bring new weights into B


# --- 3. straight-through updates and the exploration penalty ----------------------------------------------------


def test_exploration_set_gets_straight_through_gradients_and_grows_into_forward_set(tmp_path: Path) -> None:
    lr = 0.5
    callback = TopKASTCallback(update_interval=2, early_refresh=None, exploration_penalty=0.0, verbose=False)
    model = Spy(optimizer="plain", lr=lr)
    recorder, _ = _fit_recorded(tmp_path, model, callback)
    engine = engine_of(callback)

    grown = 0
    for step, (raw, before, after) in enumerate(
        zip(model.after_backward, recorder.before, recorder.after, strict=True), start=1
    ):
        for name in MASKED:
            A, B = before[name]["A"], before[name]["B"]
            explore = B & ~A
            grad = before[name]["grad"]
            # the update uses ∂L/∂α on B, including B \ A where α was 0 in the forward pass
            assert torch.equal(grad, torch.where(B, raw[name], 0)), (step, name)
            assert grad[explore].count_nonzero() > 0, (step, name)
            # B \ A moved by exactly -lr * grad, from its dense value θ (not from α = 0)
            expected = before[name]["theta"] - lr * grad
            torch.testing.assert_close(after[name]["theta"][B], expected[B], rtol=1e-6, atol=1e-8)
            assert torch.equal(after[name]["theta"][explore] != before[name]["theta"][explore], grad[explore] != 0)
            if step % 2 == 0:
                # entries of the exploration set that a refresh moved into A, having changed since the last refresh
                entered = (
                    explore & after[name]["A"] & (after[name]["theta"] != recorder.before[step - 2][name]["theta"])
                )
                grown += int(entered.sum())
    assert grown > 0

    for name in MASKED:
        t = engine.tensors[name]
        seen = recorder.start[name]["A"].clone()
        for s in recorder.after:
            seen |= s[name]["A"]
        assert torch.equal(t.ever_active, seen), name
        assert int(t.ever_active.sum()) > half_up(t.forward_density, t.numel), name


@pytest.mark.parametrize(
    ("decoupled", "precision"), [(False, "32"), (True, "32"), (False, "16-mixed-scaler"), (False, "bf16-mixed")]
)
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_exploration_penalty_step_is_exact(tmp_path: Path, decoupled: bool, precision: str, accelerator: str) -> None:
    """Under a GradScaler too: the penalty's gradient is added after unscaling, so the loss scale does not touch it."""
    lr, strength = 0.5, 0.1
    callback = TopKASTCallback(
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        update_interval=100,
        exploration_penalty=strength,
        decoupled_penalty=decoupled,
        verbose=False,
    )
    model = Spy(optimizer="plain", lr=lr, zero_loss=True)
    device = "cuda" if accelerator == "gpu" else "cpu"
    amp: dict[str, Any] = {
        "32": {},
        "bf16-mixed": {"precision": "bf16-mixed"},
        "16-mixed-scaler": {"plugins": [MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device))]},
    }[precision]
    recorder, _ = _fit_recorded(tmp_path, model, callback, max_steps=1, accelerator=accelerator, **amp)

    assert recorder.steps == [[1]]
    for name in MASKED:
        theta, A, B = (recorder.start[name][k] for k in ("theta", "A", "B"))
        new_theta = recorder.after[0][name]["theta"]
        explore = B & ~A
        D = 0.2
        assert not model.after_backward[0][name].any()  # the data gradient is exactly zero
        torch.testing.assert_close(new_theta[A], theta[A] - lr * strength * theta[A], rtol=1e-6, atol=0)
        torch.testing.assert_close(
            new_theta[explore], theta[explore] - lr * strength / D * theta[explore], rtol=1e-6, atol=0
        )
        assert torch.equal(new_theta[~B], theta[~B])
        if not decoupled:  # through the optimizer: the penalty is the gradient clipping sees
            torch.testing.assert_close(
                model.at_clipping[0][name],
                torch.where(A, 1.0, torch.where(B, 1 / D, 0.0)) * strength * theta,
                rtol=1e-6,
                atol=0,
            )
        else:
            assert not model.at_clipping[0][name].any()


@pytest.mark.parametrize(("optimizer", "expected"), [("sgd", (1e-4, False)), ("adamw-fused", (3e-2, True))])
def test_default_penalty_follows_the_optimizer(tmp_path: Path, optimizer: str, expected: tuple[float, bool]) -> None:
    """Left at None, the penalty is decoupled at 3e-2 under AdamW and stays in the gradient at 1e-4 under SGD, in a
    real fit: the gradient clipping sees is the masked data gradient alone under AdamW, plus λ·c·θ under SGD."""
    callback = TopKASTCallback(update_interval=2, early_refresh=None, verbose=False)
    model = Spy(optimizer=optimizer)
    recorder, _ = _fit_recorded(tmp_path, model, callback)
    engine = engine_of(callback)
    assert (engine.penalty, engine.decoupled_penalty) == expected
    assert (callback.exploration_penalty, callback.decoupled_penalty) == (None, None)  # the arguments as given
    hparams = callback.hyperparameters()
    assert (hparams["exploration_penalty"], hparams["decoupled_penalty"]) == expected
    for step, (before, data, clipping) in enumerate(
        zip(recorder.before, model.after_backward, model.at_clipping, strict=True), start=1
    ):
        for name in MASKED:
            A, B, theta = before[name]["A"], before[name]["B"], before[name]["theta"]
            masked = torch.where(B, data[name], 0)
            c = torch.where(A, 1.0, torch.where(B, 1 / engine.tensors[name].forward_density, 0.0))
            if expected[1]:
                assert torch.equal(clipping[name], masked), (step, name)
            else:
                torch.testing.assert_close(clipping[name], masked + expected[0] * c * theta, rtol=1e-6, atol=1e-9)
        assert_alpha(engine, recorder.after[step - 1])
        for name in MASKED:  # nothing outside B moved, the decoupled shrink included
            B = before[name]["B"]
            assert torch.equal(recorder.after[step - 1][name]["theta"][~B], before[name]["theta"][~B]), (step, name)


# --- 5. training setups ---------------------------------------------------------------------------------------


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    callback = TopKASTCallback(update_interval=2, early_refresh=None, verbose=False)
    recorder, trainer = _fit_recorded(tmp_path, MLP(), callback, accumulate_grad_batches=2)
    engine = engine_of(callback)

    assert trainer.global_step == engine.steps[0] == BATCHES // 2 == len(recorder.before)
    assert recorder.steps == [[0], [1], [1], [2], [2], [3], [3], [4]]
    assert recorder.refreshes[-1] == 2
    assert [steps for _, steps in recorder.refresh_log] == [[2], [4]]
    for snapshot in recorder.after:
        assert_alpha(engine, snapshot)
    for before in recorder.before:
        for name in MASKED:
            assert not before[name]["grad"][~before[name]["B"]].any()


def test_gradient_clipping_sees_and_clips_masked_gradients(tmp_path: Path) -> None:
    lr, clip = 0.1, 0.5
    callback = TopKASTCallback(update_interval=2, early_refresh=None, verbose=False)
    model = Spy(optimizer="plain", lr=lr, loss_scale=10.0)
    recorder, _ = _fit_recorded(tmp_path, model, callback, gradient_clip_val=clip, max_steps=4)
    engine = engine_of(callback)

    assert len(model.at_clipping) == len(model.after_clipping) == 4
    for at, clipped, before, after in zip(
        model.at_clipping, model.after_clipping, recorder.before, recorder.after, strict=True
    ):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in at.values()]))
        clipped_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped.values()]))
        assert float(norm) > clip  # clipping was active
        torch.testing.assert_close(clipped_norm, torch.tensor(clip), rtol=1e-5, atol=0)
        for name in MASKED:
            B = before[name]["B"]
            assert torch.equal(at[name], before[name]["grad"])
            assert not clipped[name][~B].any()
            torch.testing.assert_close(
                after[name]["theta"], torch.where(B, before[name]["theta"] - lr * clipped[name], before[name]["theta"])
            )
        assert_alpha(engine, after)


def test_bf16_mixed_precision(tmp_path: Path) -> None:
    callback = TopKASTCallback(update_interval=2, early_refresh=None, verbose=False)
    model = Spy()
    recorder, trainer = _fit_recorded(tmp_path, model, callback, precision="bf16-mixed", max_steps=4)
    engine = engine_of(callback)

    assert trainer.precision == "bf16-mixed"
    assert engine.steps == [4]
    assert recorder.refreshes[-1] == 2
    assert all(torch.isfinite(torch.tensor(model.losses)))
    for snapshot in [*recorder.after, recorder.end]:
        assert_alpha(engine, snapshot)
        assert all(s["theta"].dtype == torch.float32 for s in snapshot.values())
    for before in recorder.before:
        for name in MASKED:
            assert not before[name]["grad"][~before[name]["B"]].any()


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    callback = TopKASTCallback(update_interval=2, early_refresh=None, dense_first_layer=False, verbose=False)
    loader = DataLoader(TensorDataset(torch.randn(64, 8) + 2.0), batch_size=8)
    # the discriminator steps on every batch, the generator on every other batch
    gan = GAN(
        optimizers=lambda g, d: [torch.optim.Adam(g, lr=1e-2), torch.optim.SGD(d, lr=0.1, momentum=0.9)],
        generator_every=2,
    )
    recorder, trainer = _fit_recorded(tmp_path, gan, callback, loader=loader)
    engine = engine_of(callback)

    G, D = ["generator.0.weight", "generator.2.weight"], ["discriminator.0.weight", "discriminator.2.weight"]
    assert sorted(engine.tensors) == D + G
    assert engine.steps == [4, 8]  # optimizer 0 (generator) stepped on even batches, optimizer 1 on all
    assert trainer.global_step == 12
    assert recorder.refresh_log == [(D, [1, 2]), (G, [2, 3]), (D, [2, 4]), (D, [3, 6]), (G, [4, 7]), (D, [4, 8])]
    assert recorder.refreshes[-1] == 6
    assert engine.skipped_steps == 0
    assert len(recorder.before) == 12
    for snapshot in [*recorder.after, recorder.end]:
        assert_alpha(engine, snapshot)
    for batch, after in enumerate(recorder.after):
        previous = recorder.after[batch - 1] if batch else recorder.start
        for name in G:  # the generator's θ moves only on batches where its optimizer stepped
            if batch % 2:
                assert torch.equal(after[name]["theta"], previous[name]["theta"]), (batch, name)
            else:
                assert not torch.equal(after[name]["theta"], previous[name]["theta"]), (batch, name)
        for name in D:
            assert not torch.equal(after[name]["theta"], previous[name]["theta"]), (batch, name)
            B = previous[name]["B"]
            assert torch.equal(after[name]["theta"][~B], previous[name]["theta"][~B]), (batch, name)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_two_fits_in_a_row_continue_masks_and_counters(tmp_path: Path, accelerator: str) -> None:
    callback = TopKASTCallback(update_interval=2, early_refresh=None, verbose=False)
    model = MLP()
    first, _ = _fit_recorded(tmp_path, model, callback, max_steps=3, accelerator=accelerator)
    engine = engine_of(callback)
    assert engine.steps == [3]

    recorder = Recorder(callback)
    trainer = make_trainer(tmp_path / "second", [callback, recorder], max_steps=4, accelerator=accelerator)
    trainer.fit(model, _loader())

    assert callback.engine is engine
    assert trainer.global_step == 4
    assert engine.steps == [7]
    assert engine.refreshes - first.start_refreshes == 3
    # the refresh at step 4 is the second fit's first step: the count went on from the first fit
    assert [steps for _, steps in first.refresh_log] == [[2], [4], [6]]  # its listener stayed on the engine
    assert [steps for _, steps in recorder.refresh_log] == [[4], [6]]
    for name in MASKED:
        end, start = first.end[name], recorder.start[name]
        for key in ("theta", "A", "B", "ever", "param"):  # from the CPU, where the first fit ended, to the device
            assert start[key].device == trainer.strategy.root_device, (name, key)
            assert torch.equal(start[key].cpu(), end[key]), (name, key)
        # θ outside A is not in the model (which holds α) yet came through: it lives in the callback
        assert start["theta"][~start["A"]].count_nonzero() > 0
        assert not start["param"][~start["A"]].any()
    for snapshot in recorder.after:
        assert_alpha(engine, snapshot)


def test_same_callback_on_a_new_model_starts_afresh(tmp_path: Path) -> None:
    """Reused on another model, the callback builds new masks for it, and its FLOPs metrics describe the new model."""
    callback = TopKASTCallback(update_interval=2, early_refresh=None, verbose=False)
    _fit_recorded(tmp_path, MLP(), callback, max_steps=2)
    first_engine, first_metrics = engine_of(callback), callback.metrics()

    model = MLP()
    _fit_recorded(tmp_path / "second", model, callback, max_steps=2)
    engine = engine_of(callback)
    params = dict(model.named_parameters())
    assert engine is not first_engine
    assert engine.steps == [2]
    assert all(params[name] is t.param for name, t in engine.tensors.items())
    metrics = callback.metrics()
    # same architecture, densities and batch size: the same FLOPs fractions, well below dense
    assert first_metrics["topkast/inference_flops_fraction"] < 1.0
    for key in ("topkast/train_flops_fraction", "topkast/inference_flops_fraction"):
        assert metrics[key] == first_metrics[key], key


# --- 6. skipped steps -------------------------------------------------------------------------------------------


class InfAt(Spy):
    """Puts an inf into one gradient entry on a chosen batch, before unscaling, so a GradScaler skips the step."""

    def __init__(self, batch: int) -> None:
        super().__init__(optimizer="sgd")
        self.inf_batch, self.batch_idx = batch, -1

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        if self.batch_idx == self.inf_batch:
            grad = self.net[2].weight.grad
            assert grad is not None
            grad.view(-1)[0] = float("inf")
        super().on_after_backward()


class SkipAt(Spy):
    """Computes the loss and gradients on a chosen batch but does not step, as a module that skips a step would."""

    def __init__(self, batch: int) -> None:
        super().__init__(optimizer="sgd")
        self.skip_batch = batch

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if batch_idx == self.skip_batch:
            optimizer_closure()
            return
        optimizer.step(closure=optimizer_closure)


def _assert_skipped_batch_left_no_trace(recorder: Recorder, skipped: int) -> None:
    before, at = recorder.after[skipped - 1], recorder.after[skipped]
    assert recorder.steps[skipped] == recorder.steps[skipped - 1]
    assert recorder.refreshes[skipped] == recorder.refreshes[skipped - 1]
    for name in MASKED:
        for key in ("param", "theta", "A", "B"):
            assert torch.equal(at[name][key], before[name][key]), (name, key)


def test_fp16_on_cpu_is_bf16(tmp_path: Path) -> None:
    """Lightning swaps ``precision="16-mixed"`` for bf16 (no GradScaler) on CPU, hence the explicit plugin below."""
    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        trainer = make_trainer(tmp_path, [], precision="16-mixed")
    assert trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_grad_scaler_skipped_step_restores_forward_weights(tmp_path: Path, accelerator: str) -> None:
    skipped = 3
    device = "cuda" if accelerator == "gpu" else "cpu"
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    callback = TopKASTCallback(update_interval=1, verbose=False)
    model = InfAt(batch=skipped)
    plugins = [MixedPrecision("16-mixed", device, scaler=scaler)]
    recorder, trainer = _fit_recorded(tmp_path, model, callback, plugins=plugins, accelerator=accelerator)
    engine = engine_of(callback)

    assert scaler.get_scale() == 512.0  # the scaler skipped exactly one step
    assert engine.skipped_steps == 1
    assert recorder.skipped == [0, 0, 0, 1, 1, 1, 1, 1]
    assert trainer.global_step == BATCHES  # Lightning counts the batch's step slot ...
    assert engine.steps == [BATCHES - 1]  # ... Top-KAST counts the updates that ran
    assert recorder.steps == [[1], [2], [3], [3], [4], [5], [6], [7]]
    assert recorder.refreshes[-1] == BATCHES - 1
    # before the skipped update the parameter held θ on B \ A (with the inf in the gradient), not α
    prepared = recorder.before[skipped]["net.2.weight"]
    explore = prepared["B"] & ~prepared["A"]
    assert torch.equal(prepared["param"], torch.where(prepared["B"], prepared["theta"], 0))
    assert prepared["param"][explore].count_nonzero() > 0
    assert torch.isinf(prepared["grad"]).sum() == 1
    _assert_skipped_batch_left_no_trace(recorder, skipped)
    for snapshot in [*recorder.after, recorder.end]:
        assert_alpha(engine, snapshot)
        assert all(torch.isfinite(s["theta"]).all() for s in snapshot.values())
    assert recorder.after[-1]["net.2.weight"]["theta"].ne(recorder.after[skipped]["net.2.weight"]["theta"]).any()


def test_step_skipped_by_the_module(tmp_path: Path) -> None:
    skipped = 3
    callback = TopKASTCallback(update_interval=1, verbose=False)
    model = SkipAt(batch=skipped)
    recorder, trainer = _fit_recorded(tmp_path, model, callback)
    engine = engine_of(callback)

    assert trainer.global_step == BATCHES  # Lightning counts the batch's step slot ...
    assert engine.steps == [BATCHES - 1]  # ... Top-KAST counts the updates that ran
    assert len(model.losses) == BATCHES
    assert len(recorder.before) == BATCHES - 1  # on_before_optimizer_step never ran for the skipped batch ...
    assert engine.skipped_steps == 0  # ... so no parameter was prepared, and nothing needed restoring
    assert recorder.refreshes[-1] == BATCHES - 1
    _assert_skipped_batch_left_no_trace(recorder, skipped)
    for snapshot in [*recorder.after, recorder.end]:
        assert_alpha(engine, snapshot)


def test_bf16_true_keeps_theta_and_sets_in_the_parameters_dtype(tmp_path: Path) -> None:
    """With bf16 parameters θ is bf16 too (the torch kernels run: the compiled ones cover fp32/fp64), and counts
    stay exact."""
    callback = TopKASTCallback(update_interval=2, early_refresh=None)
    make_trainer(tmp_path, [callback], max_steps=4, precision="bf16-true").fit(MLP(), make_loader())
    assert callback.engine is not None
    assert callback.engine.steps == [4]
    assert callback.engine.refreshes == 2
    for tensor in callback.engine.tensors.values():
        assert tensor.param.dtype == tensor.theta.dtype == torch.bfloat16
        assert isinstance(tensor.kernels, kernels.TorchKernels)
        assert int(tensor.forward_set.sum()) == half_up(tensor.forward_density, tensor.numel)
        assert torch.equal(tensor.param, torch.where(tensor.forward_set, tensor.theta, 0))
