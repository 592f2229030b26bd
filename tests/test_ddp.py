"""Two gloo processes on CPU: every rank holds the same forward and backward sets after every refresh.

Lightning's ``strategy="ddp"`` launches the other ranks by re-running the command that started rank 0, so the fit
runs in a fresh interpreter that executes this file as a script (``python tests/test_ddp.py OUT``) rather than in
pytest's own process, which would re-run the whole test session on rank 1. Each rank writes what it saw after every
optimizer step to ``OUT/rank<r>.json``; the test compares the ranks afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_topkast import TopKASTCallback

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FORWARD_SPARSITY, BACKWARD_SPARSITY = 0.7, 0.4
# MLP(features=8, hidden=16, classes=3) with the first layer dense masks a 16x16 and a 3x16 weight:
# |A| = round(0.3 * 256) = 77, |B| = round(0.6 * 256) = 154; |A| = round(0.3 * 48) = 14, |B| = round(0.6 * 48) = 29.
EXPECTED_SIZES = {"net.2.weight": (77, 154), "net.4.weight": (14, 29)}
SAMPLES, BATCH_SIZE, EPOCHS = 75, 8, 2  # 75 is not a multiple of 2 * 8: the sampler pads, the last batch is short
STEPS_PER_EPOCH = 5  # ceil(ceil(75 / 2) / 8) batches on each rank
DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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


def main(out: Path) -> None:
    from conftest import MLP, make_loader, make_trainer  # tests/ is sys.path[0] when this file runs as a script

    # Different initial weights on each rank: identical masks must come from the weights DDP broadcasts at setup
    # and the all-reduced gradients, not from identical seeds.
    L.seed_everything(int(os.environ.get("LOCAL_RANK", "0")), verbose=False)
    topkast = TopKASTCallback(
        forward_sparsity=FORWARD_SPARSITY,
        backward_sparsity=BACKWARD_SPARSITY,
        update_interval=1,
        exploration_penalty=1e-3,
        verbose=False,
    )
    trainer = make_trainer(
        out,
        [topkast, MaskRecorder(topkast, out)],
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        use_distributed_sampler=True,
    )
    trainer.fit(MLP(lr=0.5), make_loader(n=SAMPLES, batch_size=BATCH_SIZE))


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_masks_after_every_refresh(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
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


if __name__ == "__main__":
    main(Path(sys.argv[1]))
