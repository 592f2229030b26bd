"""Top-KAST on the KJV character LM over 2 CPU ranks: FSDP2 shards (``ModelParallelStrategy``) beside DDP replicas.

    python benchmarks/sharded_lm.py --steps 1000          # both strategies, then the table; JSON to results/

The same run twice, on 2 gloo ranks of this machine: ``TopKASTCallback()`` at its defaults (80/50, a refresh every
step, AdamW with the decoupled penalty) on :mod:`common`'s character Transformer (the accuracy grid's text model),
global batch 16 x 64 characters (8 per rank), bf16 autocast, gradients clipped at 1.0, one seed. Under DDP each rank
holds every weight and its own θ and sets; under FSDP2 each holds the rows of its shard, and the sets are selected
for the whole tensors by summed histograms (:mod:`lightning_topkast.sharded`). The table gives validation bits per
character (the whole validation split), the masked density, the callback's bytes per rank and the wall time.
The data order and the initial weights are the same in both; the numbers differ only by the order in which the
strategies sum gradients (reduce-scatter against all-reduce) and by where each rank's sets live.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import data

from lightning_topkast import TopKASTCallback

RESULTS = Path(__file__).resolve().parent / "results" / "sharded_lm.json"
MODEL = {"d_model": 128, "n_layers": 2, "n_heads": 4, "context": 64}  # the accuracy grid's text model
PER_RANK_BATCH, LR, CLIP, SEED = 8, 1e-2, 1.0, 0


class ShardedCharLM(common.CharLM):
    """The same module, its blocks and the whole sharded by FSDP2 in ``configure_model``, as a user writes it."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class ClipGradients(L.Callback):
    """Clipping after the callback masks the gradients (Lightning's own refuses a fused optimizer under bf16)."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), CLIP)


class Memory(L.Callback):
    """The callback's bytes on this rank, and the masked weights this rank holds, at the end of the fit."""

    def __init__(self, topkast: TopKASTCallback) -> None:
        self.topkast, self.bytes, self.held = topkast, 0, 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.topkast.engine
        assert engine is not None
        self.bytes = engine.memory_bytes()
        self.held = sum(t.numel for t in engine.tensors.values())


def run(strategy: str, steps: int, out: Path, data_dir: str | None) -> None:
    """One fit on 2 ranks (Lightning starts the second by re-running this command); rank 0 writes ``out``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    quiet = (".*does not have many workers.*", ".*GPU available.*", ".*LeafSpec.*", ".*returned a view tensor.*")
    for pattern in quiet:
        warnings.filterwarnings("ignore", pattern)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    splits = data.kjv(data_dir)
    L.seed_everything(SEED, verbose=False)
    kind = ShardedCharLM if strategy == "fsdp2" else common.CharLM
    module = kind(len(splits.vocab), total_steps=steps, lr=LR, fused=True, **MODEL)
    topkast = TopKASTCallback(verbose=False)
    memory = Memory(topkast)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp",
        precision="bf16-mixed",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[topkast, ClipGradients(), memory],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    windows = TensorDataset(common.sequence_windows(splits.train, MODEL["context"]))
    start = time.perf_counter()
    trainer.fit(module, DataLoader(windows, batch_size=PER_RANK_BATCH, shuffle=True, drop_last=True))
    seconds = time.perf_counter() - start
    bits = module.evaluate(splits.val)  # every rank runs it: FSDP2 gathers each block's weights as it goes
    density = _density(topkast)  # a collective under FSDP2: the counts are summed over the ranks
    if trainer.global_rank == 0:
        record = {
            "strategy": strategy,
            "steps": trainer.global_step,
            "val_bits": bits,
            "masked_density": density,
            "callback_bytes_rank0": memory.bytes,
            "masked_weights_rank0": memory.held,
            "masked_weights": sum(t.total for t in topkast.engine.tensors.values()),  # type: ignore[union-attr]
            "refreshes": topkast.engine.refreshes,  # type: ignore[union-attr]
            "wall_seconds": seconds,
            "fused_adamw": True,
        }
        out.write_text(json.dumps(record))


def _density(topkast: TopKASTCallback) -> float:
    return topkast.metrics()["topkast/forward_density"]


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | val bits/char | masked density | callback bytes on rank 0 (per masked weight held there) | "
        "masked weights on rank 0 / in all | refreshes | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        per = r["callback_bytes_rank0"] / max(r["masked_weights_rank0"], 1)
        lines.append(
            f"| {r['strategy']} | {r['val_bits']:.3f} | {r['masked_density']:.3f} | {r['callback_bytes_rank0']:,} "
            f"({per:.2f}) | {r['masked_weights_rank0']:,} / {r['masked_weights']:,} | {r['refreshes']} | "
            f"{r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--run", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)  # one fit (internal)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        run(args.run, args.steps, args.out, args.data_dir)
        return
    started = common.provenance()
    runs = []
    for strategy in ("ddp", "fsdp2"):
        out = args.json.with_name(f".sharded_lm_{strategy}.json")
        command = [sys.executable, str(Path(__file__).resolve()), "--run", strategy, "--steps", str(args.steps)]
        command += ["--out", str(out)] + (["--data-dir", args.data_dir] if args.data_dir else [])
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        subprocess.run(command, check=True, env=env)
        runs.append(json.loads(out.read_text()))
        out.unlink()
        print(table(runs), flush=True)
    common.write_json(args.json, {"steps": args.steps, "runs": runs, "model": MODEL, "lr": LR}, started)


if __name__ == "__main__":
    main()
