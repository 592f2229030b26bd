"""The paper's scaling claim on the KJV: does a larger sparse model beat a smaller dense one with as many non-zeros?

    python benchmarks/scaling.py --seeds 0 1 --json benchmarks/results/scaling.json \\
        --plot benchmarks/results/scaling.png

A family of the character Transformers of :mod:`accuracy`'s text task (2 layers, 4 heads, context 64, the same
3,000 steps, data and seeds): dense at widths 64, 96 and 128, and Top-KAST 80/50 at the widths whose trained models
hold the same number of non-zero parameters (masked weights at density 0.2, plus the embeddings, biases and norms
that stay dense), found here by counting. Each method trains at its learning rate tuned at width 128
(``results/tune.json``); wider models might prefer a smaller one, which would favour the dense members. Reports
test bits/char against non-zero parameters, and the training FLOPs and wall time of each member.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import common

DENSE_WIDTHS = (64, 96, 128)
SPARSITY = 0.8  # Top-KAST 80/50
HEADS = 4


def nonzeros(d_model: int, vocab: int, sparsity: float) -> int:
    """Non-zero parameters of a trained width-``d_model`` model at forward ``sparsity`` of the masked weights."""
    module = common.CharLM(vocab, total_steps=1, **{**accuracy.TASKS["text"].model, "d_model": d_model})
    _, masked = common.masked_weights(module)
    params = dict(module.named_parameters())
    masked_count = sum(params[n].numel() for n in masked)
    total = sum(p.numel() for p in params.values())
    return total - masked_count + sum(round((1 - sparsity) * params[n].numel()) for n in masked)


def matching_width(target: int, vocab: int) -> int:
    """The width (a multiple of 2 x heads) whose Top-KAST model holds the non-zeros closest to ``target``."""
    widths = range(2 * HEADS, 1024, 2 * HEADS)
    return min(widths, key=lambda d: abs(nonzeros(d, vocab, SPARSITY) - target))


def plan(seeds: list[int], lrs: dict[str, float], vocab: int) -> list[accuracy.Run]:
    runs = []
    for width in DENSE_WIDTHS:
        sparse = matching_width(nonzeros(width, vocab, 0.0), vocab)
        for seed in seeds:
            runs.append(
                accuracy.Run("text", "dense", 0.0, seed, lrs["dense"], model=(("d_model", width),), tag="scaling")
            )
            runs.append(
                accuracy.Run(
                    "text",
                    "topkast",
                    SPARSITY,
                    seed,
                    accuracy.tuned_lr(lrs, "topkast", SPARSITY),
                    model=(("d_model", sparse),),
                    tag="scaling",
                )
            )
    return runs


def table(results: list[dict[str, Any]]) -> str:
    seeds = accuracy.over_seeds(len({r["seed"] for r in results}))
    lines = [
        f"| model | width | non-zero parameters | test bits/char, {seeds} | training FLOPs (×10^12) | minutes |",
        "|---|---|---|---|---|---|",
    ]
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        keyed.setdefault((r["method"], dict(r["model"])["d_model"]), []).append(r)
    for (method, width), runs in sorted(keyed.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][1])):
        flops = statistics.fmean(3 * r["forward_flops_per_batch"] * r["flops_fraction"] * r["steps"] for r in runs)
        minutes = statistics.fmean(r["train_seconds"] for r in runs) / 60
        bits = accuracy.spread([r["metric"] for r in runs], 3)
        name = "dense" if method == "dense" else f"Top-KAST {SPARSITY:.0%}/{common.TOPKAST_BACKWARD[SPARSITY]:.0%}"
        lines.append(
            f"| {name} | {width} | {runs[0]['nonzero_parameters']:,} | {bits} | {flops / 1e12:.1f} | {minutes:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    fig, ax = common.new_figure(5.6, 3.8)
    for method, name in (("dense", "dense"), ("topkast", f"Top-KAST {SPARSITY:.0%}/50%")):
        keyed: dict[int, list[dict[str, Any]]] = {}
        for r in results:
            if r["method"] == method:
                keyed.setdefault(dict(r["model"])["d_model"], []).append(r)
        points = sorted(
            (runs[0]["nonzero_parameters"], *accuracy.mean_std([r["metric"] for r in runs]), width)
            for width, runs in keyed.items()
        )
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=name)  # fmt: skip
        for x, y, _, width in points:
            ax.annotate(f"d={width}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xscale="log", xlabel="non-zero parameters of the trained model", ylabel="test bits/char")
    ax.set_title(f"KJV, {accuracy.TASKS['text'].steps} steps: sparse and wide against dense and narrow", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per member")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="table and plot from a saved run, no training")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())["runs"]
    else:
        started = common.provenance()  # of the code that runs, not of whatever is checked out at the end
        tuned = accuracy.RESULTS / "tune.json"
        lrs = json.loads(tuned.read_text())["chosen"]["text"] if tuned.exists() else {"dense": 3e-3, "topkast": 3e-3}
        vocab = len(accuracy._load("text", args.data_dir).vocab)
        start = time.perf_counter()
        results = accuracy.execute(plan(args.seeds, lrs, vocab), args)
        if args.json:
            record = {"wall_seconds": time.perf_counter() - start, "sparsity": SPARSITY, "runs": results}
            record = accuracy.with_other_seeds(args.json, record)  # seeds run before stay, with their provenance
            common.write_json(args.json, record, started)
            results = record["runs"]
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
