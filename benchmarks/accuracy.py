"""Accuracy of Top-KAST against dense training and sparse peers on real data, at an equal step budget.

    python benchmarks/accuracy.py --task all --seeds 0 1 2            # the full benchmark (20 min, 2 cores)
    python benchmarks/accuracy.py --task all --seeds 0 --quick         # smoke run, a few steps per configuration
    python benchmarks/accuracy.py --task all --tune                    # learning-rate choice, dense, validation split

Tasks: ``images`` (Fashion-MNIST, a small CNN, test accuracy) and ``text`` (the King James Bible, a 2-layer
character Transformer, test bits per character). Methods (benchmarks/common.py): dense, Top-KAST at forward/backward
sparsity 80/50, 90/80 and 95/90, static random sparsity, Lightning's ModelPruning (gradual magnitude pruning) and
rigl-torch's RigL, each at the same forward sparsity of the same tensors. Ablations at 90%: B = A, no exploration
penalty, update_interval 10 and 100 (images: all four; text: B = A and update_interval 100).

Every run uses the same Trainer (bf16-mixed, fixed number of optimizer steps, no logger, no checkpoints); the
learning rate was chosen with ``--tune`` on the validation split (dense only) and is used for every method. Prints a
markdown table per task and writes ``accuracy_<task>.json`` and ``accuracy_<task>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import common
import data
import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
SPARSITIES = (0.8, 0.9, 0.95)
ABLATION_SPARSITY = 0.9
LABELS = {"dense": "dense", "topkast": "Top-KAST", "static": "static", "pruning": "ModelPruning", "rigl": "RigL"}


@dataclass(frozen=True)
class TaskConfig:
    """Model size and step budget of one task; ``lr`` is the dense model's best on the validation split."""

    steps: int
    epoch_steps: int  # ModelPruning prunes at epoch ends: short epochs give it a gradual schedule
    batch_size: int
    lr: float
    tune_lrs: tuple[float, ...]
    ablations: tuple[str, ...]
    model: dict[str, Any]
    gradient_clip_val: float | None = None


TASKS = {
    # 600 steps at batch 128 is 1.4 passes over the 55,000 training images
    "images": TaskConfig(
        steps=600,
        epoch_steps=30,
        batch_size=128,
        lr=0.1,
        tune_lrs=(0.03, 0.1, 0.3),
        ablations=("b_equals_a", "no_penalty", "interval_10", "interval_100"),
        model={"channels": (16, 32), "hidden": 256},
    ),
    # 400 steps of 16 x 64 characters read a tenth of the 3.7M training characters; of the ablations only B = A and
    # update_interval 100 run here, to keep the whole benchmark within 30 minutes on 2 cores
    "text": TaskConfig(
        steps=400,
        epoch_steps=20,
        batch_size=16,
        lr=3e-3,
        tune_lrs=(1e-3, 3e-3, 1e-2),
        ablations=("b_equals_a", "interval_100"),
        model={"d_model": 128, "n_layers": 2, "n_heads": 4, "context": 64},
        gradient_clip_val=1.0,
    ),
}
QUICK = {"steps": 20, "epoch_steps": 5}


@dataclass(frozen=True)
class Run:
    """One training run: a method at a forward sparsity and seed, with Top-KAST's settings where they apply."""

    task: str
    method: str
    sparsity: float
    seed: int
    ablation: str = ""
    backward_sparsity: float | None = None
    update_interval: int = 1
    early_refresh: float | None = None
    exploration_penalty: float = 1e-4
    lr: float | None = None  # None: the task's chosen learning rate
    split: str = "test"


def ablation_run(task: str, name: str, seed: int) -> Run:
    """Top-KAST at 90% forward sparsity with one setting changed from the main run (90/80, interval 1, λ 1e-4)."""
    run = Run(task, "topkast", ABLATION_SPARSITY, seed, ablation=name)
    changes = {
        "b_equals_a": {"backward_sparsity": ABLATION_SPARSITY},
        "no_penalty": {"exploration_penalty": 0.0},
        "interval_10": {"update_interval": 10},
        "interval_100": {"update_interval": 100},
    }
    return replace(run, **changes[name])


def plan(tasks: list[str], seeds: list[int]) -> list[Run]:
    """Every run of the benchmark: dense, each sparse method at each sparsity, and the ablations, for each seed."""
    runs = []
    for task in tasks:
        for seed in seeds:
            runs.append(Run(task, "dense", 0.0, seed))
            runs += [Run(task, m, s, seed) for m in common.METHODS[1:] for s in SPARSITIES]
            runs += [ablation_run(task, name, seed) for name in TASKS[task].ablations]
    return runs


# --- one run, in a worker process ----------------------------------------------------------------------------------


@cache
def _load(task: str, data_dir: str | None) -> Any:
    return data.fashion_mnist(data_dir) if task == "images" else data.kjv(data_dir)


