"""Training step time and peak memory of Top-KAST against dense and the alternatives, side by side in one run.

    python benchmarks/overhead.py --repeats 5 --plot benchmarks/results/overhead.png
    python benchmarks/overhead.py --memory --repeats 3   # peak memory, and the callback's bytes per masked weight
    python benchmarks/overhead.py --accelerator gpu --methods ...   # on a CUDA device (peak memory: allocated)

Three models, trained with bf16 autocast on synthetic batches of the real shapes (the data do not change the cost):
LeNet-300-100 at batch 128 (a ~4 ms step, where fixed per-step costs show), a CNN on 28x28 images and a
character-level Transformer language model (:mod:`common`'s, made bigger: dense steps of ~80 and ~120 ms), the LM
with ``AdamW(fused=True)``, which the callback advises on CPU (``--unfused`` for torch's default); for GPUs also
``llm``, a language model of GPT-2-small's size (127M parameters, 145 masked tensors, 32 sequences of 1,024
tokens). Methods, all at 80% sparsity on the same tensors: dense; Top-KAST 80/50 refreshing every step
(``update_interval=1``), at most every 100 steps with the early refresh (``early_refresh=0.01``, the defaults) and
without it; Lightning's ``ModelPruning`` (already pruned: its per-step cost is the mask multiply of
``torch.nn.utils.prune``); rigl-torch (``delta`` 100).

Each run trains ``--warmup`` steps (one epoch; ModelPruning prunes at its end), then times the next ``--steps``
optimizer steps from batch start to batch start, so everything between (refreshes, RigL updates, epoch ends)
counts. Every run is a fresh process, so no run inherits another's allocator or thread-pool state. Runs are
interleaved (every method once per repeat, in a rotating order) so slow drifts of a shared machine hit all alike.
The table gives the median milliseconds per step of each method and the ratio of the medians to dense; beside it
the smallest and largest ratio to the dense run of the same repeat. Raw times go to ``--json``.
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
    "Top-KAST, interval 1": {"name": "topkast", "update_interval": 1, "early_refresh": 0.01},
    "Top-KAST, interval 100, early refresh": {"name": "topkast", "update_interval": 100, "early_refresh": 0.01},
    "Top-KAST, interval 100, no early refresh": {"name": "topkast", "update_interval": 100, "early_refresh": None},
    "ModelPruning": {"name": "pruning"},
    "RigL (rigl-torch)": {"name": "rigl"},
}
DEFAULT_METHODS = [m for m in METHODS if m != "Top-KAST, interval 100, no early refresh"]  # that one on request
MODELS = ("lenet", "cnn", "lm", "llm")
VOCAB = 80  # the size of the King James Bible's character set
LLM_VOCAB, LLM_CONTEXT, LLM_BATCH = 50257, 1024, 32  # GPT-2's vocabulary and context; a batch that fills a GPU
# LeNet's step is ~50x shorter: more steps keep its timed window (and its share of refreshes) comparable; the
# LLM's is ~100x longer on a GPU: fewer
STEPS_SCALE = {"lenet": 10.0, "llm": 0.4}


class LLM(common.CharLM):
    """GPT-2-small's size as a language model (127M parameters: 24 layers of width 512, GPT-2's vocabulary,
    separate query, key and value projections), so that 145 tensors are masked, as many as real LLMs have."""

    def __init__(self, total_steps: int, fused: bool = True) -> None:
        super().__init__(LLM_VOCAB, total_steps, d_model=512, n_layers=24, n_heads=8, context=LLM_CONTEXT, fused=fused)
        for block in self.model.blocks:
            block.qkv = SeparateQKV(512)


class SeparateQKV(torch.nn.Module):
    """Three projections where :class:`common.Block` has one: the same function, three masked tensors."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def make_model(model: str, total_steps: int, fused: bool = True) -> L.LightningModule:
    if model == "llm":
        return LLM(total_steps, fused)
    if model == "lenet":
        return common.ImageClassifier(total_steps, arch="lenet")
    if model == "cnn":
        return common.ImageClassifier(total_steps, channels=(32, 64), hidden=1024)
    return common.CharLM(VOCAB, total_steps, d_model=256, n_layers=4, n_heads=8, context=64, fused=fused)


