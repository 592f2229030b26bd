"""Accuracy against the refresh schedule: ``update_interval`` 1, 10, 100 and 1000, with and without early refresh.

    python benchmarks/intervals.py --task images --seeds 0 1 2 --json benchmarks/results/intervals_images.json \\
        --plot benchmarks/results/intervals_images.png

Top-KAST 80/50 on both tasks of :mod:`accuracy` (same models, data, step budgets and seeds, Top-KAST's
tuned learning rate from ``results/tune.json``, the one tuned at 80/50 where there is one), the interval being the
most steps between refreshes. With ``early_refresh=0.01`` (the default) a tensor also refreshes as soon as the
members of B \\ A that have grown past A's last threshold number 1% of |A|; without it, only every
``update_interval`` steps. For each configuration: the test metric (mean ± std over seeds, and every seed's
difference to interval 1 of the same seed), the refreshes the run made and the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import common

PAIRS = (0.8,)  # forward sparsity; backward from common.TOPKAST_BACKWARD: 80/50 (90/80 fits no budget here)
INTERVALS = (1, 10, 100, 1000)
EARLY = 0.01


def plan(tasks: list[str], seeds: list[int], lrs: dict[str, dict[str, float]]) -> list[accuracy.Run]:
    runs = []
    for task in tasks:
        for sparsity in PAIRS:
            lr = accuracy.tuned_lr(lrs[task], "topkast", sparsity)  # tuned at this sparsity where it was
            for seed in seeds:
                for interval in INTERVALS:
                    schedules = [EARLY, None] if interval > 1 else [None]  # at 1 every step refreshes anyway
                    runs += [
                        accuracy.Run(task, "topkast", sparsity, seed, lr, update_interval=interval, early_refresh=early)
                        for early in schedules
                    ]
    return runs


def label(r: dict[str, Any]) -> str:
    if r["update_interval"] == 1:
        return "every step"
    return f"at most {r['update_interval']}, " + ("early refresh" if r["early_refresh"] is not None else "no early")


def table(task: str, results: list[dict[str, Any]]) -> str:
    digits, scale = (2, 100) if task == "images" else (3, 1)
    lines = [
        f"**{task}**: {accuracy.metric_name(task)}, {accuracy.over_seeds(len({r['seed'] for r in results}))}; each "
        "seed's difference to refreshing every step; refreshes per run (early ones); minutes per run",
        "",
        "| sparsity | refresh | metric | per seed, to every step | refreshes (early) | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for sparsity in PAIRS:
        mine = [r for r in results if r["sparsity"] == sparsity]
        base = {r["seed"]: scale * r["metric"] for r in mine if r["update_interval"] == 1}
        order = sorted(mine, key=lambda r: (r["update_interval"], r["early_refresh"] is None))
        for name in dict.fromkeys(label(r) for r in order):
            group = sorted((r for r in mine if label(r) == name), key=lambda r: r["seed"])
            values = [scale * r["metric"] for r in group]
            seeds = ", ".join(f"{scale * r['metric'] - base[r['seed']]:+.{digits}f}" for r in group)
            refreshes = statistics.fmean(r["refreshes"] for r in group)
            early = statistics.fmean(r["early_refreshes"] for r in group)
            minutes = statistics.fmean(r["train_seconds"] for r in group) / 60
            pair = f"{sparsity:.0%}/{common.TOPKAST_BACKWARD[sparsity]:.0%}"
            lines.append(
                f"| {pair} | {name} | {accuracy.spread(values, digits)} | {seeds} | "
                f"{refreshes:.0f} ({early:.0f}) | {minutes:.2f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    fig, axes = common.new_figure(4.2 * len(tasks), 3.4, columns=len(tasks))
    axes = axes if len(tasks) > 1 else [axes]
    for ax, task in zip(axes, tasks, strict=True):
        scale = 100 if task == "images" else 1
        for sparsity in PAIRS:
            for early, style in ((EARLY, "-"), (None, "--")):
                points = []
                for interval in INTERVALS:
                    group = [
                        scale * r["metric"]
                        for r in results
                        if r["task"] == task
                        and r["sparsity"] == sparsity
                        and r["update_interval"] == interval
                        and (interval == 1 or r["early_refresh"] == early)
                    ]
                    if group:
                        sd = statistics.stdev(group) if len(group) > 1 else 0.0
                        points.append((interval, statistics.fmean(group), sd))
                pair = f"{sparsity:.0%}/{common.TOPKAST_BACKWARD[sparsity]:.0%}"
                kind = "early refresh" if early is not None else "no early"
                ax.errorbar(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    yerr=[p[2] for p in points],
                    linestyle=style,
                    marker="o",
                    capsize=3,
                    label=f"{pair}, {kind}",
                )
        ax.set(xscale="log", xlabel="update_interval (most steps between refreshes)", ylabel=accuracy.metric_name(task))
        ax.set_title("Fashion-MNIST CNN" if task == "images" else "KJV char Transformer", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    common.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["images", "text", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per configuration")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="tables and plot from a saved run, no training")
    args = parser.parse_args()
    started = common.provenance()  # of the code that runs, not of whatever is checked out at the end
    tasks = ["images", "text"] if args.task == "all" else [args.task]
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, wall = saved["runs"], saved["wall_seconds"]
        tasks = [t for t in tasks if any(r["task"] == t for r in results)]
        for task in tasks:
            print("\n" + table(task, [r for r in results if r["task"] == task]) + "\n")
        if args.plot:
            plot(results, tasks, args.plot)
        return
    tuned = accuracy.RESULTS / "tune.json"
    if tuned.exists():
        lrs = json.loads(tuned.read_text())["chosen"]
    else:
        print(f"no {tuned}: the middle learning rate of each task's grid", file=sys.stderr)
        lrs = {t: {"topkast": accuracy.TASKS[t].tune_lrs[1]} for t in tasks}
    start = time.perf_counter()
    saved = json.loads(args.json.read_text()) if args.json and args.json.exists() else None

    def save(results: list[dict[str, Any]]) -> list[dict[str, Any]]:  # after every run: a cut run keeps its runs
        configs = {task: accuracy.asdict(accuracy.TASKS[task]) for task in tasks}
        record = {"wall_seconds": time.perf_counter() - start, "early_refresh": EARLY, "configs": configs}
        record = accuracy.merge_seeds(saved, {**record, "runs": results})  # earlier seeds stay, with provenance
        common.write_json(args.json, record, started)
        return record["runs"]

    results = accuracy.execute(plan(tasks, args.seeds, lrs), args, on_result=save if args.json else None)
    wall = time.perf_counter() - start
    print(f"wall time {wall / 60:.1f} min on {args.workers} workers x {args.threads} threads")
    if args.json:
        results = save(results)
    for task in tasks:
        print("\n" + table(task, [r for r in results if r["task"] == task]) + "\n")
    if args.plot:
        plot(results, tasks, args.plot)


if __name__ == "__main__":
    main()