def _train_loader(dataset: TensorDataset, batch_size: int) -> DataLoader:
    # whole batches indexed at once: a per-item collate costs more than a step of these small models
    sampler = BatchSampler(RandomSampler(dataset), batch_size, drop_last=True)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def _module_and_data(run: Run, config: TaskConfig, splits: Any, steps: int) -> tuple[Any, TensorDataset, Any]:
    lr = run.lr if run.lr is not None else config.lr
    if run.task == "images":
        module = common.ImageClassifier(total_steps=steps, lr=lr, **config.model)
        return module, TensorDataset(*splits.train), getattr(splits, run.split)
    module = common.CharLM(len(splits.vocab), total_steps=steps, lr=lr, **config.model)
    windows = common.sequence_windows(splits.train, config.model["context"])
    return module, TensorDataset(windows), (getattr(splits, run.split),)


def train_and_evaluate(run: Run, data_dir: str | None, quick: bool, threads: int) -> dict[str, Any]:
    """Train one run and return its metric on ``run.split``, the density of the masked tensors and its wall time."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    # RigL re-wraps optimizer.step after the LR scheduler is built (see common.RigL); the scheduler still steps after it
    warnings.filterwarnings("ignore", ".*optimizer.step\\(\\)` has been overridden after learning rate.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-run banners
    config = TASKS[run.task]
    steps, epoch_steps = (QUICK["steps"], QUICK["epoch_steps"]) if quick else (config.steps, config.epoch_steps)
    splits = _load(run.task, data_dir)
    start = time.perf_counter()
    L.seed_everything(run.seed, verbose=False)
    module, train_set, evaluation = _module_and_data(run, config, splits, steps)
    callbacks = common.method_callbacks(
        run.method,
        run.sparsity,
        total_steps=steps,
        prune_epochs=round(common.SCHEDULE_END * steps / epoch_steps),
        backward_sparsity=run.backward_sparsity,
        update_interval=run.update_interval,
        early_refresh=run.early_refresh,
        exploration_penalty=run.exploration_penalty,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        max_epochs=-1,
        limit_train_batches=epoch_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=config.gradient_clip_val,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, _train_loader(train_set, config.batch_size))
    if quick:  # a smoke run checks the plumbing, not the number
        evaluation = tuple(t[: len(t) // 10] for t in evaluation)
    metric = module.evaluate(*evaluation)
    engine = getattr(callbacks[0], "engine", None) if callbacks else None
    return {
        **asdict(run),
        "metric": metric,
        "density": common.masked_density(module),
        "steps": trainer.global_step,
        "seconds": time.perf_counter() - start,
        "refreshes": None if engine is None else engine.refreshes,
        "early_refreshes": None if engine is None else engine.early_refreshes,
    }


# --- tables and plots ----------------------------------------------------------------------------------------------


def metric_name(task: str) -> str:
    """What the table reports for ``task``."""
    return "test accuracy (%)" if task == "images" else "test bits/char"


def _scaled(task: str, value: float) -> float:
    return 100 * value if task == "images" else value


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, float, str], tuple[float, float, int]]:
    """Mean, sample std (0 for one seed) and count of the metric per (method, sparsity, ablation)."""
    groups: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["sparsity"], r["ablation"])].append(_scaled(r["task"], r["metric"]))
    return {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for key, v in groups.items()}


def _cell(mean: float, std: float, dense: float | None, digits: int) -> str:
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if dense is None else f"{text} ({mean - dense:+.{digits}f})"


def tables(task: str, results: list[dict[str, Any]]) -> str:
    """Markdown tables: methods by sparsity (gap to dense in brackets), then the Top-KAST ablations at 90%."""
    stats, digits = summarise(results), 2 if task == "images" else 3
    seeds = len({r["seed"] for r in results})
    dense_mean, dense_std, _ = stats[("dense", 0.0, "")]
    header = f"{metric_name(task)}, mean ± std over {seeds} seeds (difference to dense)"
    lines = [f"**{task}**: {header}", "", "| method | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |"]
    lines.append("|---" * (len(SPARSITIES) + 1) + "|")
    lines.append("| dense (0%) | " + " | ".join([_cell(dense_mean, dense_std, None, digits)] * len(SPARSITIES)) + " |")
    for method in common.METHODS[1:]:
        label = LABELS[method]
        if method == "topkast":
            label += " (" + ", ".join(f"{s:.0%}/{common.TOPKAST_BACKWARD[s]:.0%}" for s in SPARSITIES) + ")"
        cells = [_cell(*stats[(method, s, "")][:2], dense_mean, digits) for s in SPARSITIES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ablations = TASKS[task].ablations
    if ablations:
        main = stats[("topkast", ABLATION_SPARSITY, "")]
        lines += [
            "",
            f"Top-KAST ablations at {ABLATION_SPARSITY:.0%} forward sparsity (difference to the main run)",
            "",
        ]
        lines += ["| configuration | " + metric_name(task) + " |", "|---|---|"]
        lines.append(f"| main: B 80%, λ 1e-4, update_interval 1 | {_cell(*main[:2], None, digits)} |")
        names = {
            "b_equals_a": "B = A (backward 90%)",
            "no_penalty": "no exploration penalty (λ 0)",
            "interval_10": "update_interval 10",
            "interval_100": "update_interval 100",
        }
        for name in ablations:
            mean, std, _ = stats[("topkast", ABLATION_SPARSITY, name)]
            lines.append(f"| {names[name]} | {_cell(mean, std, main[0], digits)} |")
    return "\n".join(lines)


def plot(task: str, results: list[dict[str, Any]], path: Path) -> None:
    """Metric against forward sparsity per method, error bars one std over seeds; dense as a band."""
    stats = summarise(results)
    fig, ax = common.new_figure(6.4, 4.2)
    mean, std, _ = stats[("dense", 0.0, "")]
    ax.axhline(mean, color="black", lw=1, label="dense")
    ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
    for offset, method in enumerate(common.METHODS[1:]):
        points = [(s, *stats[(method, s, "")][:2]) for s in SPARSITIES]
        xs = [100 * s + 0.15 * (offset - 1.5) for s, _, _ in points]  # small shifts keep error bars apart
        ax.errorbar(
            xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=LABELS[method]
        )
    ax.set_xlabel("forward sparsity of the masked tensors (%)")
    ax.set_ylabel(metric_name(task))
    ax.set_xticks([100 * s for s in SPARSITIES])
    title = "Fashion-MNIST, small CNN" if task == "images" else "KJV Bible, 2-layer char Transformer"
    ax.set_title(f"{title}: {TASKS[task].steps} steps, mean ± std over {len({r['seed'] for r in results})} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


# --- driver --------------------------------------------------------------------------------------------------------


def execute(runs: list[Run], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run everything on ``args.workers`` processes, slowest first, printing one line per finished run."""
    order = sorted(runs, key=lambda r: (r.task != "text", r.update_interval != 1, r.method == "dense"))
    results = []
    context = get_context("spawn")  # torch's thread pools do not survive fork
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(train_and_evaluate, r, args.data_dir, args.quick, args.threads) for r in order]
        for i, future in enumerate(as_completed(futures), 1):
            r = future.result()
            what = f"{r['task']} {r['method']} {r['sparsity']:.0%} {r['ablation'] or ''} seed {r['seed']}"
            print(
                f"[{i}/{len(runs)}] {what}: {r['split']} metric {r['metric']:.4f}, density {r['density']:.4f}, "
                f"{r['seconds']:.0f} s",
                flush=True,
            )
            results.append(r)
    return results


