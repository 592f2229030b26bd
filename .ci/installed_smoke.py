"""CI: a few training steps from an installed wheel, run from outside the checkout (see .ci/run).

Fails unless ``lightning_topkast`` is imported from the venv's site-packages, its wheel carries the LICENSE, and the
C kernels compiled from the installed sources into a fresh cache train the masked layers.
"""

import os
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_topkast
from lightning_topkast import TopKASTCallback, kernels

site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(lightning_topkast.__file__).resolve()
assert where.is_relative_to(site), f"lightning_topkast imported from {where}, not from {site}"
licenses = [f for f in metadata.files("lightning-topkast") if f.name == "LICENSE"]
assert licenses, "the installed wheel carries no LICENSE"
assert "Apache License" in licenses[0].read_text()
cache = Path(os.environ["LIGHTNING_TOPKAST_CACHE"])
assert not cache.exists() or not any(cache.iterdir()), f"{cache} must start empty"


class Net(L.LightningModule):
    """Three Linear layers: the callback masks the last two."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        """Cross-entropy of the batch."""
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        """SGD with momentum."""
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


torch.manual_seed(0)
x = torch.randn(64, 8)
data = DataLoader(TensorDataset(x, (x @ torch.randn(8, 3)).argmax(1)), batch_size=16)
topkast = TopKASTCallback(verbose=False)
quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
trainer = L.Trainer(callbacks=[topkast], max_steps=3, accelerator="cpu", **quiet)
model = Net()
trainer.fit(model, data)
engine = topkast.engine
assert engine is not None, "the callback built no engine"
assert engine.steps == [3], engine.steps
assert all(isinstance(t.kernels, kernels.CKernels) for t in engine.tensors.values()), "the C kernels did not build"
assert [p.name for p in cache.iterdir() if p.suffix == ".so"], f"nothing compiled into {cache}"
for name, t in engine.tensors.items():
    assert int(torch.count_nonzero(t.param)) == round(0.2 * t.numel), name
print(f"installed lightning_topkast trained 3 steps from {where.parent} (python {sys.version.split()[0]})")
