"""Top-KAST under FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``: two gloo ranks on CPU.

Each rank holds θ and the sets of its own rows only; the sets must still be those of the whole tensors. The fit runs
in a fresh interpreter that executes this file as a script (``python tests/test_fsdp.py OUT MODE``: Lightning
starts the second rank by re-running the command), and every rank writes what it saw to ``OUT``; the tests compare:

- after every optimizer step, the gathered θ against the exact single-process selection of the whole tensors;
- a run resumed from a distributed checkpoint (and from a consolidated one) against the uninterrupted run;
- configurations that are refused before training, with what would work.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import run_script, script_main
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import TopKASTCallback, selection, sharded
from lightning_topkast.kernels import A_BIT, B_BIT

FORWARD_SPARSITY, BACKWARD_SPARSITY = 0.7, 0.4
# rows 13, 5 and 1 over 2 ranks: uneven shards (7 + 6, 3 + 2) and an empty one (1 + 0)
MASKED = {"net.2.weight": (13, 16), "net.4.weight": (5, 13), "net.6.weight": (1, 5)}
SAMPLES, BATCH_SIZE, EPOCHS = 48, 8, 2  # 3 steps an epoch on each rank


class ShardedMLP(L.LightningModule):
    """A regression MLP whose layers ``configure_model`` shards with FSDP2, as a user's module would."""

    def __init__(self, lr: float = 0.05, optimizer: str = "adamw", hsdp: bool = False) -> None:
        super().__init__()
        self.lr, self.optimizer, self.hsdp = lr, optimizer, hsdp
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 13), nn.ReLU(), nn.Linear(13, 5), nn.ReLU(), nn.Linear(5, 1)
        )

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        if self.hsdp:  # 2 replicas of 1 shard: only the sharding dimension's ranks may take part in the sums
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 8, generator=generator)
    y = x[:, :3].sum(1) + 0.1 * torch.randn(SAMPLES, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)


