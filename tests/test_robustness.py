"""The callback among the tools people use around a fit: deepcopy, the profiler, torch.compile, evaluation after fit."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import MLP, assert_alpha, bit_exact, engine_of, fit, half_up, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.func import functional_call

from lightning_topkast import TopKASTCallback
from lightning_topkast.state import TopKAST

STEPS = 6  # 64 samples / batch 16 = 4 steps per epoch: a refresh at 3 and 6, and an epoch boundary between
RUN = {"max_steps": STEPS, "max_epochs": 2}


class Recording(MLP):
    """The MLP recording what validation, test and predict compute."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, list[Tensor]] = {"validate": [], "test": [], "predict": []}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.outputs["validate"].append(self(batch[0]).detach().clone())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.outputs["test"].append(self(batch[0]).detach().clone())

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self(batch[0]).detach().clone()
        self.outputs["predict"].append(out)
        return out


def _callback() -> TopKASTCallback:
    return TopKASTCallback(update_interval=3, early_refresh=None, verbose=False)


def _state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plain run every variant below must reproduce bit for bit: final weights and final θ."""
    L.seed_everything(0, verbose=False)
    callback = _callback()
    model = MLP()
    fit(tmp_path_factory.mktemp("reference"), model, [callback], **RUN)
    return _state(model), {name: t.theta.clone() for name, t in engine_of(callback).tensors.items()}


def _assert_reproduces(
    reference: tuple[dict[str, Tensor], dict[str, Tensor]], model: torch.nn.Module, callback: TopKASTCallback
) -> None:
    weights, thetas = reference
    assert bit_exact(_state(model), weights)
    assert bit_exact({name: t.theta for name, t in engine_of(callback).tensors.items()}, thetas)
    assert engine_of(callback).steps == [STEPS]
    assert engine_of(callback).refreshes == STEPS // 3  # every 3 steps; the selection at fit start is not one


# --- optimizer subclasses --------------------------------------------------------------------------------------


class SubclassedSGD(torch.optim.SGD):
    """The common pattern of an optimizer subclass: torch then runs step hooks at both levels of ``step()``."""

    def step(self, closure: Any = None) -> Any:
        return super().step(closure)


class SubclassedSGDModel(MLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return SubclassedSGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-2)


def test_an_optimizer_subclass_calling_super_step_is_one_update(
    tmp_path: Path, reference: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> None:
    torch.optim.SGD(MLP().parameters())  # the reference already built one: SGD.step is hooked as well
    L.seed_everything(0, verbose=False)
    callback = _callback()
    model = SubclassedSGDModel()
    fit(tmp_path, model, [callback], **RUN)
    _assert_reproduces(reference, model, callback)


# --- deepcopy ---------------------------------------------------------------------------------------------------


def test_deepcopy_of_the_callback_before_fit_trains_like_the_original(
    tmp_path: Path, reference: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> None:
    original = _callback()
    duplicate = copy.deepcopy(original)
    model = MLP()
    fit(tmp_path, model, [duplicate], **RUN)
    _assert_reproduces(reference, model, duplicate)
    assert original.engine is None  # the copy shares nothing with its source


class DeepCopier(Callback):
    """Deep-copies the module after every training batch, as EMA or checkpoint-averaging tools do."""

    def __init__(self, topkast: TopKASTCallback) -> None:
        self.topkast = topkast
        self.copies: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        duplicate = copy.deepcopy(pl_module)
        alpha = {name: torch.where(t.forward_set, t.theta, 0) for name, t in engine_of(self.topkast).tensors.items()}
        self.copies.append((_state(duplicate), alpha))
        duplicate.net[2].weight.data.fill_(7.0)  # a copy that is edited must not reach the training run


def test_deepcopy_of_the_module_mid_fit_holds_alpha_and_changes_nothing(
    tmp_path: Path, reference: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> None:
    callback = _callback()
    copier = DeepCopier(callback)
    model = MLP()
    fit(tmp_path, model, [callback, copier], **RUN)
    assert len(copier.copies) == STEPS
    for state, alpha in copier.copies:
        for name, expected in alpha.items():
            assert torch.equal(state[name], expected), name
    _assert_reproduces(reference, model, callback)


# --- the simple profiler ----------------------------------------------------------------------------------------


def test_simple_profiler_changes_nothing(
    tmp_path: Path, reference: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> None:
    callback = _callback()
    model = MLP()
    trainer = fit(tmp_path, model, [callback], profiler="simple", **RUN)
    _assert_reproduces(reference, model, callback)
    summary = trainer.profiler.summary()
    # the profiler timed the callback's hooks, so it really wrapped them
    assert f"[Callback]{callback.state_key}.on_before_optimizer_step" in summary
    assert f"[Callback]{callback.state_key}.on_train_batch_end" in summary


# --- torch.compile ----------------------------------------------------------------------------------------------


def _inductor_unavailable() -> str | None:
    """Why the inductor backend cannot build CPU kernels here, or None when it can."""
    from torch._inductor import config

    compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) and config.cpp.cxx[0] else "g++"
    if shutil.which(compiler) is None:
        return f"torch.compile's inductor backend needs a C++ compiler on CPU; {compiler!r} is not on PATH"
    return None


class CompiledNet(MLP):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.net = torch.compile(self.net, backend=backend)


@pytest.mark.parametrize(
    "backend",
    [
        # graph capture and AOTAutograd without generated code: no compiler needed
        "aot_eager",
        pytest.param(
            "inductor",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(_inductor_unavailable() is not None, reason=str(_inductor_unavailable())),
            ],
        ),
    ],
)
def test_compiled_inner_net_trains_sparse(tmp_path: Path, backend: str) -> None:
    torch._dynamo.reset()
    callback = _callback()
    model = CompiledNet(backend)
    fit(tmp_path, model, [callback], **RUN)
    engine = engine_of(callback)
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert sorted(engine.tensors) == ["net._orig_mod.2.weight", "net._orig_mod.4.weight"]
    assert engine.steps == [STEPS]
    assert_alpha(engine, params)
    # the compiled graph reads the parameters at every call: it sees α, as an eager forward does
    x = make_loader().dataset.tensors[0]
    eager = model.net._orig_mod(x)
    torch.testing.assert_close(model.net(x), eager, rtol=1e-5, atol=1e-6)


class Quiet(MLP):
    """The MLP without ``self.log`` in training_step: dynamo cannot trace Lightning's ``log`` (torch 2.13)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def test_compiled_lightning_module_trains_like_eager(
    tmp_path: Path, reference: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> None:
    """``trainer.fit(torch.compile(module))``: Lightning unwraps it; the masks are the module's own parameters."""
    torch._dynamo.reset()
    callback = _callback()
    model = Quiet()
    fit(tmp_path, torch.compile(model, backend="aot_eager"), [callback], **RUN)
    engine = engine_of(callback)
    assert sorted(engine.tensors) == ["net.2.weight", "net.4.weight"]
    assert engine.steps == [STEPS]
    assert_alpha(engine, dict(model.named_parameters()))
    weights, _ = reference
    for name, value in _state(model).items():
        torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-6)


