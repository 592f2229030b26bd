"""Lightning citizenship: state keys, several callbacks, checkpoints loaded outside fit, hyperparameters, public API."""

from __future__ import annotations

import ast
import csv
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import MLP, engine_of, make_loader, make_trainer, wandb_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import lightning_topkast
from lightning_topkast import TopKASTCallback
from lightning_topkast.selection import count, forward_backward_sets

ROOT = Path(__file__).resolve().parents[1]


class Evaluated(MLP):
    """The conftest MLP with test and predict steps, so every evaluation entry point can load a checkpoint."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


class FitStart(L.Callback):
    """Listed after TopKASTCallback: what the model and the engine hold when the first step is about to run."""

    def __init__(self, topkast: TopKASTCallback) -> None:
        self.topkast = topkast
        self.params: dict[str, torch.Tensor] = {}
        self.theta: dict[str, torch.Tensor] = {}
        self.steps: list[int] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = engine_of(self.topkast)
        self.params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.theta = {name: t.theta.clone() for name, t in engine.tensors.items()}
        self.steps = list(engine.steps)


def _checkpoint(tmp_path: Path, with_callback: bool, seed: int = 7) -> Path:
    """A checkpoint of an MLP trained 3 steps from another initialisation, with or without the callback."""
    torch.manual_seed(seed)
    callbacks = [TopKASTCallback(verbose=False)] if with_callback else []
    trainer = make_trainer(tmp_path, callbacks, max_steps=3)
    trainer.fit(Evaluated(), make_loader())
    path = tmp_path / f"{'sparse' if with_callback else 'dense'}.ckpt"
    trainer.save_checkpoint(path)
    return path


def _evaluate(trainer: L.Trainer, stage: str, ckpt: Path) -> None:
    model = Evaluated()
    if stage == "validate":
        trainer.validate(model, make_loader(), ckpt_path=ckpt, verbose=False)
    elif stage == "test":
        trainer.test(model, make_loader(), ckpt_path=ckpt, verbose=False)
    else:
        trainer.predict(model, make_loader(), ckpt_path=ckpt)


def _assert_starts_from_its_own_weights(start: FitStart, initial: dict[str, torch.Tensor]) -> None:
    """θ is the new model's initialisation and the parameters hold its top-k: nothing came from the checkpoint."""
    assert sorted(start.theta) == ["net.2.weight", "net.4.weight"]
    assert start.steps == [0]
    for name, theta in start.theta.items():
        assert torch.equal(theta, initial[name]), name
        forward_set, _ = forward_backward_sets(initial[name], 0.2, 0.5)
        assert torch.equal(start.params[name], torch.where(forward_set, initial[name], 0)), name
    for name in ("net.0.weight", "net.0.bias", "net.4.bias"):  # unmasked: the new model's own values
        assert torch.equal(start.params[name], initial[name]), name


# --- a checkpoint loaded outside fit never leaks into a later fit -------------------------------------------------


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
@pytest.mark.parametrize("with_callback", [True, False], ids=["ckpt-with-state", "ckpt-without-state"])
def test_evaluating_a_checkpoint_then_fitting_another_model_starts_from_its_own_weights(
    tmp_path: Path, stage: str, with_callback: bool
) -> None:
    ckpt = _checkpoint(tmp_path / "saved", with_callback)
    topkast = TopKASTCallback(verbose=False)
    start = FitStart(topkast)
    trainer = make_trainer(tmp_path, [topkast, start], max_steps=2)
    _evaluate(trainer, stage, ckpt)

    torch.manual_seed(123)
    other = Evaluated()
    initial = {name: p.detach().clone() for name, p in other.named_parameters()}
    trainer.fit(other, make_loader())  # raised "cannot resume", or copied the checkpoint's θ into `other`
    _assert_starts_from_its_own_weights(start, initial)
    assert trainer.global_step == 2


def test_fit_resume_then_validate_then_fit_on_one_trainer_and_callback(tmp_path: Path) -> None:
    sparse = _checkpoint(tmp_path / "a", with_callback=True, seed=1)
    dense = _checkpoint(tmp_path / "b", with_callback=False, seed=2)
    topkast = TopKASTCallback(verbose=False)
    start = FitStart(topkast)
    model = Evaluated()
    trainer = make_trainer(tmp_path, [topkast, start], max_steps=5, max_epochs=-1)
    trainer.fit(model, make_loader(), ckpt_path=sparse)  # resumes: steps 4 and 5 after the checkpoint's 3
    assert engine_of(topkast).steps == [5]

    trainer.validate(model, make_loader(), ckpt_path=dense, verbose=False)  # the model now holds `dense`'s weights
    loaded = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.fit_loop.epoch_loop.max_steps = 7
    trainer.fit(model, make_loader())  # not a resume: the validate checkpoint is not this fit's
    assert trainer.global_step == 7
    # the model was changed outside the callback: masks come afresh from what it holds now
    _assert_starts_from_its_own_weights(start, loaded)


