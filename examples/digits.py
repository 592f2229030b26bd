"""Train a classifier on scikit-learn's handwritten digits with Top-KAST, from a LightningCLI YAML.

    python examples/digits.py fit --config examples/digits_topkast.yaml

The data (1,797 real 8x8 scans) ships inside scikit-learn, so this runs offline. The module below knows nothing of
sparsity: the callback named in the YAML makes it train sparse.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_topkast import TopKASTCallback


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits, scaled to [0, 1]; a fixed 80/20 split."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        cut = int(0.8 * len(y))
        self.train_set = TensorDataset(x[order[:cut]], y[order[:cut]])
        self.val_set = TensorDataset(x[order[cut:]], y[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(L.LightningModule):
    """A plain MLP; nothing in it is about sparsity."""

    def __init__(self, hidden: int = 256, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)


class DigitsCLI(LightningCLI):
    """LightningCLI that reports the outcome of the run."""

    def after_fit(self) -> None:
        callbacks = [cb for cb in self.trainer.callbacks if isinstance(cb, TopKASTCallback)]
        if callbacks and self.trainer.is_global_zero:
            metrics = callbacks[0].metrics()
            print(
                f"\nfinal forward density {metrics['topkast/forward_density']:.4f} "
                f"(target {metrics['topkast/forward_density_target']:.4f}), "
                f"backward density {metrics['topkast/backward_density']:.4f}, "
                f"ever active {metrics['topkast/exploration']:.4f}"
            )
        # validate the final model: its parameters hold the sparse forward weights, no callback needed
        (result,) = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if self.trainer.is_global_zero:
            print(f"validation accuracy of the {'sparse' if callbacks else 'dense'} model {result['val_acc']:.4f}")


def main(args: list[str] | None = None) -> DigitsCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests pass it)."""
    return DigitsCLI(
        DigitsClassifier,
        DigitsDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},  # reruns of the example may share a log directory
        args=args,
    )


if __name__ == "__main__":
    main()
