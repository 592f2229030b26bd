"""Where a training step's time goes: torch.profiler over a few steps of one model and method of overhead.py.

    python benchmarks/profile_step.py --model lm --method "Top-KAST, interval 1"
    python benchmarks/profile_step.py --model lm --method dense --accelerator gpu

Prints the operators with the most self time on the host and, on a GPU, on the device: the view behind a ratio in
overhead.py's table, not a figure for the docs (the profiler slows every operator it records).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead


class StepProfiler(L.Callback):
    """Profiles from the start of batch ``warmup`` to the start of batch ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int, activities: list[ProfilerActivity]) -> None:
        self.warmup, self.steps = warmup, steps
        self.profiler = profile(activities=activities)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.profiler.__enter__()
        elif trainer.global_step == self.warmup + self.steps:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lm", choices=overhead.MODELS)
    parser.add_argument("--method", default="Top-KAST, interval 1", choices=list(overhead.METHODS))
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    gpu = args.accelerator == "gpu"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    profiler = StepProfiler(args.warmup, args.steps, activities)
    overhead.train(args.model, args.method, args.warmup, args.steps, profiler, accelerator=args.accelerator)
    events = profiler.profiler.key_averages()
    print(f"{args.model}, {args.method}, {args.accelerator}: {args.steps} steps profiled")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if gpu:
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