def tune(args: argparse.Namespace) -> None:
    """Dense model, seed 0, each learning rate of the grid, scored on the validation split."""
    runs = [Run(task, "dense", 0.0, 0, lr=lr, split="val") for task in args.tasks for lr in TASKS[task].tune_lrs]
    results = execute(runs, args)
    for task in args.tasks:
        print(f"\n**{task}**: dense, seed 0, validation {metric_name(task).removeprefix('test ')}\n")
        print("| learning rate | metric |\n|---|---|")
        for r in sorted((r for r in results if r["task"] == task), key=lambda r: r["lr"]):
            print(f"| {r['lr']:g} | {_scaled(task, r['metric']):.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the tables and write JSON and PNG per task."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--task", choices=["images", "text", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory with the Fashion-MNIST IDX files and/or kjv.txt (default: Debian's dataset-fashion-mnist "
        "and the `bible` program)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results (quick: a temp dir)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['steps']} steps per configuration")
    parser.add_argument("--tune", action="store_true", help="choose the learning rate: dense, validation split")
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args(argv)
    args.tasks = ["images", "text"] if args.task == "all" else [args.task]
    if args.out is None:
        args.out = Path("/tmp/topkast_accuracy_quick") if args.quick else ROOT / "benchmarks" / "results"
    if args.tune:
        tune(args)
        return
    start = time.perf_counter()
    results = execute(plan(args.tasks, args.seeds), args)
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for task in args.tasks:
        mine = sorted((r for r in results if r["task"] == task), key=lambda r: (r["method"], r["sparsity"], r["seed"]))
        print("\n" + tables(task, mine) + "\n")
        record = {"command": command, "wall_seconds": wall, "config": asdict(TASKS[task]), "runs": mine}
        (args.out / f"accuracy_{task}.json").write_text(json.dumps(record, indent=1))
        plot(task, mine, args.out / f"accuracy_{task}.png")
    print(f"wall time {wall / 60:.1f} min on {args.workers} workers x {args.threads} threads ({os.cpu_count()} CPUs)")
    print(f"wrote {', '.join(str(args.out / f'accuracy_{t}.{e}') for t in args.tasks for e in ('json', 'png'))}")


if __name__ == "__main__":
    main()
