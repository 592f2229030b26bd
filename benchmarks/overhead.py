"""Step time of the digits example with and without TopKASTCallback, measured side by side.

    python benchmarks/overhead.py --repeats 5 --steps 60 --hidden 256 1024

Runs are interleaved (dense, interval 100, interval 1, dense, ...) so machine noise hits every configuration alike;
each run reports the median time of its optimizer steps (after warm-up), and the table shows the median over runs as
a ratio to dense. The full benchmark suite (issue 3) extends this to larger models and peers.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_topkast import TopKASTCallback

ROOT = Path(__file__).resolve().parents[1]


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["digits_example"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class StepTimer(L.Callback):
    """Wall time of each training batch, from batch start to batch end (forward, backward, step, callbacks)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(example: Any, hidden: int, steps: int, interval: int | None) -> float:
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    if interval is not None:
        callbacks.insert(0, TopKASTCallback(update_interval=interval, verbose=False))
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(example.DigitsClassifier(hidden=hidden), example.DigitsDataModule(batch_size=64))
    return statistics.median(timer.times[10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    example = _example()
    configs = {"dense": None, "Top-KAST, interval 100": 100, "Top-KAST, interval 1": 1}
    print(f"| hidden | configuration | step time (ms, median of {args.repeats}) | ratio to dense |")
    print("|---|---|---|---|")
    for hidden in args.hidden:
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, interval in configs.items():
                times[name].append(run(example, hidden, args.steps, interval))
        dense = statistics.median(times["dense"])
        for name in configs:
            median = statistics.median(times[name])
            print(f"| {hidden} | {name} | {1e3 * median:.2f} | {median / dense:.3f} |")


if __name__ == "__main__":
    main()
