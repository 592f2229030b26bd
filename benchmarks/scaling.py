"""The paper's scaling claim on the KJV: does a larger sparse model beat a smaller dense one with as many non-zeros?

    python benchmarks/scaling.py --tune                    # each member's rate, seed 0, validation split
    python benchmarks/scaling.py --seeds 0 1 --json benchmarks/results/scaling.json \\
        --plot benchmarks/results/scaling.png

A family of the character Transformers of :mod:`accuracy`'s text task (2 layers, 4 heads, context 64, the same
3,000 steps, data, seeds and training setup: fused AdamW, clipping at norm 1.0 in ``common.ClipGradients``, the
callback's optimizer-aware penalty default): dense at widths 64, 96 and 128, and Top-KAST 80/50 at the widths whose
trained models hold the same number of non-zero parameters (masked weights at density 0.2, plus the embeddings,
biases and norms that stay dense), found here by counting. Reports test bits/char against non-zero parameters, and
the training FLOPs and wall time of each member.

``--tune`` gives each member its own learning rate, chosen on the validation split on seed 0 at the full budget
between two rates: its method's rate tuned at width 128 (``results/tune.json``) and one neighbour, half of it for a
member at width 128 or wider (wider models usually want smaller rates, and the full budget favours smaller rates
than the quarter-budget runs that chose the width-128 rate), double it for a narrower one. Where the chosen rate is
the grid's edge the optimum is bracketed on one side only. The tuning runs also evaluate the test split, which no
choice reads: seed 0 of the main run takes the tuning run at the chosen rate (the same training, seed and rate)
instead of training it again. ``results/scaling_tune.json``, with provenance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import common

DENSE_WIDTHS = (64, 96, 128)
SPARSITY = 0.8  # Top-KAST 80/50
HEADS = 4
TUNED_WIDTH = 128  # the width of accuracy.py's text task, where results/tune.json chose each method's rate
TUNE_FILE = accuracy.RESULTS / "scaling_tune.json"


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


def members(vocab: int) -> list[tuple[str, float, int]]:
    """The family: (method, forward sparsity, width) of each dense width and its Top-KAST match."""
    found = []
    for width in DENSE_WIDTHS:
        found += [("dense", 0.0, width), ("topkast", SPARSITY, matching_width(nonzeros(width, vocab, 0.0), vocab))]
    return found


def member(method: str, width: int) -> str:
    """A member's key in ``scaling_tune.json``'s ``chosen``: ``dense-64``, ``topkast-136``."""
    return f"{method}-{width}"


def of_run(r: dict[str, Any]) -> str:
    return member(r["method"], dict(r["model"])["d_model"])


def tune_rates(base: float, width: int) -> tuple[float, float]:
    """The rates a member is tuned over: its method's width-128 rate and one neighbour (see the module docstring)."""
    return (base, base / 2) if width >= TUNED_WIDTH else (base, base * 2)


def plan_tune(base: dict[str, float], vocab: int, done: set[tuple[str, float]]) -> list[accuracy.Run]:
    """Every member at each of its two rates, seed 0, full budget, validation split (test evaluated beside it);
    the (member, rate) pairs of ``done`` are left out, so an interrupted tuning carries on."""
    return [
        accuracy.Run(
            "text",
            method,
            sparsity,
            0,
            lr,
            split="val",
            model=(("d_model", width),),
            tag="scaling-tune",
            extra_splits=("test",),
        )
        for method, sparsity, width in members(vocab)
        for lr in tune_rates(base[method], width)
        if (member(method, width), lr) not in done
    ]


