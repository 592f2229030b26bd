"""File size of ``save_sparse`` against the dense ``safetensors`` checkpoint of the benchmark models.

    python benchmarks/export_size.py --json benchmarks/results/export_size.json

Each model (the accuracy benchmark's CNN and character Transformer) trains 30 steps with Top-KAST on synthetic
batches of the real shapes (the sizes depend on the masks' shapes and counts, not on the data), then is exported
with ``save_sparse(model, path, masks=callback)``; the loaded state_dict is checked equal to the model's. The
callback masks the tensors every benchmark method masks (``common.BenchmarkTopKAST``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import load_sparse, save_sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

STEPS = 30
PAIRS = [(0.8, 0.5), (0.9, 0.8), (0.95, 0.9)]


def model_and_data(name: str) -> tuple[L.LightningModule, DataLoader]:
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        data = TensorDataset(
            torch.randn(STEPS * 32, 1, 28, 28, generator=g), torch.randint(0, 10, (STEPS * 32,), generator=g)
        )
        return common.ImageClassifier(STEPS), DataLoader(data, batch_size=32)
    data = TensorDataset(torch.randint(0, 80, (STEPS * 16, 65), generator=g))
    return common.CharLM(80, STEPS), DataLoader(data, batch_size=16)


def measure() -> list[dict]:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows = []
    for name in ("cnn", "lm"):
        for forward, backward in PAIRS:
            L.seed_everything(0, verbose=False)
            model, loader = model_and_data(name)
            callback = common.BenchmarkTopKAST(forward, backward, update_interval=10, verbose=False)
            L.Trainer(
                max_steps=STEPS,
                callbacks=[callback],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            ).fit(model, loader)
            with tempfile.TemporaryDirectory() as tmp:
                export = save_sparse(model, Path(tmp) / "model.safetensors", masks=callback)
                loaded = load_sparse(export.path)
            state = model.state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in state.items()), "round trip changed the weights"
            masked = sum(t.numel for t in callback.engine.tensors.values())
            total = sum(v.numel() for v in state.values())
            rows.append(
                {
                    "model": name,
                    "forward_sparsity": forward,
                    "backward_sparsity": backward,
                    "masked_share": masked / total,
                    "file_bytes": export.file_bytes,
                    "dense_bytes": export.dense_bytes,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | sparsity (fwd/bwd) | masked share of weights | sparse file (KiB) | dense file (KiB) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['forward_sparsity']:.0%}/{r['backward_sparsity']:.0%} | {r['masked_share']:.1%} | "
            f"{r['file_bytes'] / 1024:.0f} | {r['dense_bytes'] / 1024:.0f} | {r['file_bytes'] / r['dense_bytes']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    started = common.provenance()  # of the code that runs, not of whatever is checked out at the end
    rows = measure()
    print(table(rows))
    if args.json:
        common.write_json(args.json, {"steps": STEPS, "rows": rows}, started)


if __name__ == "__main__":
    main()
