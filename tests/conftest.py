"""Shared tiny models, data and a Trainer factory for the test suite."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def make_loader(n: int = 64, features: int = 8, classes: int = 3, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """A fixed, learnable classification set: labels from a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class MLP(L.LightningModule):
    """Three Linear layers; the first is kept dense by default, so two tensors are masked."""

    def __init__(
        self, features: int = 8, hidden: int = 16, classes: int = 3, optimizer: str = "sgd", lr: float = 0.1
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )
        self.optimizer, self.lr = optimizer, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer in ("adamw", "adamw-fused"):  # fused: one kernel per tensor, torch's fast path on CPU
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, fused=self.optimizer != "adamw")
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-2)


def saved_sets(saved: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward and backward sets of one tensor's checkpointed state (one byte per weight: bit 1 A, bit 0 B)."""
    code = saved["code"]
    return (code & 2) != 0, (code & 1) != 0


def make_trainer(tmp_path: Any, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer writing under ``tmp_path``; ``kwargs`` override the defaults."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


@pytest.fixture(autouse=True)
def _seed() -> None:
    L.seed_everything(0, verbose=False)
