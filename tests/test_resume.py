"""Checkpoint resume: bit-exact continuation, and loud failures on checkpoints that do not fit."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import ACCELERATORS, MLP, bit_exact, fit, make_loader, saved_sets
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lightning_topkast import TopKASTCallback
from lightning_topkast.state import TopKAST

STEPS_PER_EPOCH = 4  # 64 samples / batch 16


def _fit_two_epochs(
    tmp_path: Path, optimizer: str, with_callback: bool, accelerator: str = "cpu"
) -> tuple[MLP, TopKASTCallback | None, Path]:
    """An uninterrupted two-epoch run that also saves a checkpoint at the end of epoch 1."""
    callback = TopKASTCallback(update_interval=3) if with_callback else None
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = MLP(optimizer=optimizer)
    callbacks = [c for c in (callback, saver) if c]
    fit(tmp_path, model, callbacks, max_epochs=2, enable_checkpointing=True, accelerator=accelerator)
    return model, callback, tmp_path / "ckpt" / "epoch=0.ckpt"


def _resume(
    tmp_path: Path, ckpt: Path, optimizer: str, callback: TopKASTCallback | None, accelerator: str = "cpu"
) -> MLP:
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    model = MLP(optimizer=optimizer)
    fit(
        tmp_path / "resumed",
        model,
        [callback] if callback else [],
        max_epochs=2,
        accelerator=accelerator,
        ckpt_path=ckpt,
    )
    return model


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_is_bit_exact(tmp_path: Path, optimizer: str, accelerator: str) -> None:
    # a refresh every 3 steps straddles the checkpoint at step 4, so the restored step counter matters
    reference, reference_callback, ckpt = _fit_two_epochs(tmp_path, optimizer, True, accelerator)
    callback = TopKASTCallback(update_interval=3)
    resumed = _resume(tmp_path, ckpt, optimizer, callback, accelerator)

    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert reference_callback is not None
    assert callback.engine is not None
    assert reference_callback.engine is not None
    assert callback.engine.steps == reference_callback.engine.steps == [2 * STEPS_PER_EPOCH]
    assert callback.engine.refreshes == reference_callback.engine.refreshes
    for name, expected in reference_callback.engine.tensors.items():
        got = callback.engine.tensors[name]
        assert torch.equal(got.theta, expected.theta), name
        assert torch.equal(got.forward_set, expected.forward_set), name
        assert torch.equal(got.backward_set, expected.backward_set), name
        assert torch.equal(got.ever_active, expected.ever_active), name


def test_resume_without_callback_is_bit_exact_too(tmp_path: Path) -> None:
    """The baseline: Lightning itself resumes this setup exactly, so the test above measures the callback."""
    reference, _, ckpt = _fit_two_epochs(tmp_path, "sgd", with_callback=False)
    resumed = _resume(tmp_path, ckpt, "sgd", None)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_state_loads_with_weights_only(tmp_path: Path) -> None:
    _model, _callback, ckpt = _fit_two_epochs(tmp_path, "sgd", with_callback=True)
    state = torch.load(ckpt, weights_only=True)["callbacks"][TopKASTCallback().state_key]
    assert state["version"] == 2
    assert state["config"]["forward_sparsity"] == 0.8
    assert state["steps"] == [STEPS_PER_EPOCH]
    assert sorted(state["tensors"]) == ["net.2.weight", "net.4.weight"]
    # the model's weights in the checkpoint are the forward weights α
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, saved in state["tensors"].items():
        assert torch.equal(weights[name], torch.where(saved_sets(saved)[0], saved["theta"], 0))


def test_checkpoint_without_callback_state_raises(tmp_path: Path) -> None:
    _, _, ckpt = _fit_two_epochs(tmp_path, "sgd", with_callback=False)
    key = re.escape(TopKASTCallback().state_key)
    with pytest.raises(
        ValueError, match=rf"holds no state for {key} \(saved without the callback\?\).*strict_resume=False"
    ):
        _resume(tmp_path, ckpt, "sgd", TopKASTCallback())


def test_checkpoint_without_callback_state_starts_fresh_when_asked(tmp_path: Path) -> None:
    _, _, ckpt = _fit_two_epochs(tmp_path, "sgd", with_callback=False)
    callback = TopKASTCallback(strict_resume=False)
    with pytest.warns(UserWarning, match="masks computed afresh"):
        model = _resume(tmp_path, ckpt, "sgd", callback)
    assert callback.engine is not None
    assert callback.engine.steps == [STEPS_PER_EPOCH]  # the second epoch ran with the callback
    for tensor in callback.engine.tensors.values():
        assert torch.equal(tensor.param, torch.where(tensor.forward_set, tensor.theta, 0))
    assert torch.count_nonzero(model.net[2].weight) == round(0.2 * 16 * 16)


def test_checkpoint_for_other_densities_lists_differences(tmp_path: Path) -> None:
    _, _, ckpt = _fit_two_epochs(tmp_path, "sgd", with_callback=True)
    callback = TopKASTCallback(update_interval=3, forward_sparsity=0.9, backward_sparsity=0.7)
    with pytest.raises(ValueError, match=r"net\.2\.weight: backward_density 0\.5 in the checkpoint, 0\.3 now") as error:
        _resume(tmp_path, ckpt, "sgd", callback)
    assert "net.2.weight: forward_density 0.2 in the checkpoint, 0.1 now" in str(error.value)
    assert "net.4.weight: forward_density 0.2 in the checkpoint, 0.1 now" in str(error.value)


def test_checkpoint_from_a_callback_with_other_targets_names_its_state_key(tmp_path: Path) -> None:
    _, _, ckpt = _fit_two_epochs(tmp_path, "sgd", with_callback=True)
    callback = TopKASTCallback(update_interval=3, dense_first_layer=False)
    saved = re.escape(TopKASTCallback().state_key)
    with pytest.raises(
        ValueError, match=rf"it holds {saved}, from a callback with other targets; pass the same include"
    ):
        _resume(tmp_path, ckpt, "sgd", callback)


# --- resumes across a step the GradScaler skipped, every counter and threshold compared -----------------------------
#
# Decided: the refresh thresholds are restored (they are in the state_dict), and compared exactly where the resume
# takes over. Recomputed from the checkpoint's weights instead, which hold α, A's threshold usually comes out the
# same, but B's is lost (α is 0 on B \ A), and A's too where a weight of A is 0 or NaN and ties with the zeros
# outside it. The early refresh counts B \ A against A's threshold, so a continued run must start from the
# thresholds the uninterrupted run held. The spacings of the incremental search are not saved: they choose how a
# refresh searches, never what it finds.

SKIPPED_BATCHES = (1, 5)  # batch indices within each epoch whose gradient gets an inf: the scaler skips those steps


class InfGradient(L.Callback):
    """Writes inf into one gradient entry of ``net.2.weight`` after backward on the batches in ``batches``."""

    def __init__(self, batches: tuple[int, ...]) -> None:
        self.batches, self.batch_idx = batches, -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batch_idx = idx

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch_idx in self.batches:
            grad = pl_module.net[2].weight.grad
            assert grad is not None
            grad.view(-1)[0] = math.inf


def engine_state(engine: TopKAST, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every counter, every threshold and every tensor the engine holds, the model's weights and optimizer state."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "counters": (list(engine.steps), engine.refreshes, engine.early_refreshes, engine.skipped_steps),
        "units": [
            (
                [t.name for t in unit.tensors],
                tuple(unit.forward),
                tuple(unit.backward),
                unit.since_refresh,
                None if unit.early_flag is None else unit.early_flag.read(),
            )
            for unit in engine.units
        ],
        "tensors": {n: (t.theta.clone(), t.code.clone(), t.forward_size) for n, t in engine.tensors.items()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer": {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()},
    }


class Capture(L.Callback):
    """The engine's whole state where a resume takes over: at the end of epoch 0, or at the resumed train start."""

    def __init__(self, topkast: TopKASTCallback) -> None:
        self.topkast = topkast
        self.taken: dict[str, Any] = {}

    def _take(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        assert self.topkast.engine is not None
        self.taken[when] = engine_state(self.topkast.engine, pl_module, trainer.optimizers[0])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(trainer, pl_module, "train start")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self._take(trainer, pl_module, "end of epoch 0")


def _fp16_fit(root: Path, optimizer: str, interval: int, early: float | None, ckpt: Path | None = None) -> dict:
    torch.manual_seed(0 if ckpt is None else 123)  # resumed: everything must come from the checkpoint
    model = MLP(optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 1e-2)
    topkast = TopKASTCallback(update_interval=interval, early_refresh=early, verbose=False)
    capture = Capture(topkast)
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = fit(
        root / ("resumed" if ckpt else "run"),
        model,
        [topkast, InfGradient(SKIPPED_BATCHES), capture, *([] if ckpt else [saver])],
        make_loader(n=64, batch_size=8),
        max_epochs=2,
        enable_checkpointing=ckpt is None,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        ckpt_path=ckpt,
    )
    assert topkast.engine is not None
    end = engine_state(topkast.engine, model, trainer.optimizers[0])
    return {"end": end, "scale": scaler.get_scale(), **capture.taken}


def _assert_same_state(expected: dict, got: dict) -> None:
    assert got["counters"] == expected["counters"]
    assert got["units"] == expected["units"]
    for key in ("tensors", "weights"):
        assert got[key].keys() == expected[key].keys(), key
        for name, values in expected[key].items():
            assert bit_exact(got[key][name], values), (key, name)
    assert got["optimizer"].keys() == expected["optimizer"].keys()
    for name, state in expected["optimizer"].items():
        assert got["optimizer"][name].keys() == state.keys(), name
        for k, v in state.items():
            assert bit_exact(got["optimizer"][name][k], v), (name, k)


@pytest.mark.parametrize(
    ("optimizer", "interval", "early"),
    [
        pytest.param("sgd", 1, None, id="sgd-every-step"),
        pytest.param("adamw", 10_000, 0.01, id="adamw-early-refresh-alone"),
    ],
)
def test_resume_across_a_skipped_step_restores_every_counter_and_threshold(
    tmp_path: Path, optimizer: str, interval: int, early: float | None
) -> None:
    run = _fp16_fit(tmp_path, optimizer, interval, early)
    steps, refreshes, early_refreshes, skipped = run["end"]["counters"]
    assert skipped == 2 * len(SKIPPED_BATCHES)  # two skipped steps in each epoch: the checkpoint holds 2
    assert steps == [16 - skipped]
    assert run["scale"] == 1024.0 / 2**skipped  # the scaler found every inf
    if early is None:
        assert (refreshes, early_refreshes) == (steps[0], 0)
    else:  # every refresh was an early one, and not every step refreshed
        assert 0 < early_refreshes == refreshes < steps[0]
    assert run["end of epoch 0"]["counters"][3] == len(SKIPPED_BATCHES)
    resumed = _fp16_fit(tmp_path, optimizer, interval, early, ckpt=tmp_path / "ckpt" / "epoch=0.ckpt")
    # where the resume takes over: the state of the end of epoch 0, thresholds and counters included
    _assert_same_state(run["end of epoch 0"], resumed["train start"])
    # and where it ends: the uninterrupted run's state, bit for bit, and the same loss scale
    _assert_same_state(run["end"], resumed["end"])
    assert resumed["scale"] == run["scale"]