def _whole(engine: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Every masked tensor's θ, set bytes and parameter, gathered whole on every rank (a collective)."""
    out = {}
    for name, t in engine.tensors.items():
        place = t.placement
        assert place is not None, f"{name} is not sharded"
        out[name] = {
            "theta": place.wrap(t.theta).full_tensor(),
            "code": place.wrap(t.code).full_tensor(),
            "param": t.param.full_tensor(),
            "local_rows": t.theta.shape[0],
        }
    return out


class _Operations(TorchDispatchMode):
    """Records the name of every torch operation run inside it."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# operations that read a device value back to the host (a GPU stall) or size their output by the data
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "is_nonzero", "equal")


class Recorder(L.Callback):
    """After every optimizer step: the whole θ, sets and parameters, the engine's counters and its all-reduces."""

    def __init__(self, topkast: TopKASTCallback, out: Path, tag: str) -> None:
        self.topkast, self.out, self.tag = topkast, out, tag
        self.records: list[dict[str, Any]] = []
        self.reduced: list[tuple[int, str]] = []  # (entries, dtype) of each all-reduce since the last step
        summing = sharded.all_reduce

        def counted(values: torch.Tensor, group: Any) -> torch.Tensor:
            self.reduced.append((values.numel(), str(values.dtype)))
            return summing(values, group)

        sharded.all_reduce = counted  # the engine's one way to sum over shards
        self.operations: list[str] = []  # of the engine's step since the last record

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.topkast.engine
        assert engine is not None
        for name in ("before_step", "_after_step"):
            original = getattr(engine, name)

            def watched(*args: Any, original: Any = original) -> Any:
                with _Operations(self.operations):
                    return original(*args)

            setattr(engine, name, watched)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = self.topkast.engine
        assert engine is not None
        reduced, self.reduced = self.reduced, []
        operations, self.operations[:] = list(self.operations), []
        self.records.append(
            {
                "operations": len(operations),
                "syncs": [op for op in operations if any(name in op for name in SYNCING)],
                "all_reduces": reduced,
                "step": trainer.global_step,
                "refreshes": engine.refreshes,
                "early_refreshes": engine.early_refreshes,
                "tensors": _whole(engine),
                "metrics": self.topkast.metrics(),  # a collective under sharding: every rank logs
                "memory_bytes": engine.memory_bytes(),
            }
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.records, self.out / f"{self.tag}-rank{trainer.global_rank}.pt")


class HalfwayCheckpoint(L.Callback):
    """Saves the first epoch's end (every rank takes part: the model's state and θ are sharded)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def _trainer(
    out: Path, callbacks: list, max_epochs: int = EPOCHS, precision: str = "32-true", **strategy: Any
) -> L.Trainer:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return L.Trainer(
        accelerator="cpu",
        precision=precision,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **strategy),
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def _topkast(**kwargs: Any) -> TopKASTCallback:
    arguments: dict[str, Any] = {
        "forward_sparsity": FORWARD_SPARSITY,
        "backward_sparsity": BACKWARD_SPARSITY,
        "verbose": False,
    }
    return TopKASTCallback(**{**arguments, **kwargs})


# --- the runs, one per mode (each in the script's two processes) -----------------------------------------------


def _recorded(out: Path, mode: str, module: ShardedMLP, precision: str = "32-true", **kwargs: Any) -> None:
    topkast = _topkast(**kwargs)
    _trainer(out, [topkast, Recorder(topkast, out, mode)], precision=precision).fit(module, _loader())


def _checkpointed(out: Path, mode: str) -> None:
    """``whole`` saves a checkpoint after its first epoch; ``resumed`` goes on from it."""
    consolidated = os.environ.get("TOPKAST_CONSOLIDATED") == "1"
    topkast = _topkast(update_interval=2)
    trainer = _trainer(out, [topkast, Recorder(topkast, out, mode)], save_distributed_checkpoint=not consolidated)
    if mode == "whole":
        trainer.callbacks.append(HalfwayCheckpoint(out / "half.ckpt"))
    trainer.fit(ShardedMLP(), _loader(), ckpt_path=str(out / "half.ckpt") if mode == "resumed" else None)


def _without_state(out: Path, mode: str) -> None:
    """A checkpoint saved without the callback: refused, or masks from its weights with ``strict_resume=False``."""
    trainer = _trainer(out, [], max_epochs=1)
    trainer.fit(ShardedMLP(), _loader())
    trainer.save_checkpoint(out / "dense.ckpt")
    try:
        _trainer(out, [_topkast()]).fit(ShardedMLP(), _loader(), ckpt_path=str(out / "dense.ckpt"))
    except ValueError as error:
        (out / f"refused-rank{trainer.global_rank}.txt").write_text(str(error))
    topkast = _topkast(strict_resume=False)
    after = _trainer(out, [topkast, Recorder(topkast, out, mode)])
    after.fit(ShardedMLP(), _loader(), ckpt_path=str(out / "dense.ckpt"))


def _tensor_parallel(out: Path, mode: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
        max_epochs=1,
        callbacks=[_topkast()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(ShardedMLP(), _loader())


MODES = {
    # a refresh after every step, AdamW: the sets equal the whole tensors' selection
    "every-step": lambda out, mode: _recorded(out, mode, ShardedMLP()),
    # bf16 weights: θ in bf16, a 15-bit key, 2 histogram rounds
    "bf16-true": lambda out, mode: _recorded(out, mode, ShardedMLP(), precision="bf16-true"),
    "hsdp": lambda out, mode: _recorded(out, mode, ShardedMLP(hsdp=True)),
    # a long interval: refreshes only when the summed early test says so, on both ranks
    "early": lambda out, mode: _recorded(
        out, mode, ShardedMLP(lr=0.2, optimizer="sgd"), update_interval=100, early_refresh=0.0
    ),
    "whole": _checkpointed,
    "resumed": _checkpointed,
    "no-state": _without_state,
    "global": lambda out, mode: _trainer(out, [_topkast(distribution="global")]).fit(ShardedMLP(), _loader()),
    "tensor-parallel": _tensor_parallel,
}


def main(out: Path, mode: str) -> None:
    L.seed_everything(0, verbose=False)
    MODES[mode](out, mode)


def _run(out: Path, mode: str, env: dict[str, str] | None = None, expect_failure: bool = False) -> str:
    """Runs this file as a script in ``mode``; Lightning starts the second rank. Returns the output."""
    proc = run_script(Path(__file__).resolve(), out, mode, env=env)
    output = proc.stdout + proc.stderr
    if expect_failure:
        assert proc.returncode != 0, f"{mode} ran, expected a refusal:\n{output[-3000:]}"
    else:
        assert proc.returncode == 0, f"{mode} failed:\n{output[-6000:]}"
    return output


def _records(out: Path, tag: str) -> list[list[dict[str, Any]]]:
    return [torch.load(out / f"{tag}-rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_exact_selection(tensors: dict[str, dict[str, Any]]) -> None:
    """The gathered sets are the exact top-k of the gathered θ, and the parameters hold α."""
    for name, t in tensors.items():
        a, b = selection.forward_backward_sets(t["theta"], 1 - FORWARD_SPARSITY, 1 - BACKWARD_SPARSITY)
        assert torch.equal((t["code"] & A_BIT) != 0, a), name
        assert torch.equal((t["code"] & B_BIT) != 0, b), name
        assert torch.equal(t["param"], torch.where(a, t["theta"], 0)), name


@pytest.mark.slow
def test_sets_equal_the_whole_tensors_selection_after_every_step(tmp_path: Path) -> None:
    _run(tmp_path, "every-step")
    ranks = _records(tmp_path, "every-step")
    steps = EPOCHS * SAMPLES // (2 * BATCH_SIZE)
    for records in ranks:
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert [r["refreshes"] for r in records] == list(range(1, steps + 1))  # update_interval=1
    # each rank holds its own rows only: 7 + 6, 3 + 2 and 1 + 0 of them
    assert {n: [ranks[r][0]["tensors"][n]["local_rows"] for r in range(2)] for n in MASKED} == {
        "net.2.weight": [7, 6],
        "net.4.weight": [3, 2],
        "net.6.weight": [1, 0],
    }
    # the engine's step (the callback's before_step and the optimizer's post-hook) reads nothing back on either rank
    assert all(r["syncs"] == [] and r["operations"] > 100 for records in ranks for r in records)
    for zero, one in zip(*ranks, strict=True):
        for name in MASKED:
            for key in ("theta", "code", "param"):
                assert torch.equal(zero["tensors"][name][key], one["tensors"][name][key]), (name, key)
        _assert_exact_selection(zero["tensors"])
        # the logged densities are the whole tensors', the same on both ranks; FLOPs are not measured under FSDP2
        assert zero["metrics"].keys() == one["metrics"].keys()
        for key, value in zero["metrics"].items():
            assert value == one["metrics"][key] or (math.isnan(value) and math.isnan(one["metrics"][key])), key
        assert math.isnan(zero["metrics"]["topkast/train_flops_fraction"])
        numel = sum(r * c for r, c in MASKED.values())
        forward = sum(selection.count(1 - FORWARD_SPARSITY, r * c) for r, c in MASKED.values())
        assert zero["metrics"]["topkast/backward_density"] == pytest.approx(
            sum(selection.count(1 - BACKWARD_SPARSITY, r * c) for r, c in MASKED.values()) / numel, abs=1e-12
        )
        assert zero["metrics"]["topkast/forward_density"] <= forward / numel
    # a refresh of the 3 tensors sums, in one all-reduce each: 3 rounds of 11-bit digit histograms (2 queries, A and
    # B, x 2,048 bins per tensor), the tied entries and shard offsets per rank, the splits, the turnover; then the
    # metrics' counts (5 per tensor, float64) that the recorder asks for after the step
    tensors, queries = len(MASKED), 2 * len(MASKED)
    refresh = [(queries * 2048, "torch.int64")] * 3 + [(2 * (queries + tensors), "torch.int64")]
    refresh += [(queries, "torch.int64"), (2 * tensors, "torch.int64")]
    for records in ranks:
        for record in records[1:]:
            assert record["all_reduces"] == [(5 * tensors, "torch.float64"), *refresh], record["step"]
    # the sets moved, so agreement is not that of masks that never change
    for name in MASKED:
        assert len({bytes(r["tensors"][name]["code"].numpy()) for r in ranks[0]}) > 1, name
    # each rank holds 5 bytes per weight of its shard (θ in fp32 and the set bytes), not of the whole tensors
    for r, records in enumerate(ranks):
        held = sum(records[0]["tensors"][n]["local_rows"] * c for n, (_, c) in MASKED.items())
        assert 5 * held <= records[0]["memory_bytes"] < 5 * held + 1024, r  # + thresholds and offsets


@pytest.mark.slow
def test_bf16_weights_keep_bf16_sets_of_the_whole_tensors(tmp_path: Path) -> None:
    _run(tmp_path, "bf16-true")
    zero, one = _records(tmp_path, "bf16-true")
    tensors, queries = len(MASKED), 2 * len(MASKED)
    for first, second in zip(zero, one, strict=True):
        for name in MASKED:
            assert first["tensors"][name]["theta"].dtype == torch.bfloat16
            assert torch.equal(first["tensors"][name]["code"], second["tensors"][name]["code"])
        _assert_exact_selection(first["tensors"])
    refresh = [(queries * 2048, "torch.int64")] * 2 + [(2 * (queries + tensors), "torch.int64")]
    refresh += [(queries, "torch.int64"), (2 * tensors, "torch.int64")]
    assert all(r["all_reduces"] == [(5 * tensors, "torch.float64"), *refresh] for r in zero[1:])
    # 3 bytes per weight held: θ in bf16 and the set byte
    held = sum(zero[0]["tensors"][n]["local_rows"] * c for n, (_, c) in MASKED.items())
    assert 3 * held <= zero[0]["memory_bytes"] < 3 * held + 1024


@pytest.mark.slow
def test_hsdp_sums_over_the_sharding_dimension_only(tmp_path: Path) -> None:
    """Replicas that summed their histograms would count every weight twice and pick other thresholds."""
    _run(tmp_path, "hsdp")
    zero, one = _records(tmp_path, "hsdp")
    for first, second in zip(zero, one, strict=True):
        for name, (rows, _) in MASKED.items():
            assert first["tensors"][name]["local_rows"] == rows  # each replica holds the whole rows
            assert torch.equal(first["tensors"][name]["code"], second["tensors"][name]["code"])
        _assert_exact_selection(first["tensors"])


@pytest.mark.slow
def test_the_early_refresh_fires_on_the_same_steps_on_every_rank(tmp_path: Path) -> None:
    _run(tmp_path, "early")
    zero, one = _records(tmp_path, "early")
    assert [r["refreshes"] for r in zero] == [r["refreshes"] for r in one]
    assert [r["early_refreshes"] for r in zero] == [r["early_refreshes"] for r in one]
    assert zero[-1]["early_refreshes"] > 0  # early_refresh=0.0: one explorer above A's threshold is enough
    assert all(r["syncs"] == [] for r in zero + one)  # the early test's counts are summed, read a step late
    # each step sums the early test's one count per tensor; a refresh adds its 6 all-reduces
    tensors, queries = len(MASKED), 2 * len(MASKED)
    refresh = [(queries * 2048, "torch.int64")] * 3 + [(2 * (queries + tensors), "torch.int64")]
    refresh += [(queries, "torch.int64"), (2 * tensors, "torch.int64")]
    for before, after in itertools.pairwise(zero):
        refreshed = refresh if after["refreshes"] > before["refreshes"] else []
        assert after["all_reduces"] == [(5 * tensors, "torch.float64"), (tensors, "torch.int64"), *refreshed]
    changed = 0
    for before, after in itertools.pairwise(zero):
        for name, t in after["tensors"].items():  # a tensor whose sets moved was refreshed: exactly, as a whole
            if not torch.equal(t["code"] & (A_BIT | B_BIT), before["tensors"][name]["code"] & (A_BIT | B_BIT)):
                _assert_exact_selection({name: t})
                changed += 1
    assert changed > 0


@pytest.mark.slow
@pytest.mark.parametrize("consolidated", [False, True], ids=["distributed", "consolidated"])
def test_a_resumed_sharded_run_ends_identical_to_an_uninterrupted_one(tmp_path: Path, consolidated: bool) -> None:
    env = {"TOPKAST_CONSOLIDATED": "1" if consolidated else "0"}
    for mode in ("whole", "resumed"):
        _run(tmp_path, mode, env)
    assert (tmp_path / "half.ckpt").is_dir() != consolidated  # a distributed checkpoint is a directory
    whole, resumed = _records(tmp_path, "whole")[0], _records(tmp_path, "resumed")[0]
    assert len(resumed) == len(whole) // 2
    assert [r["step"] for r in resumed] == [r["step"] for r in whole[len(whole) - len(resumed) :]]
    for name in MASKED:
        for key in ("theta", "code", "param"):
            assert torch.equal(resumed[-1]["tensors"][name][key], whole[-1]["tensors"][name][key]), (name, key)
    assert resumed[-1]["refreshes"] == whole[-1]["refreshes"]


@pytest.mark.slow
def test_a_checkpoint_without_the_callback_is_refused_or_sparsified(tmp_path: Path) -> None:
    output = _run(tmp_path, "no-state")
    for rank in range(2):
        refused = (tmp_path / f"refused-rank{rank}.txt").read_text()
        assert "cannot resume Top-KAST from this checkpoint: the checkpoint holds no state for" in refused
        assert "Pass TopKASTCallback(strict_resume=False)" in refused
    assert "strict_resume=False: masks computed afresh from the checkpoint's weights" in output
    zero, one = _records(tmp_path, "no-state")
    assert len(zero) == len(one) == SAMPLES // (2 * BATCH_SIZE)  # the second epoch only
    for first, second in zip(zero, one, strict=True):
        _assert_exact_selection(first["tensors"])
        assert all(torch.equal(first["tensors"][n]["code"], second["tensors"][n]["code"]) for n in MASKED)


@pytest.mark.slow
def test_a_global_distribution_over_shards_is_refused(tmp_path: Path) -> None:
    output = _run(tmp_path, "global", expect_failure=True)
    assert "distribution='global' with sharded parameters (net.2.weight, net.4.weight, net.6.weight)" in output
    assert "Use distribution='uniform' or 'erk'" in output


@pytest.mark.slow
def test_tensor_parallelism_is_refused(tmp_path: Path) -> None:
    output = _run(tmp_path, "tensor-parallel", expect_failure=True)
    assert "does not support ModelParallelStrategy(tensor_parallel_size=2)" in output
    assert "Use tensor_parallel_size=1" in output


if __name__ == "__main__":
    script_main(main)
