"""Two gloo processes on CPU: every rank holds the same forward and backward sets after every refresh, and the same
masks and weights as one process that takes the whole global batch.

Lightning's ``strategy="ddp"`` launches the other ranks by re-running the command that started rank 0, so the fit
runs in a fresh interpreter that executes this file as a script (``python tests/test_ddp.py OUT``) rather than in
pytest's own process, which would re-run the whole test session on rank 1. Each rank writes what it saw after every
optimizer step to ``OUT/rank<r>.json`` (``OUT/equivalence-rank<r>.pt`` for the comparison with one process); the
test compares the ranks afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import engine_of, run_script, script_main
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_topkast import TopKASTCallback

FORWARD_SPARSITY, BACKWARD_SPARSITY = 0.7, 0.4
# MLP(features=8, hidden=16, classes=3) with the first layer dense masks a 16x16 and a 3x16 weight:
# |A| = round(0.3 * 256) = 77, |B| = round(0.6 * 256) = 154; |A| = round(0.3 * 48) = 14, |B| = round(0.6 * 48) = 29.
EXPECTED_SIZES = {"net.2.weight": (77, 154), "net.4.weight": (14, 29)}
SAMPLES, BATCH_SIZE, EPOCHS = 75, 8, 2  # 75 is not a multiple of 2 * 8: the sampler pads, the last batch is short
STEPS_PER_EPOCH = 5  # ceil(ceil(75 / 2) / 8) batches on each rank
# Equivalence with one process: the global batch of 16 is split by DistributedSampler(shuffle=False) into 8 per rank.
# 72 = 4 * 16 + 8: every epoch ends on a short batch (4 per rank, 8 for one process), and 72 is even, so the sampler
# pads nothing: both ranks together see exactly the samples the single process sees, step by step.
EQ_SAMPLES, EQ_GLOBAL_BATCH, EQ_EPOCHS = 72, 16, 2
EQ_BATCH_SIZES = [8, 8, 8, 8, 4]  # per rank, each epoch
EQ_STEPS = EQ_EPOCHS * len(EQ_BATCH_SIZES)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class MaskRecorder(L.Callback):
    """After every optimizer step, records digests and sizes of each rank's A, B, θ and parameters."""

    def __init__(self, topkast: TopKASTCallback, out: Path) -> None:
        self.topkast, self.out = topkast, out
        self.records: list[dict[str, Any]] = []
        self.batches: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(_digest(batch[0]))
        self._record(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        payload = {"world_size": trainer.world_size, "records": self.records, "batches": self.batches}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.topkast.engine
        assert engine is not None
        tensors, sets = {}, []
        for name, t in engine.tensors.items():
            param = pl_module.get_parameter(name)
            tensors[name] = {
                "A": _digest(t.forward_set),
                "B": _digest(t.backward_set),
                "theta": _digest(t.theta),
                "param": _digest(param),
                "a": int(t.forward_set.sum()),
                "b": int(t.backward_set.sum()),
                "nonzero": int(torch.count_nonzero(param)),
                "a_in_b": bool((t.forward_set <= t.backward_set).all()),
            }
            sets += [t.forward_set.flatten(), t.backward_set.flatten()]
        # The masks of all ranks, gathered in-process: every row must equal rank 0's.
        gathered = trainer.strategy.all_gather(torch.cat(sets).to(torch.int32))
        self.records.append(
            {
                "global_step": trainer.global_step,
                "engine_steps": list(engine.steps),
                "refreshes": engine.refreshes,
                "gathered_equal": bool((gathered == gathered[0]).all()),
                "gathered_rows": int(gathered.shape[0]),
                "tensors": tensors,
            }
        )


class RefreshLog(L.Callback):
    """At every refresh, gathers each rank's digest of all masks and keeps A, B and θ; at the end, the final state.

    The digest is gathered inside the refresh itself (a listener called from the optimizer's step post-hook), so
    every refresh is checked, and on every rank; the listener is a collective that all ranks reach in step.
    """

    def __init__(self, topkast: TopKASTCallback, out: Path, prefix: str) -> None:
        self.topkast, self.out, self.prefix = topkast, out, prefix
        self.gathered: list[list[str]] = []
        self.refreshes: list[dict[str, torch.Tensor]] = []
        self.batches: list[list[str]] = []  # sorted digests of the rows of each batch this rank saw

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine_of(self.topkast).refresh_listeners.append(lambda moved: self._on_refresh(trainer))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(sorted(_digest(row) for row in batch[0]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = {f"param/{name}": p.detach().clone() for name, p in pl_module.named_parameters()}
        final.update(self._sets())
        engine = engine_of(self.topkast)
        payload = {
            "gathered": self.gathered,
            "refreshes": self.refreshes,
            "batches": self.batches,
            "final": final,
            "counters": [engine.refreshes, engine.early_refreshes],
        }
        torch.save(payload, self.out / f"{self.prefix}{trainer.global_rank}.pt")

    def _sets(self) -> dict[str, torch.Tensor]:
        sets = {}
        for name, t in engine_of(self.topkast).tensors.items():
            sets.update({f"A/{name}": t.forward_set.clone(), f"B/{name}": t.backward_set.clone()})
            sets[f"theta/{name}"] = t.theta.clone()
        return sets

    def _on_refresh(self, trainer: L.Trainer) -> None:
        tensors = engine_of(self.topkast).tensors.values()
        digest = _digest(torch.cat([torch.cat([t.forward_set.flatten(), t.backward_set.flatten()]) for t in tensors]))
        gathered: list[Any] = [digest]
        if torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, digest)
        self.gathered.append(gathered)
        self.refreshes.append(self._sets())


class GlobalBatch(L.LightningDataModule):
    """Each global batch of ``EQ_GLOBAL_BATCH`` in order, split by DistributedSampler(shuffle=False) over the ranks."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank  # known once the processes are up
        sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=EQ_GLOBAL_BATCH // world, sampler=sampler)


def refresh_every_step() -> TopKASTCallback:
    """The callback both DDP scripts train with: a refresh at every step, so every step can disagree."""
    return TopKASTCallback(
        forward_sparsity=FORWARD_SPARSITY,
        backward_sparsity=BACKWARD_SPARSITY,
        update_interval=1,
        exploration_penalty=1e-3,
        verbose=False,
    )


def fit_global_batch(out: Path, devices: int, prefix: str) -> None:
    """Top-KAST on the global batch of ``EQ_GLOBAL_BATCH``, split over ``devices`` processes; see ``RefreshLog``."""
    from conftest import MLP, make_loader, make_trainer  # tests/ is sys.path[0] when this file runs as a script

    # rank 1 starts from other weights: DDP's broadcast at setup must make them rank 0's, i.e. the single run's
    L.seed_everything(int(os.environ.get("LOCAL_RANK", "0")), verbose=False)
    topkast = refresh_every_step()
    ddp: dict[str, Any] = {"strategy": "ddp"} if devices > 1 else {}
    trainer = make_trainer(
        out,
        [topkast, RefreshLog(topkast, out, prefix)],
        devices=devices,
        max_epochs=EQ_EPOCHS,
        use_distributed_sampler=False,  # Lightning always shuffles the sampler it adds for training data
        **ddp,
    )
    # the MLP's loss is a mean over the batch and DDP averages the ranks' gradients: the same mean over 16 samples
    trainer.fit(MLP(lr=0.2), datamodule=GlobalBatch(make_loader(n=EQ_SAMPLES).dataset))


def main(out: Path, mode: str) -> None:
    from conftest import MLP, make_loader, make_trainer  # tests/ is sys.path[0] when this file runs as a script

    if mode == "equivalence":
        fit_global_batch(out, devices=2, prefix="equivalence-rank")
        return
    if mode == "forward-order":
        from test_forward_order import HeadFirstLM, tokens

        L.seed_everything(int(os.environ.get("LOCAL_RANK", "0")), verbose=False)
        topkast = TopKASTCallback(verbose=False)
        trainer = make_trainer(out, [topkast], devices=2, strategy="ddp", max_steps=3)
        trainer.fit(HeadFirstLM(), tokens())
        engine = engine_of(topkast)
        found = {
            "forward_order": topkast.forward_order,
            "masked": list(engine.tensors),
            "kept_dense": topkast.kept_dense,
            "digests": {name: [_digest(t.theta), _digest(t.code)] for name, t in engine.tensors.items()},
        }
        (out / f"forward-order-rank{trainer.global_rank}.json").write_text(json.dumps(found))
        return
    if mode == "early":
        # refreshes only when a rank's θ says so: the early-refresh test runs on each rank without communication
        L.seed_everything(int(os.environ.get("LOCAL_RANK", "0")), verbose=False)
        topkast = TopKASTCallback(
            forward_sparsity=FORWARD_SPARSITY,
            backward_sparsity=BACKWARD_SPARSITY,
            update_interval=EPOCHS * STEPS_PER_EPOCH,
            early_refresh=0.0,
            verbose=False,
        )
        trainer = make_trainer(
            out, [topkast, RefreshLog(topkast, out, "early-rank")], devices=2, strategy="ddp", max_epochs=EPOCHS
        )
        trainer.fit(MLP(lr=0.5), make_loader(n=SAMPLES, batch_size=BATCH_SIZE))
        return
    # Different initial weights on each rank: identical masks must come from the weights DDP broadcasts at setup
    # and the all-reduced gradients, not from identical seeds.
    L.seed_everything(int(os.environ.get("LOCAL_RANK", "0")), verbose=False)
    topkast = refresh_every_step()
    trainer = make_trainer(
        out,
        [topkast, MaskRecorder(topkast, out)],
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        use_distributed_sampler=True,
    )
    trainer.fit(MLP(lr=0.5), make_loader(n=SAMPLES, batch_size=BATCH_SIZE))


def _run_ranks(out: Path, mode: str) -> None:
    """Runs this file as a script in ``mode`` (``masks`` or ``equivalence``); Lightning starts the second rank."""
    proc = run_script(Path(__file__).resolve(), out, mode, timeout=180)
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_masks_after_every_refresh(tmp_path: Path) -> None:
    _run_ranks(tmp_path, "masks")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    steps = EPOCHS * STEPS_PER_EPOCH
    for rank in ranks:
        assert rank["world_size"] == 2
        records = rank["records"]
        assert [r["global_step"] for r in records] == list(range(steps + 1))
        assert [r["engine_steps"] for r in records] == [[s] for s in range(steps + 1)]
        # update_interval=1: one refresh after every optimizer step, on top of the selection at fit start.
        assert [r["refreshes"] - records[0]["refreshes"] for r in records] == list(range(steps + 1))
        for record in records:
            assert record["gathered_rows"] == 2
            assert record["gathered_equal"], f"ranks gathered different masks at step {record['global_step']}"
            assert set(record["tensors"]) == set(EXPECTED_SIZES)
            for name, t in record["tensors"].items():
                assert (t["a"], t["b"]) == EXPECTED_SIZES[name], (name, record["global_step"])
                assert t["nonzero"] == t["a"], (name, record["global_step"])
                assert t["a_in_b"], (name, record["global_step"])

    # Same digests of A, B, θ and the forward weights on both ranks at every step.
    assert [r["tensors"] for r in ranks[0]["records"]] == [r["tensors"] for r in ranks[1]["records"]]
    # The ranks really saw different batches (so agreement comes from DDP's gradient all-reduce) ...
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == steps
    assert all(a != b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True))
    # ... and the refreshes really moved the forward sets, so agreement is not that of masks that never change.
    for name in EXPECTED_SIZES:
        assert len({r["tensors"][name]["A"] for r in ranks[0]["records"]}) > 1, name


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    _run_ranks(tmp_path, "equivalence")
    ranks = [torch.load(tmp_path / f"equivalence-rank{r}.pt", weights_only=True) for r in range(2)]
    (tmp_path / "single").mkdir()
    fit_global_batch(tmp_path / "single", devices=1, prefix="single")
    single = torch.load(tmp_path / "single" / "single0.pt", weights_only=True)

    # The ranks split each global batch between them, with nothing padded or repeated; each epoch ends short.
    assert len(single["batches"]) == EQ_STEPS
    assert [len(b) for b in single["batches"]] == [2 * n for n in EQ_BATCH_SIZES] * EQ_EPOCHS
    for step, (zero, one, alone) in enumerate(zip(*(r["batches"] for r in ranks), single["batches"], strict=True)):
        assert len(zero) == len(one) == EQ_BATCH_SIZES[step % len(EQ_BATCH_SIZES)], step
        assert not set(zero) & set(one), step
        assert sorted(zero + one) == alone, step

    # At every refresh (update_interval=1: one per step), both ranks gathered the same two digests, and they are
    # the digest of the single process's masks at its refresh of the same step.
    assert len(single["gathered"]) == EQ_STEPS
    for rank in ranks:
        assert len(rank["gathered"]) == EQ_STEPS
        for step, (gathered, alone) in enumerate(zip(rank["gathered"], single["gathered"], strict=True), start=1):
            assert gathered == alone * 2, step
    assert len(set(single["gathered"][0] + single["gathered"][-1])) == 2  # the masks did change over the run

    # Masks equal exactly at every refresh and at the end; θ and the weights only up to float rounding: DDP sums
    # two per-rank means of 8 gradients and halves the sum, one process takes the mean of 16, and float addition is
    # not associative (about 1e-7 apart after 10 steps here). Exact masks need every top-k boundary of |θ| to be
    # farther apart than that, checked below for this data and seed.
    states = [*zip(ranks[0]["refreshes"], ranks[1]["refreshes"], single["refreshes"], strict=True)]
    states.append((ranks[0]["final"], ranks[1]["final"], single["final"]))
    assert len(states) == EQ_STEPS + 1
    largest_difference, smallest_gap = 0.0, math.inf
    for step, (zero, one, alone) in enumerate(states, start=1):
        assert zero.keys() == one.keys() == alone.keys(), step
        for key, value in alone.items():
            assert torch.equal(zero[key], one[key]), (step, key)  # the ranks agree bit for bit
            if value.dtype == torch.bool:
                assert torch.equal(zero[key], value), (step, key)
            else:
                torch.testing.assert_close(zero[key], value, rtol=0, atol=5e-7, msg=f"step {step}: {key}")
                largest_difference = max(largest_difference, float((zero[key] - value).abs().max()))
        for name, sizes in EXPECTED_SIZES.items():
            smallest_gap = min(smallest_gap, *(_boundary_gap(alone[f"theta/{name}"], k) for k in sizes))
    # no magnitude tie within rounding at any refresh, so exact mask equality is what correct DDP must give
    assert smallest_gap > 10 * largest_difference


@pytest.mark.slow
def test_two_gloo_ranks_agree_on_every_early_refresh(tmp_path: Path) -> None:
    """The early-refresh test reads θ only: each rank decides alone, and both refresh at the same steps."""
    _run_ranks(tmp_path, "early")
    ranks = [torch.load(tmp_path / f"early-rank{r}.pt", weights_only=True) for r in range(2)]
    refreshes, early = ranks[0]["counters"]
    assert ranks[1]["counters"] == [refreshes, early]
    assert 0 < early == refreshes < EPOCHS * STEPS_PER_EPOCH  # the rule chose the steps, and not all of them
    assert len(ranks[0]["gathered"]) == len(ranks[1]["gathered"]) == refreshes
    for gathered in ranks[0]["gathered"] + ranks[1]["gathered"]:
        assert gathered[0] == gathered[1]  # both ranks' masks at that refresh, gathered by both
    assert ranks[0]["gathered"] == ranks[1]["gathered"]


def _boundary_gap(theta: torch.Tensor, k: int) -> float:
    """The gap between the ``k``-th and the ``k + 1``-th largest |θ|: how far the top-k is from changing."""
    magnitudes = theta.abs().flatten().sort(descending=True).values
    return float(magnitudes[k - 1] - magnitudes[k])


if __name__ == "__main__":
    script_main(main)


@pytest.mark.slow
def test_two_gloo_ranks_find_the_same_forward_order_and_move_the_same_masks(tmp_path: Path) -> None:
    # DDP's and Lightning's wrappers run the module's forward inside their own: neither counts as a use
    _run_ranks(tmp_path, "forward-order")
    ranks = [json.loads((tmp_path / f"forward-order-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["forward_order"] == ["wte.weight", "block.0.weight", "block.2.weight", "lm_head.weight"]
    assert ranks[0]["masked"] == ["lm_head.weight", "block.0.weight", "block.2.weight"]
    assert ranks[0]["kept_dense"] == {"wte.weight": "first layer in the forward pass (dense_first_layer=True)"}