def make_batches(model: str, batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if model in ("lenet", "cnn"):
        batch = 128 if model == "lenet" else 256
        data = TensorDataset(
            torch.randn(batches * batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batches * batch,), generator=g)
        )
    elif model == "llm":
        batch = LLM_BATCH
        data = TensorDataset(torch.randint(0, LLM_VOCAB, (batches * batch, LLM_CONTEXT + 1), generator=g))
    else:
        batch = 16
        data = TensorDataset(torch.randint(0, VOCAB, (batches * batch, 65), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)


class StepClock(L.Callback):
    """Times from the start of batch ``warmup`` to the start of batch ``warmup + steps``: everything in between.
    On a GPU the clock reads wait for the device, so queued work is inside the window it belongs to."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.seconds_per_step = float("nan")

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self._start = self._now(trainer)
        elif trainer.global_step == self.warmup + self.steps:
            self.seconds_per_step = (self._now(trainer) - self._start) / self.steps
            trainer.should_stop = True


def train(
    model_name: str,
    method: str,
    warmup: int,
    steps: int,
    probe: L.Callback,
    fused: bool = True,
    accelerator: str = "cpu",
) -> list[L.Callback]:
    """Train ``model_name`` with ``method`` for ``warmup + steps + 1`` optimizer steps, ``probe`` (a clock, a
    profiler) listed after the method's callbacks, which are returned."""
    L.seed_everything(0, verbose=False)
    total = warmup + steps + 1
    config = dict(METHODS[method])
    callbacks = common.method_callbacks(config.pop("name"), SPARSITY, total_steps=10 * total, prune_epochs=1, **config)
    trainer = L.Trainer(
        max_steps=total,
        limit_train_batches=warmup,  # epochs of `warmup` steps: ModelPruning prunes at the end of the first
        precision="bf16-mixed",
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, probe],
    )
    trainer.fit(make_model(model_name, 10 * total, fused), make_batches(model_name, warmup))
    return callbacks


def run(
    model_name: str, method: str, warmup: int, steps: int, fused: bool = True, accelerator: str = "cpu"
) -> dict[str, float]:
    """One training run: seconds per optimizer step over the timed window, and the callback's bytes per weight."""
    warmup, steps = (max(1, round(n * STEPS_SCALE.get(model_name, 1.0))) for n in (warmup, steps))
    clock = StepClock(warmup, steps)
    callbacks = train(model_name, method, warmup, steps, clock, fused, accelerator)
    engine = getattr(callbacks[0], "engine", None) if callbacks else None
    per_weight = float("nan")
    if engine is not None:
        per_weight = engine.memory_bytes() / sum(t.numel for t in engine.tensors.values())
    return {"seconds": clock.seconds_per_step, "bytes_per_weight": per_weight}


def run_in_process(
    model: str, method: str, warmup: int, steps: int, fused: bool = True, accelerator: str = "cpu"
) -> dict[str, float]:
    """One run in a fresh Python process: seconds per step, peak memory (MiB: resident on CPU, allocated on a GPU),
    callback bytes per weight."""
    cmd = [sys.executable, __file__, "--one", model, method, "--warmup", str(warmup), "--steps", str(steps)]
    cmd += ["--accelerator", accelerator] + ([] if fused else ["--unfused"])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    seconds, per_weight, peak = (float(x) for x in out[-3:])
    return {"seconds": seconds, "bytes_per_weight": per_weight, "peak_mib": peak}


