"""Shared tiny models, data and a Trainer factory for the test suite."""

from __future__ import annotations

import os
import shutil

# Without a GPU, the device path's Triton kernels run in Triton's interpreter (tests/test_device.py opts in per test).
# It must be on before Triton is imported, and Lightning imports it: hence before every other import.
if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
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


# MLP() under the callback's defaults (first layer dense, sparsities 0.8 and 0.5) masks a 16x16 and a 3x16 weight:
# |A| = round(0.2 * 256) = 51, |B| = round(0.5 * 256) = 128; |A| = round(0.2 * 48) = 10, |B| = round(0.5 * 48) = 24.
MLP_SET_SIZES = {"net.2.weight": (51, 128), "net.4.weight": (10, 24)}


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


def half_up(density: float, n: int) -> int:
    """The size of a set of ``density`` out of ``n``: the float product ``density * n`` rounded half up, by decimal
    arithmetic. The tests' oracle for set sizes, written apart from ``selection.count``.

    Examples:
        >>> [half_up(0.5, 5), half_up(0.25, 10), half_up(0.5, 3), half_up(0.2, 10), half_up(1.0, 7)]
        [3, 3, 2, 2, 7]
    """
    return int(Decimal(density * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def make_engine(
    params: Mapping[str, torch.Tensor] | None = None,
    densities: tuple[float, float] | Mapping[str, tuple[float, float]] = (0.25, 0.5),
    optimizers: list[torch.optim.Optimizer] | None = None,
    **kwargs: Any,
) -> Any:
    """A ``TopKAST`` engine over ``params`` (default: the weight of an ``nn.Linear(16, 8)``, named ``w``).

    ``densities`` is one (D, D + M) for every tensor or one per name; ``optimizers`` are attached; ``kwargs`` go to
    the engine (``update_interval``, ``penalty``, ``global_pool``, ...).
    """
    from lightning_topkast import TopKAST

    params = {"w": nn.Linear(16, 8).weight} if params is None else params
    pairs = dict(densities) if isinstance(densities, Mapping) else dict.fromkeys(params, densities)
    engine = TopKAST(params, pairs, **kwargs)
    if optimizers:
        engine.attach(optimizers)
    return engine


def engine_of(callback: Any) -> Any:
    """The engine a ``TopKASTCallback`` built at fit start (it must have one)."""
    assert callback.engine is not None, "the callback has no engine: fit has not started"
    return callback.engine


def assert_alpha(engine: Any, snapshot: Mapping[str, Any] | None = None) -> None:
    """Every masked parameter holds α = θ on A, exactly 0 elsewhere (NaN where θ is NaN on A); |A| and |B| are
    exact half-up counts (:func:`half_up`); A ⊆ B.

    ``snapshot``: what was recorded earlier, ``{name: {"param", "theta", "A", "B"}}``, or what the parameters held
    alone, ``{name: tensor}`` (a model's state_dict), against the engine's θ and sets; default: the engine as it
    stands. Counts are per tensor, or over the whole pool for tensors ranked together (``distribution="global"``).
    """
    held = {}
    for name, t in engine.tensors.items():
        live = {"param": t.param.detach(), "theta": t.theta, "A": t.forward_set, "B": t.backward_set}
        given = live if snapshot is None else snapshot[name]
        held[name] = {**live, "param": given} if isinstance(given, torch.Tensor) else given
    for name, h in held.items():
        alpha = torch.where(h["A"], h["theta"], 0)
        torch.testing.assert_close(h["param"], alpha, rtol=0, atol=0, equal_nan=True, msg=name)
        assert not bool((h["A"] & ~h["B"]).any()), name
    pool = [name for name, t in engine.tensors.items() if t.in_global_pool]
    units = [[name] for name, t in engine.tensors.items() if not t.in_global_pool] + ([pool] if pool else [])
    for names in units:
        first, numel = engine.tensors[names[0]], sum(engine.tensors[n].numel for n in names)
        assert sum(int(held[n]["A"].sum()) for n in names) == half_up(first.forward_density, numel), names
        assert sum(int(held[n]["B"].sum()) for n in names) == half_up(first.backward_density, numel), names


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


def fit(root: Any, model: L.LightningModule, callbacks: list[L.Callback], data: Any = ..., **kwargs: Any) -> L.Trainer:
    """Fit ``model`` with :func:`make_trainer` (``kwargs`` go to the Trainer, ``ckpt_path`` to ``fit``); returns the
    trainer. ``data``: a loader or a datamodule, None for the model's own dataloaders; default :func:`make_loader`."""
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = make_trainer(root, callbacks, **kwargs)
    trainer.fit(model, make_loader() if data is ... else data, ckpt_path=ckpt_path)
    return trainer


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


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def guaranteed_count(words: str) -> int:
    """The number the README's Guarantees table states before ``words``: the one place the tests' counts come from."""
    table = README[README.index("## Guarantees") : README.index("## Limits")]
    found = re.findall(rf"(\d+) {re.escape(words)}", table)
    assert len(found) == 1, (words, found)
    return int(found[0])


@pytest.fixture
def optimizer_steps() -> Iterator[list[object]]:
    """Every optimizer step taken during the test, by any optimizer (a global torch step post-hook, removed after)."""
    taken: list[object] = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: taken.append(opt))
    yield taken
    handle.remove()


@pytest.fixture(autouse=True)
def _seed() -> None:
    L.seed_everything(0, verbose=False)


# --- test files run as scripts in fresh interpreters (multi-process runs) ------------------------------------------

DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TESTS = Path(__file__).resolve().parent


def script_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a test file run as a script: this process's distributed variables dropped (Lightning's
    launcher sets its own), the checkout and ``tests/`` importable, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV} | dict(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), str(TESTS), env.get("PYTHONPATH")]))
    return env


def script_main(main: Callable[[Path, str], None]) -> None:
    """Runs a test file's ``main(OUT, MODE)`` from its command line on this rank, then ends the process group.

    A gloo group left for interpreter exit can abort there ("terminate called without an active exception"), and
    the exit status, not the run, would fail the test.
    """
    try:
        main(Path(sys.argv[1]), sys.argv[2])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_script(
    script: Path, out: Path, *args: str, env: Mapping[str, str] | None = None, timeout: int = 240
) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT OUT ARGS...`` in ``out``, with :func:`script_env`; Lightning starts any other rank."""
    return subprocess.run(
        [sys.executable, str(script), str(out), *args],
        cwd=out,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
