"""Crash and resume: a SIGKILLed run resumed from ``last.ckpt`` ends bit-identical, and mid-step checkpoints are sound.

The resume tests in ``test_resume.py`` stop cleanly at an epoch boundary in one process. Here the training process is
killed for real (SIGKILL, in the middle of an optimizer step) at a step drawn by a seeded RNG, and a fresh process
resumes from the last periodic checkpoint. Lightning restarts a plain ``DataLoader`` from its first batch on a
mid-epoch resume, so the model draws each batch from the optimizer step instead (``crash_worker.StepMLP``), and a
baseline without the callback shows that Lightning itself resumes this setup exactly.

The second half saves checkpoints from inside a step (``on_before_optimizer_step``, ``on_train_batch_end``, and
``ModelCheckpoint`` after every step) with the saving callback before and after ``TopKASTCallback``, and checks what
every checkpoint holds and that continuing from it reproduces the uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import MLP_SET_SIZES, make_trainer, saved_sets, script_env
from crash_worker import CHECKPOINT_EVERY, STEPS, StepMLP, dummy_loader, run
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_topkast import TopKASTCallback

HERE = Path(__file__).resolve().parent
WORKER = HERE / "crash_worker.py"
TIMEOUT_S = 120


# --- comparing states -----------------------------------------------------------------------------------------------


def assert_identical(expected: Any, got: Any, where: str = "") -> None:
    """Recursive ``torch.equal`` (and equal dtype) on tensors, ``==`` on everything else."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert expected.dtype == got.dtype, where
        assert torch.equal(expected, got), where
    elif isinstance(expected, Mapping):
        assert isinstance(got, Mapping), where
        assert list(expected) == list(got), where
        for key in expected:
            assert_identical(expected[key], got[key], f"{where}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert expected == got, where


def forward_weights(saved: Mapping[str, Any]) -> torch.Tensor:
    """θ on the saved forward set, exactly 0 elsewhere."""
    return torch.where(saved_sets(saved)[0], saved["theta"], torch.zeros((), dtype=saved["theta"].dtype))


# --- 1. SIGKILL and resume in fresh processes -------------------------------------------------------------------------


def _spawn(out: Path, *args: str) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True)
    with (out / "log.txt").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(out), *args], stdout=log, stderr=log, env=script_env()
        )


def _log(out: Path) -> str:
    return (out / "log.txt").read_text(errors="replace")[-4000:]