def test_a_second_fit_without_evaluation_in_between_continues_theengine_of(tmp_path: Path) -> None:
    """The control: nothing loaded between two fits, so the engine and its θ outside A carry on."""
    topkast = TopKASTCallback(verbose=False)
    start = FitStart(topkast)
    model = Evaluated()
    trainer = make_trainer(tmp_path, [topkast, start], max_steps=2)
    trainer.fit(model, make_loader())
    engine, theta = engine_of(topkast), {name: t.theta.clone() for name, t in engine_of(topkast).tensors.items()}
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(model, make_loader())
    assert topkast.engine is engine
    assert start.steps == [2]
    assert all(torch.equal(start.theta[name], theta[name]) for name in theta)


# --- several callbacks --------------------------------------------------------------------------------------------


def _two_callbacks() -> list[TopKASTCallback]:
    return [
        TopKASTCallback(include=["net.0.*", "net.2.*"], forward_sparsity=0.9, backward_sparsity=0.8, verbose=False),
        TopKASTCallback(
            include=["net.4.weight"],
            forward_sparsity=0.5,
            backward_sparsity=0.25,
            update_interval=3,
            early_refresh=None,
        ),
    ]


def test_state_key_is_built_once_and_follows_the_targets() -> None:
    callback = TopKASTCallback()
    key = callback.state_key
    assert callback.state_key is key  # Lightning reads it at every hook call
    callback.include = ["Linear"]
    assert callback.state_key != key
    assert "'include': ['Linear']" in callback.state_key
    assert callback.include is not None
    callback.include.append("Conv2d")  # edited in place
    assert "'include': ['Linear', 'Conv2d']" in callback.state_key


def test_state_key_names_the_targets() -> None:
    assert TopKASTCallback().state_key == (
        "TopKASTCallback{'include': None, 'exclude': None, 'dense_first_layer': True, 'dense_last_layer': False}"
    )
    keys = {cb.state_key for cb in _two_callbacks()}
    assert len(keys) == 2
    # densities and refresh settings are not identity: resuming with other values reports what differs
    assert TopKASTCallback(forward_sparsity=0.9).state_key == TopKASTCallback().state_key


