"""A training run for ``test_crash_resume.py`` to kill with SIGKILL and resume; it holds no tests.

Usage: ``python crash_worker.py OUT_DIR [--update-interval N] [--optimizer sgd|adamw] [--pause-at STEP]
[--resume CKPT]``. ``--update-interval 0`` trains without the callback (the baseline). The run writes checkpoints
under ``OUT_DIR/ckpt``; with ``--pause-at`` it writes ``OUT_DIR/paused`` once that many optimizer steps are done,
in the middle of the next step, and waits there for the parent's SIGKILL; otherwise it trains to ``STEPS`` and
dumps what the test compares to ``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from conftest import MLP, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_topkast import TopKASTCallback

STEPS = 16
CHECKPOINT_EVERY = 4
BATCH_SIZE = 8
PAUSE_LIMIT_S = 300


class StepMLP(MLP):
    """The conftest MLP fed a batch that is a pure function of the optimizer step.

    Lightning restarts a plain ``DataLoader`` from its first batch when it resumes mid-epoch, so data drawn from the
    loader would differ after a resume for reasons that have nothing to do with Top-KAST.
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000 + self.global_step)
        x = torch.randn(BATCH_SIZE, 8, generator=g)
        y = torch.randint(0, 3, (BATCH_SIZE,), generator=g)
        return nn.functional.cross_entropy(self(x), y)


def dummy_loader() -> DataLoader:
    """Longer than ``max_steps``, so every run, resumed or not, stays in its first epoch."""
    return DataLoader(list(range(4 * STEPS)), batch_size=1)


def dump(trainer: L.Trainer, model: L.LightningModule, callback: TopKASTCallback | None) -> dict[str, Any]:
    """Everything a bit-exact resume must reproduce: weights, optimizer state and the callback's state."""
    return {
        "global_step": trainer.global_step,
        "state_dict": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "topkast": callback.state_dict() if callback else None,
    }


class StartRecorder(L.Callback):
    """Records where a run starts, after the checkpoint (if any) is restored."""

    def __init__(self, callback: TopKASTCallback | None) -> None:
        self.callback = callback
        self.start: dict[str, int | None] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.callback.engine if self.callback else None
        self.start = {"step": trainer.global_step, "refreshes": engine.refreshes if engine else None}


class PauseForKill(L.Callback):
    """Stops the run mid-step, after the callback prepared the parameters, and waits for SIGKILL."""

    def __init__(self, step: int, signal_file: Path) -> None:
        self.step, self.signal_file = step, signal_file

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            partial = self.signal_file.with_suffix(".partial")
            partial.write_text(str(trainer.global_step))
            partial.replace(self.signal_file)  # the parent never reads a half-written step
            deadline = time.monotonic() + PAUSE_LIMIT_S
            while time.monotonic() < deadline:  # the parent's SIGKILL ends this process
                time.sleep(0.05)
            os._exit(3)  # the parent is gone: do not outlive it


def run(
    out: Path,
    update_interval: int,
    optimizer: str,
    pause_at: int | None = None,
    resume: Path | None = None,
    early_refresh: float | None = None,
) -> dict[str, Any]:
    """Train to ``STEPS`` (or until killed at ``pause_at``) and return what the test compares."""
    L.seed_everything(0 if resume is None else 123, verbose=False)  # a resumed run must not rely on its init
    callback = None
    if update_interval:
        callback = TopKASTCallback(update_interval=update_interval, early_refresh=early_refresh, verbose=False)
    recorder = StartRecorder(callback)
    saver = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=CHECKPOINT_EVERY, save_last=True)
    # after TopKASTCallback: the kill lands with θ on B written into the parameters
    pause = PauseForKill(pause_at, out / "paused") if pause_at is not None else None
    model = StepMLP(optimizer=optimizer)
    callbacks = [c for c in (callback, recorder, saver, pause) if c is not None]
    trainer = make_trainer(out, callbacks, max_steps=STEPS, enable_checkpointing=True, limit_val_batches=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reductions in the test's own process and in every worker
    try:
        trainer.fit(model, dummy_loader(), ckpt_path=resume)
    finally:
        torch.set_num_threads(threads)
    return {**dump(trainer, model, callback), "start": recorder.start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--update-interval", type=int, default=3)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--early-refresh", type=float)
    args = parser.parse_args()
    result = run(args.out, args.update_interval, args.optimizer, args.pause_at, args.resume, args.early_refresh)
    torch.save(result, args.out / "final.pt")


if __name__ == "__main__":
    main()
