"""Checkpoint resume: bit-exact continuation, and loud failures on checkpoints that do not fit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATORS, MLP, make_loader, make_trainer, saved_sets
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_topkast import TopKASTCallback

STEPS_PER_EPOCH = 4  # 64 samples / batch 16


def _fit_two_epochs(
    tmp_path: Path, optimizer: str, with_callback: bool, accelerator: str = "cpu"
) -> tuple[MLP, TopKASTCallback | None, Path]:
    """An uninterrupted two-epoch run that also saves a checkpoint at the end of epoch 1."""
    callback = TopKASTCallback(update_interval=3) if with_callback else None
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = MLP(optimizer=optimizer)
    callbacks = [c for c in (callback, saver) if c]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, enable_checkpointing=True, accelerator=accelerator)
    trainer.fit(model, make_loader())
    return model, callback, tmp_path / "ckpt" / "epoch=0.ckpt"


def _resume(
    tmp_path: Path, ckpt: Path, optimizer: str, callback: TopKASTCallback | None, accelerator: str = "cpu"
) -> MLP:
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    model = MLP(optimizer=optimizer)
    trainer = make_trainer(tmp_path / "resumed", [callback] if callback else [], max_epochs=2, accelerator=accelerator)
    trainer.fit(model, make_loader(), ckpt_path=ckpt)
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