def _finish(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    assert proc.wait(timeout=TIMEOUT_S) == 0, _log(out)
    return torch.load(out / "final.pt", weights_only=True)


def _kill_when_paused(proc: subprocess.Popen[bytes], out: Path) -> int:
    """SIGKILL the worker once it waits mid-step; returns the optimizer steps it had completed."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "paused").exists():
        assert proc.poll() is None, f"the worker ended before its kill point:\n{_log(out)}"
        assert time.monotonic() < deadline, f"the worker never reached its kill point:\n{_log(out)}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    return int((out / "paused").read_text())


def _kill_step(update_interval: int) -> int:
    """A seeded step to kill at, after a refresh that the last checkpoint before it does not hold."""
    refresh_every = update_interval or 3  # the baseline dies where the update_interval=3 run does
    candidates = [
        step
        for step in range(CHECKPOINT_EVERY, STEPS)
        if any(s % refresh_every == 0 for s in range(step // CHECKPOINT_EVERY * CHECKPOINT_EVERY + 1, step + 1))
    ]
    return random.Random(4).choice(candidates)


CASES = {  # update_interval (0: no callback), optimizer, early_refresh
    "baseline-without-callback": (0, "sgd", None),
    "update_interval=1-adamw": (1, "adamw", None),
    "update_interval=3-sgd": (3, "sgd", None),
    # at most 16 steps apart, so every refresh is an early one, decided by θ alone
    "early_refresh-sgd": (16, "sgd", 0.0),
}


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each case killed by SIGKILL, then resumed from ``last.ckpt`` in a fresh process.

    The cases run side by side (the processes are independent): on 2 cores, one after another would double the
    time spent importing Lightning.
    """
    root = tmp_path_factory.mktemp("crash")
    args = {
        case: (
            "--update-interval",
            str(ui),
            "--optimizer",
            opt,
            *(("--early-refresh", str(e)) if e is not None else ()),
        )
        for case, (ui, opt, e) in CASES.items()
    }
    started: list[subprocess.Popen[bytes]] = []
    try:
        for case, (update_interval, _, early_refresh) in CASES.items():
            pause = ("--pause-at", str(_kill_step(3 if early_refresh is not None else update_interval)))
            started.append(_spawn(root / case / "killed", *args[case], *pause))
        results = {
            case: {"killed_at": _kill_when_paused(proc, root / case / "killed")}
            for case, proc in zip(CASES, started, strict=True)
        }
        for case, result in results.items():
            result["last"] = root / case / "killed" / "ckpt" / "last.ckpt"
            started.append(_spawn(root / case / "resumed", *args[case], "--resume", str(result["last"])))
        for case, proc in zip(CASES, started[len(CASES) :], strict=True):
            results[case]["resumed"] = _finish(proc, root / case / "resumed")
    finally:
        for proc in started:  # after a failure, end the workers this fixture started, each by its own handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_mid_step_then_resume_from_last_checkpoint_is_bit_exact(
    tmp_path: Path, crashed_and_resumed: dict[str, dict[str, Any]], case: str
) -> None:
    update_interval, optimizer, early_refresh = CASES[case]
    result = crashed_and_resumed[case]
    kill_at, resumed = result["killed_at"], result["resumed"]
    assert kill_at == _kill_step(3 if early_refresh is not None else update_interval)
    checkpointed = kill_at // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    checkpoint = torch.load(result["last"], weights_only=True)
    assert checkpoint["global_step"] == checkpointed
    # the uninterrupted run, in this process: the worker's code with the same seed and one thread
    reference = run(tmp_path, update_interval, optimizer, early_refresh=early_refresh)

    assert reference["start"]["step"] == 0
    assert resumed["start"]["step"] == checkpointed
    assert reference["global_step"] == resumed["global_step"] == STEPS
    assert_identical(reference["state_dict"], resumed["state_dict"], "state_dict")
    assert_identical(reference["optimizer"], resumed["optimizer"], "optimizer")
    assert_identical(reference["topkast"], resumed["topkast"], "topkast")  # θ, A, B, ever-active, counters
    # SGD keeps a momentum buffer, AdamW a step and two moments, for each of the 6 parameters: all compared above
    assert len(resumed["optimizer"]["state"]) == 6
    if not update_interval:
        assert reference["topkast"] is None
        return
    if early_refresh is not None:  # refreshes at steps that θ chose, the same ones after the kill and resume
        saved = checkpoint["callbacks"][TopKASTCallback().state_key]
        assert 0 < saved["early_refreshes"] == saved["refreshes"] < resumed["topkast"]["early_refreshes"] < STEPS
        return
    # the kill lost at least one refresh, which the resumed process redid from the checkpointed θ
    assert checkpoint["callbacks"][TopKASTCallback().state_key]["refreshes"] == checkpointed // update_interval
    assert resumed["start"]["refreshes"] == checkpointed // update_interval < kill_at // update_interval
    assert resumed["topkast"]["refreshes"] == STEPS // update_interval
    assert resumed["topkast"]["steps"] == [STEPS]
    for name, (a, b) in MLP_SET_SIZES.items():
        saved = resumed["topkast"]["tensors"][name]
        assert tuple(int(s.sum()) for s in saved_sets(saved)) == (a, b)
        assert torch.equal(resumed["state_dict"][name], forward_weights(saved))


# --- 2. checkpoints saved from inside a step ------------------------------------------------------------------------

INSIDE_STEPS = 8
INSIDE_INTERVAL = 3