# --- validate, test and predict ---------------------------------------------------------------------------------


def _by_hand(model: torch.nn.Module, engine: TopKAST) -> Tensor:
    """The forward pass on α built from the callback's masks and dense θ, never from the parameters."""
    weights = {name: p.detach() for name, p in model.named_parameters()}
    weights.update({name: torch.where(t.forward_set, t.theta, 0) for name, t in engine.tensors.items()})
    with torch.no_grad():
        return functional_call(model, weights, (make_loader().dataset.tensors[0],))


def _evaluate(trainer: L.Trainer, model: Recording) -> None:
    trainer.validate(model, make_loader(), verbose=False)
    trainer.test(model, make_loader(), verbose=False)
    trainer.predict(model, make_loader())


def test_validate_test_predict_after_fit_see_alpha(tmp_path: Path) -> None:
    callback = _callback()
    model = Recording()
    trainer = fit(tmp_path, model, [callback], **RUN)
    engine = engine_of(callback)
    before, steps, refreshes = _state(model), list(engine.steps), engine.refreshes
    _evaluate(trainer, model)
    expected = _by_hand(model, engine)
    # the module itself ran on α: zeros outside A really are zeros in the evaluated layers
    assert int(torch.count_nonzero(model.net[2].weight)) <= half_up(engine.tensors["net.2.weight"].forward_density, 256)
    for stage in ("validate", "test", "predict"):
        assert torch.equal(torch.cat(model.outputs[stage]), expected), stage
    assert bit_exact(_state(model), before)
    assert engine.steps == steps
    assert engine.refreshes == refreshes


def test_trained_callback_on_a_new_trainer_only_evaluates(tmp_path: Path) -> None:
    callback = _callback()
    model = Recording()
    fit(tmp_path, model, [callback], **RUN)
    engine = engine_of(callback)
    before, thetas = _state(model), {name: t.theta.clone() for name, t in engine.tensors.items()}
    _evaluate(make_trainer(tmp_path / "eval", [callback]), model)
    expected = _by_hand(model, engine)
    for stage in ("validate", "test", "predict"):
        assert torch.equal(torch.cat(model.outputs[stage]), expected), stage
    assert bit_exact(_state(model), before)
    assert bit_exact({name: t.theta for name, t in engine.tensors.items()}, thetas)
    assert callback.engine is engine
    assert engine.steps == [STEPS]


def test_fresh_callback_on_an_evaluation_trainer_masks_nothing(tmp_path: Path) -> None:
    callback = _callback()
    model = Recording()
    before = _state(model)
    _evaluate(make_trainer(tmp_path, [callback]), model)
    assert callback.engine is None  # masks are built at fit start only
    assert bit_exact(_state(model), before)
    assert int(torch.count_nonzero(model.net[2].weight)) == 256  # still dense
    with torch.no_grad():
        dense = model(make_loader().dataset.tensors[0])
    for stage in ("validate", "test", "predict"):
        assert torch.equal(torch.cat(model.outputs[stage]), dense), stage


# --- half precision at high sparsity ----------------------------------------------------------------------------


def test_half_precision_tensor_at_high_sparsity_builds_its_penalty() -> None:
    """λ/D fits float16 although 1/D (1e5) does not: the coefficient must be formed before the cast."""
    param = torch.nn.Parameter(torch.randn(1000, 100, dtype=torch.float16, generator=torch.Generator().manual_seed(0)))
    engine = TopKAST({"w": param}, {"w": (1e-5, 0.5)}, penalty=1e-4)
    tensor = engine.tensors["w"]
    assert int(tensor.forward_set.sum()) == 1
    engine.attach([torch.optim.SGD([param], lr=0.0)])
    param.grad = torch.zeros_like(param)
    engine.before_step(engine._optimizers[0])  # the gradient is now the penalty's alone: λ·c·θ on B
    exploration = tensor.backward_set & ~tensor.forward_set
    theta = tensor.theta.float()
    assert torch.equal(param.grad[exploration], (theta * 10.0)[exploration].half())
    lam = float(torch.tensor(1e-4, dtype=torch.float16))  # λ as float16 holds it
    assert torch.equal(param.grad[tensor.forward_set], (theta * lam)[tensor.forward_set].half())
    assert not bool(param.grad[~tensor.backward_set].any())
    engine.restore_forward_weights()
