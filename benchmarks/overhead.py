"""Training step time of Top-KAST against dense and the alternatives, side by side in one run, as ratios to dense.

    python benchmarks/overhead.py --repeats 5 --plot benchmarks/results/overhead.png
    python benchmarks/overhead.py --memory          # peak memory, one fresh process per model and method

Two models whose dense step takes well over 50 ms on a 2-core CPU: a CNN on 28x28 images and a character-level
Transformer language model (:mod:`common`'s, made bigger), trained with bf16 autocast on synthetic batches of the
real shapes (the data do not change the cost). Methods, all at 80% sparsity on the same tensors: dense; Top-KAST
80/50 with ``update_interval`` 100 and 1; Lightning's ``ModelPruning`` (already pruned: its per-step cost is the
mask multiply of ``torch.nn.utils.prune``); rigl-torch (``delta`` 100).

Each run trains ``--warmup`` steps (one epoch; ModelPruning prunes at its end), then times the next ``--steps``
optimizer steps from batch start to batch start, so everything between (refreshes, RigL updates, epoch ends)
counts; the default 100 steps hold one Top-KAST refresh at interval 100 and one RigL update. Runs are interleaved
(every method once per repeat, in a rotating order) so machine noise hits all alike; the table shows the median
over repeats of each run's time per step, and its ratio to dense.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SPARSITY = 0.8
METHODS: dict[str, dict[str, Any]] = {
    "dense": {"name": "dense"},
    "Top-KAST, interval 100": {"name": "topkast", "update_interval": 100},
    "Top-KAST, interval 1": {"name": "topkast", "update_interval": 1},
    "ModelPruning": {"name": "pruning"},
    "RigL (rigl-torch)": {"name": "rigl"},
}
VOCAB = 80  # the size of the King James Bible's character set


def make_model(model: str, total_steps: int) -> L.LightningModule:
    if model == "cnn":
        return common.ImageClassifier(total_steps, channels=(32, 64), hidden=1024)
    return common.CharLM(VOCAB, total_steps, d_model=256, n_layers=4, n_heads=8, context=64)


def make_batches(model: str, batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if model == "cnn":
        batch = 256
        data = TensorDataset(
            torch.randn(batches * batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batches * batch,), generator=g)
        )
    else:
        batch = 16
        data = TensorDataset(torch.randint(0, VOCAB, (batches * batch, 65), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)


class StepClock(L.Callback):
    """Times from the start of batch ``warmup`` to the start of batch ``warmup + steps``: everything in between."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.seconds_per_step = float("nan")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self._start = time.perf_counter()
        elif trainer.global_step == self.warmup + self.steps:
            self.seconds_per_step = (time.perf_counter() - self._start) / self.steps
            trainer.should_stop = True


def run(model_name: str, method: str, warmup: int, steps: int) -> float:
    """One training run; returns seconds per optimizer step over the timed window."""
    L.seed_everything(0, verbose=False)
    total = warmup + steps + 1
    config = dict(METHODS[method])
    clock = StepClock(warmup, steps)
    callbacks = common.method_callbacks(config.pop("name"), SPARSITY, total_steps=10 * total, prune_epochs=1, **config)
    trainer = L.Trainer(
        max_steps=total,
        limit_train_batches=warmup,  # epochs of `warmup` steps: ModelPruning prunes at the end of the first
        precision="bf16-mixed",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, clock],
    )
    trainer.fit(make_model(model_name, 10 * total), make_batches(model_name, warmup))
    return clock.seconds_per_step


def timing(models: list[str], repeats: int, warmup: int, steps: int) -> dict[str, dict[str, float]]:
    names = list(METHODS)
    times: dict[str, dict[str, list[float]]] = {m: {n: [] for n in names} for m in models}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for model in models:
            for method in order:
                times[model][method].append(run(model, method, warmup, steps))
                print(
                    f"  repeat {repeat + 1}/{repeats} {model:4s} {method:24s} {times[model][method][-1] * 1e3:7.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return {m: {n: statistics.median(v) for n, v in by_method.items()} for m, by_method in times.items()}


def peak_memory(models: list[str], warmup: int, steps: int) -> None:
    print("| model | method | peak RSS (MiB) | ratio to dense |")
    print("|---|---|---|---|")
    for model in models:
        peaks = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, "--one", model, method, "--warmup", str(warmup), "--steps", str(steps)]
            output = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks[method] = float(output.split()[-1])
            print(f"| {model} | {method} | {peaks[method]:.0f} | {peaks[method] / peaks['dense']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "lm"], choices=["cnn", "lm"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the ratios here")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of time")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        run(*args.one, args.warmup, args.steps)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
        return
    if args.memory:
        peak_memory(args.models, args.warmup, min(args.steps, 10))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16-mixed, sparsity {SPARSITY:.0%}; "
        f"median of {args.repeats} runs of {args.steps} steps"
    )
    medians = timing(args.models, args.repeats, args.warmup, args.steps)
    print("| model | method | ms per step | ratio to dense |")
    print("|---|---|---|---|")
    for model, by_method in medians.items():
        for method, seconds in by_method.items():
            print(f"| {model} | {method} | {seconds * 1e3:.1f} | {seconds / by_method['dense']:.3f} |")
    if args.plot:
        plot(medians, args.plot)


def plot(medians: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m != "dense"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / len(medians)
    for i, (model, by_method) in enumerate(medians.items()):
        ratios = [by_method[m] / by_method["dense"] for m in methods]
        ax.bar([j + i * width for j in range(len(methods))], ratios, width=width, label=model)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks([j + width * (len(medians) - 1) / 2 for j in range(len(methods))], methods, fontsize=8)
    ax.set(ylabel="step time / dense", title="Training step time relative to dense (CPU, bf16)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