class SaveInsideStep(L.Callback):
    """Saves a checkpoint before every optimizer update and at the end of every batch."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = dirpath

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        trainer.save_checkpoint(self.dirpath / f"before_step-{trainer.global_step}.ckpt")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trainer.save_checkpoint(self.dirpath / f"batch_end-{trainer.global_step}.ckpt")


def _fit_inside(root: Path, order: str | None, ckpt_path: Path | None = None) -> dict[str, Any]:
    """Fit ``INSIDE_STEPS`` steps; ``order`` places the saver before or after the callback, None saves nothing."""
    L.seed_everything(0 if ckpt_path is None else 123, verbose=False)
    topkast = TopKASTCallback(update_interval=INSIDE_INTERVAL, early_refresh=None, verbose=False)
    callbacks: list[L.Callback] = [topkast]
    if order is not None:
        saver = SaveInsideStep(root / "ckpt")
        callbacks = [saver, topkast] if order == "saver-first" else [topkast, saver]
        callbacks.append(
            ModelCheckpoint(
                dirpath=root / "ckpt",
                filename="model_checkpoint-{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=1,
                save_top_k=-1,
            )
        )
    model = StepMLP()
    trainer = make_trainer(
        root, callbacks, max_steps=INSIDE_STEPS, enable_checkpointing=order is not None, limit_val_batches=0
    )
    trainer.fit(model, dummy_loader(), ckpt_path=ckpt_path)
    return {
        "state_dict": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "topkast": topkast.state_dict(),
    }


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint, checkpoint["callbacks"][TopKASTCallback().state_key]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _fit_inside(tmp_path_factory.mktemp("uninterrupted"), order=None)


@pytest.mark.parametrize("order", ["saver-first", "saver-after"])
def test_every_checkpoint_saved_inside_a_step_holds_a_consistent_state(
    tmp_path: Path, uninterrupted: dict[str, Any], order: str
) -> None:
    final = _fit_inside(tmp_path, order)
    assert_identical(uninterrupted, final, "saving changed the run")  # saving has no side effect

    paths: dict[str, list[Path]] = defaultdict(list)
    for path in sorted((tmp_path / "ckpt").iterdir()):
        paths[path.stem.split("-")[0]].append(path)
    assert {kind: len(found) for kind, found in paths.items()} == {
        "batch_end": INSIDE_STEPS,
        "before_step": INSIDE_STEPS,
        "model_checkpoint": INSIDE_STEPS,
    }
    after_step: dict[int, dict[str, Any]] = {}
    for path in paths["batch_end"] + paths["model_checkpoint"]:
        checkpoint, state = _load(path)
        step = checkpoint["global_step"]
        assert state["steps"] == [step], path.name
        assert state["refreshes"] == step // INSIDE_INTERVAL, path.name
        for name, (a, b) in MLP_SET_SIZES.items():
            saved = state["tensors"][name]
            assert tuple(int(s.sum()) for s in saved_sets(saved)) == (a, b), path.name
            assert torch.equal(checkpoint["state_dict"][name], forward_weights(saved)), path.name
        kept = {key: checkpoint[key] for key in ("state_dict", "optimizer_states")} | {"topkast": state}
        # ModelCheckpoint saves after every other callback's batch-end hook: both files hold the same state
        if step in after_step:
            assert_identical(after_step[step], kept, path.name)
        after_step[step] = kept
    assert sorted(after_step) == list(range(1, INSIDE_STEPS + 1))

    for path in paths["before_step"]:
        checkpoint, state = _load(path)
        step = checkpoint["global_step"]
        # the update of step + 1 is about to run: the counters and sets still describe the state after `step`
        assert state["steps"] == [step], path.name
        assert state["refreshes"] == step // INSIDE_INTERVAL, path.name
        if step:
            assert_identical(after_step[step]["topkast"], state, path.name)
            assert_identical(after_step[step]["optimizer_states"], checkpoint["optimizer_states"], path.name)
        for name in MLP_SET_SIZES:
            saved, weights = state["tensors"][name], checkpoint["state_dict"][name]
            # with the saver after TopKASTCallback, the live parameter holds θ on B at this point (so the update
            # reaches B \ A); the callback still puts α into the checkpoint, which is the sparse model as it is
            assert torch.equal(weights, forward_weights(saved)), path.name


# the model draws its batches from the step, not from the loader, so a loader that cannot resume changes nothing
@pytest.mark.filterwarnings("ignore:.*your dataloader is not resumable")
@pytest.mark.parametrize("order", ["saver-first", "saver-after"])
def test_resuming_from_inside_a_step_reproduces_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict[str, Any], order: str
) -> None:
    _fit_inside(tmp_path, order)
    # every checkpoint saved mid-step, and after a step: the one right after a refresh and one drawn at random
    drawn = random.Random(2020).choice([s for s in range(1, INSIDE_STEPS + 1) if s != INSIDE_INTERVAL])
    names = [f"before_step-{step}" for step in range(INSIDE_STEPS)]
    names += [f"{kind}-{step}" for kind in ("batch_end", "model_checkpoint") for step in (INSIDE_INTERVAL, drawn)]
    for name in names:
        path = tmp_path / "ckpt" / f"{name}.ckpt"
        resumed = _fit_inside(tmp_path / "resumed" / name, order=None, ckpt_path=path)
        assert_identical(uninterrupted, resumed, name)