def timing(
    models: list[str], methods: list[str], repeats: int, warmup: int, steps: int, fused: bool, accelerator: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of every run, per model and method, in repeat order."""
    times: dict[str, dict[str, list[float]]] = {m: {n: [] for n in methods} for m in models}
    for repeat in range(repeats):
        order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
        for model in models:
            for method in order:
                found = run_in_process(model, method, warmup, steps, fused, accelerator)
                times[model][method].append(found["seconds"])
                print(
                    f"  repeat {repeat + 1}/{repeats} {model:5s} {method:42s} {times[model][method][-1] * 1e3:8.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return times


def summarise(by_method: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median ms per step, the ratio of medians to dense, and the range of the ratios paired within repeats."""
    dense = statistics.median(by_method["dense"])
    summary = {}
    for name, seconds in by_method.items():
        paired = [t / d for t, d in zip(seconds, by_method["dense"], strict=True)]
        summary[name] = {
            "median_ms": statistics.median(seconds) * 1e3,
            "ratio_of_medians": statistics.median(seconds) / dense,
            "paired_min": min(paired),
            "paired_max": max(paired),
        }
    return summary


def peak_memory(
    models: list[str], methods: list[str], warmup: int, steps: int, fused: bool, repeats: int, accelerator: str
) -> dict[str, Any]:
    """Median peak resident memory (and the callback's bytes per masked weight) of each model and method over
    ``repeats`` fresh processes, interleaved: a process's peak moves by tens of MiB from one start to the next."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {n: [] for n in methods} for m in models}
    for _ in range(repeats):
        for model in models:
            for method in methods:
                runs[model][method].append(run_in_process(model, method, warmup, steps, fused, accelerator))
    return {
        model: {
            method: {
                "peak_mib": statistics.median(r["peak_mib"] for r in found),
                "peaks_mib": [r["peak_mib"] for r in found],
                "bytes_per_weight": found[0]["bytes_per_weight"],
            }
            for method, found in by_method.items()
        }
        for model, by_method in runs.items()
    }


def memory_table(found: dict[str, Any], accelerator: str = "cpu") -> str:
    """Peak memory (resident on CPU, allocated on a GPU) per model and method, its ratio to dense, and the
    callback's measured bytes per masked weight."""
    peak = "peak RSS" if accelerator == "cpu" else "peak GPU memory allocated"
    lines = [
        f"| model | method | {peak}, median (MiB) | ratio to dense | runs (MiB) | callback bytes per masked weight |",
        "|---|---|---|---|---|---|",
    ]
    for model, runs in found.items():
        for method, r in runs.items():
            per_weight = "" if r["bytes_per_weight"] != r["bytes_per_weight"] else f"{r['bytes_per_weight']:.2f}"
            ratio = r["peak_mib"] / runs["dense"]["peak_mib"]
            peaks = ", ".join(f"{p:.0f}" for p in r["peaks_mib"])
            lines.append(f"| {model} | {method} | {r['peak_mib']:.0f} | {ratio:.3f} | {peaks} | {per_weight} |")
    return "\n".join(lines)


def time_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Median ms per step, the ratio of medians to dense and the range of the paired ratios, per model and method."""
    lines = [
        "| model | method | ms per step (median) | ratio of medians to dense | paired ratios, smallest–largest |",
        "|---|---|---|---|---|",
    ]
    for model, rows in summary.items():
        for method, r in rows.items():
            lines.append(
                f"| {model} | {method} | {r['median_ms']:.2f} | {r['ratio_of_medians']:.3f} "
                f"| {r['paired_min']:.3f}–{r['paired_max']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=25, help=f"steps before timing (x{STEPS_SCALE} for those)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the ratios here")
    parser.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of time")
    parser.add_argument("--unfused", action="store_true", help="the LM's AdamW without fused=True (torch's default)")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = common.provenance()  # of the code that runs, not of whatever is checked out at the end
    fused = not args.unfused

    if args.one:
        r = run(*args.one, args.warmup, args.steps, fused, args.accelerator)
        if args.accelerator == "gpu":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(r["seconds"], r["bytes_per_weight"], peak)
        return
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")
    if args.memory:
        found = peak_memory(
            args.models, args.methods, args.warmup, min(args.steps, 10), fused, args.repeats, args.accelerator
        )
        print(memory_table(found, args.accelerator))
        if args.json:
            record = {"kind": "memory", "sparsity": SPARSITY, "fused": fused, "accelerator": args.accelerator}
            common.write_json(args.json, {**record, "runs": found}, started)
        return

    where = f"{torch.get_num_threads()} threads" if args.accelerator == "cpu" else torch.cuda.get_device_name()
    print(
        f"torch {torch.__version__}, {where}, bf16-mixed, sparsity {SPARSITY:.0%}; "
        f"median of {args.repeats} runs of {args.steps} steps ({STEPS_SCALE} times more for those), each in a fresh "
        f"process; the LM's AdamW {'fused' if fused else 'unfused'}"
    )
    times = timing(args.models, args.methods, args.repeats, args.warmup, args.steps, fused, args.accelerator)
    summary = {model: summarise(by_method) for model, by_method in times.items()}
    print(time_table(summary))
    if args.json:
        record = {"kind": "time", "sparsity": SPARSITY, "fused": fused, "steps": args.steps, "warmup": args.warmup}
        record["accelerator"] = args.accelerator
        common.write_json(args.json, {**record, "seconds": times, "summary": summary}, started)
    if args.plot:
        plot(summary, args.plot, "CPU" if args.accelerator == "cpu" else torch.cuda.get_device_name())


def plot(summary: dict[str, dict[str, dict[str, float]]], path: Path, where: str = "CPU") -> None:
    methods = [m for m in next(iter(summary.values())) if m != "dense"]
    fig, ax = common.new_figure(7.5, 3.4)
    width = 0.8 / len(summary)
    for i, (model, rows) in enumerate(summary.items()):
        ratios = [rows[m]["ratio_of_medians"] for m in methods]
        spread = [
            [r - rows[m]["paired_min"] for r, m in zip(ratios, methods, strict=True)],
            [rows[m]["paired_max"] - r for r, m in zip(ratios, methods, strict=True)],
        ]
        x = [j + i * width for j in range(len(methods))]
        ax.bar(x, ratios, width=width, yerr=spread, capsize=3, label=model)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    labels = [m.replace("Top-KAST, ", "Top-KAST\n").replace(", ", "\n") for m in methods]
    ax.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(methods))], labels, fontsize=7)
    title = f"Step time relative to dense ({where}, bf16; ratio of medians, paired range)"
    ax.set(ylabel="step time / dense", title=title)
    ax.legend()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
