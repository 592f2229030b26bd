"""Shared tiny models, data and a Trainer factory for the test suite."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread unless the caller chose: the test models are tiny, so their steps are many small kernels, and
# two OpenMP threads on a 2-core machine that another process shares spin and wait (measured: the fast lane took 89 s
# with two threads and 38 s with one while a benchmark held a core). Subprocesses (DDP ranks, crash workers) inherit.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The CUDA path (sync_free, a real GradScaler) runs where a GPU is: CI has none, so these cases show as skipped there.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ACCELERATORS = ["cpu", pytest.param("gpu", marks=[needs_cuda, pytest.mark.cuda])]


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


class GAN(L.LightningModule):
    """Manual optimization with two optimizers, noise drawn inside the step: the discriminator steps on every batch,
    the generator on every ``generator_every``-th. ``discriminator`` builds the discriminator (after the generator,
    so the initialisation draws in the same order); ``optimizers`` maps the generator's and the discriminator's
    parameters to the two optimizers (default: SGD at lr 0.1 and SGD at its default lr)."""

    def __init__(
        self,
        discriminator: Callable[[], nn.Module] | None = None,
        optimizers: Callable[[Any, Any], list[torch.optim.Optimizer]] | None = None,
        generator_every: int = 1,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = (
            discriminator() if discriminator else nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        )
        self.make_optimizers = optimizers or (lambda g, d: [torch.optim.SGD(g, lr=0.1), torch.optim.SGD(d)])
        self.generator_every = generator_every

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(torch.randn(real.shape[0], 4))
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
        d_loss = d_loss + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        if batch_idx % self.generator_every == 0:
            g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.make_optimizers(self.generator.parameters(), self.discriminator.parameters())


def saved_sets(saved: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward and backward sets of one tensor's checkpointed state (one byte per weight: bit 1 A, bit 0 B)."""
    code = saved["code"]
    return (code & 2) != 0, (code & 1) != 0


class RNGState(L.Callback):
    """Keeps torch's global RNG state in checkpoints: Lightning does not, and dropout needs it to resume bit-exactly.

    Restored on load, before the training data's iterator draws its seed: the same point in the stream as in the
    uninterrupted run when the data itself draws nothing.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])


def assert_alpha(engine: Any) -> None:
    """Every masked parameter holds α = θ on A, exactly 0 elsewhere; |A| and |B| are exact counts; A ⊆ B.

    Counts are per tensor, or over the whole pool for tensors ranked together (``distribution="global"``).
    """
    from lightning_topkast.selection import count

    pool = [t for t in engine.tensors.values() if t.in_global_pool]
    for name, t in engine.tensors.items():
        alpha = torch.where(t.forward_set, t.theta, 0)
        torch.testing.assert_close(t.param.detach(), alpha, rtol=0, atol=0, equal_nan=True, msg=name)
        assert not bool((t.forward_set & ~t.backward_set).any()), name
        if not t.in_global_pool:
            assert int(t.forward_set.sum()) == count(t.forward_density, t.numel), name
            assert int(t.backward_set.sum()) == count(t.backward_density, t.numel), name
    if pool:
        numel = sum(t.numel for t in pool)
        assert sum(int(t.forward_set.sum()) for t in pool) == count(pool[0].forward_density, numel)
        assert sum(int(t.backward_set.sum()) for t in pool) == count(pool[0].backward_density, numel)


def bit_exact(a: object, b: object) -> bool:
    """Equal bits: tensors of one dtype and shape whose bytes match (NaN equals NaN, -0.0 differs from 0.0), and
    tuples, lists and dicts of them item by item; anything else by ``==``."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        bits = (lambda t: t.reshape(-1).view(torch.uint8)) if a.is_floating_point() else (lambda t: t)
        return torch.equal(bits(a), bits(b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(bit_exact(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(bit_exact(a[k], b[k]) for k in a)
    return a == b


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


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file, read with the protobuf classes that wandb ships.

    A ``.wandb`` file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by a LevelDB-style log:
    32 KiB blocks of chunks, each with a 7-byte header (crc32, little-endian length, type 1 full / 2 first /
    3 middle / 4 last); a block tail shorter than a chunk header is zero padding. Each full record is a
    ``wandb_internal_pb2.Record``. A chunk not yet completely written ends the list.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes() if path.exists() else b"", 32 * 1024
    if len(data) < 7:
        return []
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(path: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """History rows of a finished offline run; waits for its ``exit`` record.

    ``Run.finish()`` can return before the wandb-core service has written the whole run file (seen with wandb 0.31
    offline: a 7-byte file right after ``finish()``, complete a moment later), so poll until the run's last record.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.05)
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def wandb_config(path: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The run config of a finished offline run, merged from its ``config`` records."""
    wandb_history(path, timeout)  # waits for the exit record
    config: dict[str, Any] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Notebooks (nbmake, a kernel subprocess each) join the slow lane: ``pytest -m "not slow"`` skips them."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed() -> None:
    L.seed_everything(0, verbose=False)