def choose(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each member's rate with the lowest validation bits/char (a diverged run, NaN, is the worst)."""
    chosen: dict[str, dict[str, Any]] = {}
    for r in runs:
        value = r["metric"] if math.isfinite(r["metric"]) else math.inf
        best = chosen.get(of_run(r))
        if best is None or value < (best["metric"] if math.isfinite(best["metric"]) else math.inf):
            chosen[of_run(r)] = r
    return {name: r["lr"] for name, r in chosen.items()}


def plan(seeds: list[int], lrs: dict[str, float], vocab: int) -> list[accuracy.Run]:
    """Every member on every seed at its tuned rate; test split."""
    return [
        accuracy.Run(
            "text", method, sparsity, seed, lrs[member(method, width)], model=(("d_model", width),), tag="scaling"
        )
        for method, sparsity, width in members(vocab)
        for seed in seeds
    ]


def reused(run: accuracy.Run, tuning: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tuning run that trained ``run`` already (same member, seed and rate), as a test-split result."""
    for r in tuning:
        if (of_run(r), r["seed"], r["lr"]) == (member(run.method, dict(run.model)["d_model"]), run.seed, run.lr):
            return {**r, "split": "test", "metric": r["metrics"]["test"], "validation": r["metric"],
                    "tag": "scaling", "reused_from": TUNE_FILE.name}  # fmt: skip
    return None


def table(results: list[dict[str, Any]]) -> str:
    count = len({r["seed"] for r in results})
    seeds = accuracy.over_seeds(count)
    lines = [
        f"| model | width | non-zero parameters | test bits/char, {seeds} | training FLOPs (×10^12) | minutes "
        "| learning rate |",
        "|---|---|---|---|---|---|---|",
    ]
    keyed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        keyed.setdefault((r["method"], dict(r["model"])["d_model"]), []).append(r)
    for (method, width), runs in sorted(keyed.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][1])):
        flops = statistics.fmean(3 * r["forward_flops_per_batch"] * r["flops_fraction"] * r["steps"] for r in runs)
        minutes = statistics.fmean(r["train_seconds"] for r in runs) / 60
        bits = accuracy.spread([r["metric"] for r in runs], 3) + accuracy.fewer_seeds(runs, count)  # a pair not rerun
        name = "dense" if method == "dense" else f"Top-KAST {SPARSITY:.0%}/{common.TOPKAST_BACKWARD[SPARSITY]:.0%}"
        lines.append(
            f"| {name} | {width} | {runs[0]['nonzero_parameters']:,} | {bits} | {flops / 1e12:.1f} | {minutes:.1f} "
            f"| {'/'.join(f'{lr:g}' for lr in sorted({r['lr'] for r in runs}))} |"
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


def tune_table(record: dict[str, Any]) -> str:
    """Validation bits/char of each member at each rate it was tuned over (the chosen one in bold), and the test
    bits/char of the same runs, which no choice reads."""
    lines = [
        "| member | learning rate | validation bits/char | test bits/char (not used to choose) |",
        "|---|---|---|---|",
    ]
    for r in sorted(record["runs"], key=lambda r: (r["method"] != "dense", dict(r["model"])["d_model"], r["lr"])):
        chosen = record["chosen"].get(of_run(r)) == r["lr"]
        value = f"**{r['metric']:.3f}**" if chosen else f"{r['metric']:.3f}"
        name = "dense" if r["method"] == "dense" else f"Top-KAST {SPARSITY:.0%}/{common.TOPKAST_BACKWARD[SPARSITY]:.0%}"
        lines.append(
            f"| {name} d = {dict(r['model'])['d_model']} | {r['lr']:g} | {value} | {r['metrics']['test']:.3f} |"
        )
    return "\n".join(lines)


def tune(args: argparse.Namespace, vocab: int) -> None:
    """``--tune``: each member's rate on the validation split, saved after every run (an interrupted tuning resumes)."""
    started = common.provenance()
    source = accuracy.RESULTS / "tune.json"
    base = json.loads(source.read_text())["chosen"]["text"]
    saved = json.loads(args.tune_json.read_text()) if args.tune_json.exists() else None
    kept = saved["runs"] if saved else []
    resumed = [*saved.get("resumed", []), saved["provenance"]] if saved else []
    todo = [
        r
        for r in plan_tune(base, vocab, {(of_run(r), r["lr"]) for r in kept})
        if args.members is None or of_run(asdict(r)) in args.members
    ]
    start = time.perf_counter()

    def save(results: list[dict[str, Any]]) -> None:
        runs = kept + results
        record = {
            "wall_seconds": time.perf_counter() - start + (saved["wall_seconds"] if saved else 0.0),
            "sparsity": SPARSITY,
            "tuned_width": TUNED_WIDTH,
            "base": {"dense": base["dense"], "topkast": base["topkast"], "from": source.name},
            "rule": "each member: the base rate and half of it (width >= 128) or double (narrower); seed 0, "
            "full budget, validation split",
            "chosen": choose(runs),
            "runs": runs,
            **({"resumed": resumed} if resumed else {}),  # provenance of the invocations an interrupted one resumes
        }
        common.write_json(args.tune_json, record, started)

    results = accuracy.execute(todo, args, on_result=save)
    if not todo:
        print("every tuning run is saved already")
    save(results)
    print(tune_table(json.loads(args.tune_json.read_text())))


def measure(args: argparse.Namespace, vocab: int) -> list[dict[str, Any]]:
    """The family on ``args.seeds`` at the tuned rates; seed 0's runs come from the tuning where it made them."""
    started = common.provenance()  # of the code that runs, not of whatever is checked out at the end
    if not args.tune_json.exists():
        raise SystemExit(f"no {args.tune_json}: run `python benchmarks/scaling.py --tune` first")
    tuning = json.loads(args.tune_json.read_text())
    runs = [
        r
        for r in plan(args.seeds, tuning["chosen"], vocab)
        if args.members is None or of_run(asdict(r)) in args.members
    ]
    taken = [r for r in (reused(run, tuning["runs"]) for run in runs) if r is not None]
    todo = [run for run in runs if reused(run, tuning["runs"]) is None]
    saved = json.loads(args.json.read_text()) if args.json and args.json.exists() else None
    start = time.perf_counter()
    config = {"sparsity": SPARSITY, "lrs": tuning["chosen"], "setup": "fused AdamW, clipping 1.0, default penalty"}

    def save(results: list[dict[str, Any]]) -> dict[str, Any]:
        record = {"wall_seconds": time.perf_counter() - start, **config, "runs": taken + results}
        merged = accuracy.merge_seeds(saved, record)  # seeds run before stay, with their provenance
        if taken:  # the runs taken from the tuning were made by its invocation
            made = {"seeds": sorted({r["seed"] for r in taken}), "wall_seconds": tuning["wall_seconds"],
                    "provenance": tuning["provenance"], "from": args.tune_json.name}  # fmt: skip
            merged["earlier"] = [*merged.get("earlier", []), made]
        # a file of another setup (the runs before the tuned rates) is kept whole, not merged
        old = saved if saved and accuracy._configuration(saved) != accuracy._configuration(record) else None
        if old is not None or (saved and "superseded" in saved):
            merged["superseded"] = old if old is not None else saved["superseded"]
        if args.json:
            common.write_json(args.json, merged, started)
        return merged

    results = accuracy.execute(todo, args, on_result=save)
    return save(results)["runs"]


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
    parser.add_argument("--tune", action="store_true", help="each member's learning rate, seed 0, validation split")
    parser.add_argument("--tune-json", type=Path, default=TUNE_FILE, help="where --tune writes and the run reads")
    parser.add_argument("--members", nargs="+", default=None, help="only these members (dense-64 topkast-136 ...)")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())["runs"]
    else:
        vocab = len(accuracy._load("text", args.data_dir).vocab)
        if args.tune:
            tune(args, vocab)
            return
        results = measure(args, vocab)
    print(table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
