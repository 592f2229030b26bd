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
counts; the default 100 steps hold one Top-KAST refresh at interval 100 and one RigL update. Every run is a fresh
process, so no run inherits another's allocator or thread-pool state. Runs are interleaved (every method once per
repeat, in a rotating order) so slow drifts of a shared machine hit all alike; the ratio to dense is taken within
each repeat and the table shows the median over repeats, with the smallest and largest.
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


def make_model(model: str, total_steps: int, fused: bool = False) -> L.LightningModule:
    if model == "cnn":
        return common.ImageClassifier(total_steps, channels=(32, 64), hidden=1024)
    return common.CharLM(VOCAB, total_steps, d_model=256, n_layers=4, n_heads=8, context=64, fused=fused)


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


def run(model_name: str, method: str, warmup: int, steps: int, fused: bool = False) -> float:
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
    trainer.fit(make_model(model_name, 10 * total, fused), make_batches(model_name, warmup))
    return clock.seconds_per_step


def run_in_process(model: str, method: str, warmup: int, steps: int, fused: bool = False) -> tuple[float, float]:
    """One run in a fresh Python process: (seconds per step, peak resident memory in MiB)."""
    cmd = [sys.executable, __file__, "--one", model, method, "--warmup", str(warmup), "--steps", str(steps)]
    cmd += ["--fused"] if fused else []
    seconds, peak = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-2:]
    return float(seconds), float(peak)


def timing(
    models: list[str], repeats: int, warmup: int, steps: int, fused: bool = False
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of every run, per model and method, in repeat order."""
    names = list(METHODS)
    times: dict[str, dict[str, list[float]]] = {m: {n: [] for n in names} for m in models}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for model in models:
            for method in order:
                times[model][method].append(run_in_process(model, method, warmup, steps, fused)[0])
                print(
                    f"  repeat {repeat + 1}/{repeats} {model:4s} {method:24s} {times[model][method][-1] * 1e3:7.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return times


def paired_ratios(by_method: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each run's time over the dense run's of the same repeat."""
    return {name: [t / d for t, d in zip(v, by_method["dense"], strict=True)] for name, v in by_method.items()}


def peak_memory(models: list[str], warmup: int, steps: int) -> None:
    print("| model | method | peak RSS (MiB) | ratio to dense |")
    print("|---|---|---|---|")
    for model in models:
        peaks = {}
        for method in METHODS:
            peaks[method] = run_in_process(model, method, warmup, steps)[1]
            print(f"| {model} | {method} | {peaks[method]:.0f} | {peaks[method] / peaks['dense']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "lm"], choices=["cnn", "lm"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the ratios here")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of time")
    parser.add_argument(
        "--fused", action="store_true", help="the LM's AdamW with fused=True (CPU: fast sqrt of zero state)"
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        seconds = run(*args.one, args.warmup, args.steps, args.fused)
        print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
        return
    if args.memory:
        peak_memory(args.models, args.warmup, min(args.steps, 10))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16-mixed, sparsity {SPARSITY:.0%}; "
        f"median of {args.repeats} runs of {args.steps} steps, each in a fresh process"
        + ("; the LM's AdamW fused" if args.fused else "")
    )
    times = timing(args.models, args.repeats, args.warmup, args.steps, args.fused)
    ratios = {model: paired_ratios(by_method) for model, by_method in times.items()}
    print("| model | method | ms per step | ratio to dense | smallest–largest ratio |")
    print("|---|---|---|---|---|")
    for model, by_method in times.items():
        for method, seconds in by_method.items():
            r = ratios[model][method]
            print(
                f"| {model} | {method} | {statistics.median(seconds) * 1e3:.1f} | {statistics.median(r):.3f} "
                f"| {min(r):.3f}–{max(r):.3f} |"
            )
    if args.plot:
        plot(ratios, args.plot)


def plot(ratios: dict[str, dict[str, list[float]]], path: Path) -> None:
    methods = [m for m in METHODS if m != "dense"]
    fig, ax = common.new_figure(6.5, 3.2)
    width = 0.8 / len(ratios)
    for i, (model, by_method) in enumerate(ratios.items()):
        medians = [statistics.median(by_method[m]) for m in methods]
        spread = [
            [med - min(by_method[m]) for med, m in zip(medians, methods, strict=True)],
            [max(by_method[m]) - med for med, m in zip(medians, methods, strict=True)],
        ]
        x = [j + i * width for j in range(len(methods))]
        ax.bar(x, medians, width=width, yerr=spread, capsize=3, label=model)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks([j + width * (len(ratios) - 1) / 2 for j in range(len(methods))], methods, fontsize=8)
    ax.set(ylabel="step time / dense", title="Step time relative to dense (CPU, bf16; bars: median, whiskers: range)")
    ax.legend()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