def test_two_callbacks_with_disjoint_targets_train_log_and_resume_bit_exactly(tmp_path: Path) -> None:
    reference_callbacks = _two_callbacks()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    reference = MLP()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(
        tmp_path,
        [*reference_callbacks, saver],
        max_epochs=2,
        enable_checkpointing=True,
        logger=logger,
        log_every_n_steps=1,
    )
    trainer.fit(reference, make_loader())
    first, second = (engine_of(cb) for cb in reference_callbacks)
    assert list(first.tensors) == ["net.0.weight", "net.2.weight"]
    assert list(second.tensors) == ["net.4.weight"]
    assert int(second.tensors["net.4.weight"].forward_set.sum()) == count(0.5, 48)
    assert (first.refreshes, second.refreshes) == (8, 8 // 3)

    ckpt = tmp_path / "ckpt" / "epoch=0.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert {cb.state_key for cb in reference_callbacks} <= set(saved)
    # metrics under one prefix per callback, in the order of trainer.callbacks
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        columns = next(csv.reader(f))
    assert "topkast/forward_density" in columns
    assert "topkast_1/forward_density" in columns

    torch.manual_seed(123)
    resumed_callbacks = _two_callbacks()
    resumed = MLP()
    make_trainer(tmp_path / "resumed", resumed_callbacks, max_epochs=2).fit(resumed, make_loader(), ckpt_path=ckpt)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for expected, got in zip(reference_callbacks, resumed_callbacks, strict=True):
        assert engine_of(got).steps == engine_of(expected).steps == [8]
        for name, t in engine_of(expected).tensors.items():
            assert torch.equal(engine_of(got).tensors[name].theta, t.theta), name
            assert torch.equal(engine_of(got).tensors[name].forward_set, t.forward_set), name


class Stepped(L.Callback):
    steps = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        Stepped.steps += 1


def test_overlapping_targets_raise_before_the_first_step(tmp_path: Path) -> None:
    Stepped.steps = 0
    first, second = TopKASTCallback(verbose=False), TopKASTCallback(include=["net.4.*", "net.0.weight"])
    trainer = make_trainer(tmp_path, [first, second, Stepped()], max_steps=2)
    message = (
        "TopKASTCallback(include=['net.4.*', 'net.0.weight'], exclude=None) and TopKASTCallback(include=None, "
        "exclude=None) both mask net.4.weight: a tensor has one forward set. Give each callback its own tensors"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(MLP(), make_loader())
    assert Stepped.steps == 0


def test_two_callbacks_with_one_configuration_are_refused_by_lightning(tmp_path: Path) -> None:
    """Same targets, same state_key: Lightning itself refuses the pair when the Trainer is built."""
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `TopKASTCallback`.*state_key"):
        make_trainer(tmp_path, [TopKASTCallback(), TopKASTCallback(forward_sparsity=0.9)])


# --- hyperparameters ----------------------------------------------------------------------------------------------


class WithHparams(MLP):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden=hidden)
        self.save_hyperparameters()


EXPECTED_HPARAMS = {
    "forward_sparsity": 0.9,
    "backward_sparsity": 0.8,
    "update_interval": 1,
    "early_refresh": 0.01,
    "exploration_penalty": 1e-4,
    "decoupled_penalty": False,
    "distribution": "erk",
    "sparsity_overrides": {"net.4.weight": [0.5, 0.5]},
    "include": None,
    "exclude": ["net.0.*"],
    "dense_first_layer": True,
    "dense_last_layer": False,
    "log_masks_every_n_steps": 0,
    "masked_tensors": 2,
    "masked_weights": 16 * 16 + 3 * 16,
}


def test_every_logger_gets_the_resolved_configuration(tmp_path: Path) -> None:
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="topkast-tests")
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    topkast = TopKASTCallback(
        forward_sparsity=0.9,
        backward_sparsity=0.8,
        distribution="erk",
        sparsity_overrides={"net.4.weight": [0.5, 0.5]},
        exclude=["net.0.*"],
        verbose=False,
    )
    run = wandb_logger.experiment
    try:
        trainer = make_trainer(tmp_path, [topkast], max_steps=2, logger=[wandb_logger, tensorboard, csv_logger])
        trainer.fit(WithHparams(), make_loader())
        run_file = Path(run.dir).parent / f"run-{run.id}.wandb"
        in_process = dict(run.config)
    finally:
        run.finish()
    engine = engine_of(topkast)
    expected = {
        **EXPECTED_HPARAMS,
        # net.2.weight is the first layer of the default selection after exclude: kept dense
        "masked_tensors": 1,
        "masked_weights": 48,
        "forward_density": 0.5,
        "backward_density": 0.5,
    }
    assert list(engine.tensors) == ["net.4.weight"]
    assert topkast.hyperparameters() == expected

    assert in_process["topkast"] == expected
    assert in_process["hidden"] == 16  # the module's own hyperparameters are still there
    assert wandb_config(run_file)["topkast"] == expected  # and written to the run file

    for logger in (tensorboard, csv_logger):
        hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
        assert hparams["topkast"] == expected, type(logger).__name__
        assert hparams["hidden"] == 16
    # TensorBoard's HParams tab: the last session start holds the module's keys beside ours, flattened
    events = EventAccumulator(tensorboard.log_dir)
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert session["topkast/forward_sparsity"].number_value == 0.9
    assert session["topkast/distribution"].string_value == "erk"
    assert session["hidden"].number_value == 16


# --- public Lightning API only ------------------------------------------------------------------------------------


def _private_lightning_accesses(path: Path) -> list[str]:
    """``trainer._x``, ``trainer.a._b``, ``pl_module._x``, ``strategy._x``: private attributes of Lightning objects."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id in {"trainer", "pl_module", "strategy", "logger"}:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_library_reads_no_private_lightning_attribute() -> None:
    sources = sorted((ROOT / "lightning_topkast").glob("*.py"))
    assert len(sources) >= 10
    assert [hit for path in sources for hit in _private_lightning_accesses(path)] == []


def test_the_private_attribute_check_finds_one() -> None:
    """The control: the check above sees what main had (``trainer._logger_connector.should_update_logs``)."""
    probe = ROOT / "tests" / "private_access_probe.py"
    probe.write_text("def f(trainer):\n    return trainer._logger_connector.should_update_logs\n")
    try:
        assert _private_lightning_accesses(probe) == [
            "private_access_probe.py:2: trainer._logger_connector",
        ]
    finally:
        probe.unlink()


def test_package_exports() -> None:
    assert lightning_topkast.__all__ == sorted(lightning_topkast.__all__)
    assert {"Selection", "Plan", "Config", "plan", "TopKASTCallback"} <= set(lightning_topkast.__all__)


# --- logging cadence from public attributes -----------------------------------------------------------------------


def test_metrics_are_fresh_at_every_written_step_with_gradient_accumulation(tmp_path: Path) -> None:
    """Inside an accumulation window Lightning writes too: the values written are those of that batch, never stale."""
    topkast = TopKASTCallback(verbose=False)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(
        tmp_path, [topkast], max_epochs=1, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2
    )
    trainer.fit(MLP(), make_loader(n=64, batch_size=8))  # 8 batches, 4 optimizer steps, 1 refresh per step
    rows = {}
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            if row.get("topkast/refreshes"):
                rows[int(row["step"])] = float(row["topkast/refreshes"])
    assert rows == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
