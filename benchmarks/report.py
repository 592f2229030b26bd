"""Every measured table of docs/results.md and of README.md's headline, rendered from the benchmarks' JSON.

    python benchmarks/report.py --write    # put the tables into docs/results.md and README.md
    python benchmarks/report.py --check    # exit 1 when a table there differs from its JSON (tests/test_results.py)

A table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->``, NAME one of :data:`TABLES`; under each, a line
names the JSON file it comes from with the commit and date the run recorded. So no figure in the docs can drift from
the raw numbers behind it, and a ratio is always the ratio of the milliseconds beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import export_size
import intervals
import optimizer_step
import overhead
import refresh
import scaling
import sharded_lm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "docs" / "results.md", ROOT / "README.md")
BLOCK = re.compile(r"<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table -->", re.DOTALL)


@cache
def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def source(*names: str) -> str:
    """The line under a table: its JSON files, each with the commit and date its run recorded."""
    parts = [f"[`{name}`](../benchmarks/results/{name}) ({made_by(load(name))})" for name in names]
    return "Source: " + "; ".join(parts) + "."


def named(key: tuple[Any, ...]) -> str:
    """A run key's configuration as a table names it: ``Top-KAST 80%/50%``, ``dense d_model=64``."""
    return " ".join([accuracy.label(*key[:2]), *key[3:]])


def made_by(record: dict[str, Any]) -> str:
    """The commit and date of each invocation that made the runs of ``record``, with the seeds of each where more
    than one did (``earlier``: seeds run before, merged in by ``accuracy.with_other_seeds``; an entry with ``from``
    made its runs in that file, as scaling.py's tuning makes seed 0)."""
    earlier = record.get("earlier", [])
    every = {accuracy.run_key(r) for r in record["runs"]} if earlier else set()
    made = [
        ({tuple(k) for k in e["runs"]} if "runs" in e else {k for k in every if k[2] in e["seeds"]}, e) for e in earlier
    ]
    latest = every - {k for keys, _ in made for k in keys} if earlier else set()
    described = []
    for keys, e in [*made, (latest, record)]:  # no seeds named when one invocation made the whole file
        p = e["provenance"]
        dirty = ", uncommitted changes" if p["dirty"] else ""
        seeds = sorted({k[2] for k in keys})
        which = f"seed {', '.join(map(str, seeds))}" if seeds else ""
        if keys and keys != {k for k in every if k[2] in seeds}:  # some of the runs of its seeds
            which += " (" + ", ".join(dict.fromkeys(named(k) for k in sorted(keys, key=lambda k: (k[:2], k[3:])))) + ")"
        which += ": " if which else ""
        found = f", the runs of `{e['from']}`" if "from" in e else ""
        described.append(f"{which}commit `{p['commit'][:7]}`{dirty}, {p['date'][:10]}{found}")
    return "; ".join(described)


def tune_source(task: str) -> str:
    """The line under a tuning table: ``tune.json`` with the commit and date of each invocation that tuned ``task``
    (``tasks``, written by :func:`accuracy.merge_tune`; a file from before it has one provenance for all)."""
    record = load("tune.json")
    found = record.get("tasks", {}).get(task, [record["provenance"]])
    described = [
        f"commit `{p['commit'][:7]}`{', uncommitted changes' if p['dirty'] else ''}, {p['date'][:10]}" for p in found
    ]
    return f"Source: [`tune.json`](../benchmarks/results/tune.json) ({'; '.join(described)})."


def tuning_source() -> str:
    """The line under the scaling family's tuning: each invocation of ``scaling.py --tune`` (one that carried on an
    interrupted tuning lists the ones before it under ``resumed``)."""
    record = load("scaling_tune.json")
    found = [*record.get("resumed", []), record["provenance"]]
    described = [
        f"commit `{p['commit'][:7]}`{', uncommitted changes' if p['dirty'] else ''}, {p['date'][:10]}" for p in found
    ]
    return f"Source: [`scaling_tune.json`](../benchmarks/results/scaling_tune.json) ({'; '.join(described)})."


def runs_of(name: str, task: str | None = None) -> list[dict[str, Any]]:
    return [r for r in load(name)["runs"] if task is None or r["task"] == task]


def headline_accuracy() -> str:
    """README: every method at 80% and 90% on both tasks, with its training FLOPs against dense."""
    cells: dict[str, dict[tuple[str, float], str]] = {}
    for task in ("images", "text"):
        found, d = accuracy.groups(runs_of(f"accuracy_{task}.json")), accuracy.digits(task)
        dense = accuracy.mean_std([accuracy.scaled(task, r["metric"]) for r in found[("dense", 0.0)]])[0]
        cells[task] = {}
        seeds = max(len(runs) for runs in found.values())
        for key, runs in found.items():
            values = [accuracy.scaled(task, r["metric"]) for r in runs]
            gap = "" if key[0] == "dense" else f" ({statistics.fmean(values) - dense:+.{d}f})"
            flops = statistics.fmean(r["flops_fraction"] for r in runs)
            cells[task][key] = f"{accuracy.spread(values, d)}{gap}{accuracy.fewer_seeds(runs, seeds)} | {flops:.2f}"
    rows = [("dense", 0.0), *((m, s) for m in list(accuracy.GRID)[1:] for s in accuracy.GRID[m] if s in (0.8, 0.9))]
    lines = [
        "| method | Fashion-MNIST test accuracy % (to dense) | training FLOPs | KJV test bits/char (to dense) "
        "| training FLOPs |",
        "|---|---|---|---|---|",
    ]
    missing = "not run in this grid | –"
    for method, sparsity in rows:
        lines.append(
            f"| {accuracy.label(method, sparsity)} | {cells['images'].get((method, sparsity), missing)} | "
            f"{cells['text'].get((method, sparsity), missing)} |"
        )
    return "\n".join(lines) + "\n\n" + source("accuracy_images.json", "accuracy_text.json")


def headline_overhead() -> str:
    """README: step time of each method as milliseconds and the ratio of medians to dense, per model."""
    summary = load("overhead.json")["summary"]
    methods = [m for m in next(iter(summary.values())) if m != "dense"]
    lines = [
        "| model (dense ms per step) | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for model, rows in summary.items():
        cells = [f"{rows[m]['ratio_of_medians']:.2f} ({rows[m]['median_ms']:.2f} ms)" for m in methods]
        lines.append(f"| {model} ({rows['dense']['median_ms']:.2f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + source("overhead.json")


def gpu_overhead() -> str:
    """Step time on a GPU: the last device run (the code the docs describe) and the one before its fixes."""
    record = load("overhead_gpu.json")
    before, now = record["runs"][0], record["runs"][-1]
    lines = [
        "| model | method | ms per step (median) | ratio of medians to dense | runs "
        f"| before `{before['commit'][:7]}`: ms (ratio) |",
        "|---|---|---|---|---|---|",
    ]
    for model, rows in now["summary"].items():
        old_rows = before["summary"][model]
        for method in dict.fromkeys([*old_rows, *rows]):  # ModelPruning ran in the first call only
            r, old = rows.get(method), old_rows.get(method)
            cells = [f"{r['median_ms']:.2f}", f"{r['ratio_of_medians']:.2f}", str(r["runs"])] if r else ["", "", ""]
            cells.append(f"{old['median_ms']:.2f} ({old['ratio_of_medians']:.2f})" if old else "")
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    p = record["provenance"]
    return (
        "\n".join(lines)
        + f"\n\nSource: [`overhead_gpu.json`](../benchmarks/results/overhead_gpu.json) (commit `{now['commit'][:7]}`, "
        + f"{p['gpu']}, torch {p['versions']['torch']}, {p['date']}; {record['source']})."
    )


def lenet_target() -> str:
    """Issue 16's LeNet-300-100 target: through Lightning (``overhead.py``) and in a bare loop (``cpu_step.py``)."""
    lines = [
        "| benchmark | model | `update_interval` | dense (ms) | Top-KAST (ms) | ratio of medians | paired ratios |",
        "|---|---|---|---|---|---|---|",
    ]
    lightning = load("overhead_lenet.json")["summary"]["lenet"]
    dense = lightning["dense"]["median_ms"]
    for i, (method, interval) in enumerate(
        (("Top-KAST, interval 1", "1"), ("Top-KAST, interval 100, early refresh", "100, early refresh"))
    ):
        row = lightning[method]
        where = (
            ("`overhead.py` (Lightning, bf16 autocast, a fresh process per run)", "LeNet-300-100")
            if i == 0
            else ("", "")
        )
        lines.append(
            f"| {where[0]} | {where[1]} | {interval} | {dense:.2f} | {row['median_ms']:.2f} | "
            f"{row['ratio_of_medians']:.3f} | {row['paired_min']:.3f}–{row['paired_max']:.3f} |"
        )
    names = {"lenet": "LeNet-300-100", "mlp23": "24-layer MLP, 23 masked tensors"}
    first = True
    for model, by_interval in load("cpu_step.json")["runs"].items():
        for j, (interval, times) in enumerate(by_interval.items()):
            rounds = len(times["dense"])
            bench = f"`cpu_step.py` (bare fp32 loop, interleaved in one process, {rounds} rounds)" if first else ""
            first = False
            plain, sparse = statistics.median(times["dense"]), statistics.median(times["Top-KAST"])
            paired = statistics.median(t / d for t, d in zip(times["Top-KAST"], times["dense"], strict=True))
            lines.append(
                f"| {bench} | {names.get(model, model) if j == 0 else ''} | {interval} | {1e3 * plain:.2f} | "
                f"{1e3 * sparse:.2f} | {sparse / plain:.3f} | median {paired:.3f} |"
            )
    return "\n".join(lines) + "\n\n" + source("overhead_lenet.json", "cpu_step.json")


TABLES: dict[str, Callable[[], str]] = {
    "lenet-target": lenet_target,
    "overhead-gpu": gpu_overhead,
    "overhead": lambda: overhead.time_table(load("overhead.json")["summary"]) + "\n\n" + source("overhead.json"),
    "memory": lambda: overhead.memory_table(load("memory.json")["runs"]) + "\n\n" + source("memory.json"),
    "refresh": lambda: (
        refresh.table({int(k): v for k, v in load("refresh.json")["rows"].items()}) + "\n\n" + source("refresh.json")
    ),
    "intervals-images": lambda: (
        intervals.table("images", runs_of("intervals_images.json")) + "\n\n" + source("intervals_images.json")
    ),
    "intervals-text": lambda: (
        intervals.table("text", runs_of("intervals_text.json")) + "\n\n" + source("intervals_text.json")
    ),
    "tune-images": lambda: accuracy.tune_table("images", runs_of("tune.json")) + "\n\n" + tune_source("images"),
    "tune-text": lambda: accuracy.tune_table("text", runs_of("tune.json")) + "\n\n" + tune_source("text"),
    "accuracy-images": lambda: (
        accuracy.grid_table("images", runs_of("accuracy_images.json")) + "\n\n" + source("accuracy_images.json")
    ),
    "accuracy-text": lambda: (
        accuracy.grid_table("text", runs_of("accuracy_text.json")) + "\n\n" + source("accuracy_text.json")
    ),
    "scaling": lambda: scaling.table(runs_of("scaling.json")) + "\n\n" + source("scaling.json"),
    "scaling-tune": lambda: scaling.tune_table(load("scaling_tune.json")) + "\n\n" + tuning_source(),
    "scaling-before": lambda: (
        scaling.table(load("scaling.json")["superseded"]["runs"])
        + "\n\nSource: [`scaling.json`](../benchmarks/results/scaling.json), its `superseded` record ("
        + made_by(load("scaling.json")["superseded"])
        + ")."
    ),
    "optimizer-step": lambda: (
        optimizer_step.tables(load("optimizer_step.json")) + "\n\n" + source("optimizer_step.json")
    ),
    "export": lambda: export_size.table(load("export_size.json")["rows"]) + "\n\n" + source("export_size.json"),
    "sharded-lm": lambda: sharded_lm.table(load("sharded_lm.json")["runs"]) + "\n\n" + source("sharded_lm.json"),
    "headline-accuracy": headline_accuracy,
    "headline-overhead": headline_overhead,
}


def render(text: str, relative_to: Path) -> str:
    """``text`` with every table block filled in from the JSON (links relative to the document's folder)."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r} in a <!-- table: --> block; known: {', '.join(TABLES)}")
        body = TABLES[name]()
        if relative_to == ROOT:  # README sits at the root: its links drop the ../
            body = body.replace("](../", "](")
        return f"<!-- table:{name} -->\n{body}\n<!-- /table -->"

    return BLOCK.sub(fill, text)


def check() -> list[str]:
    """The documents whose tables differ from what the JSON renders (empty: all agree)."""
    return [
        str(path.relative_to(ROOT)) for path in DOCUMENTS if render(path.read_text(), path.parent) != path.read_text()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="fill the tables in")
    action.add_argument("--check", action="store_true", help="exit 1 if a table differs from its JSON")
    args = parser.parse_args()
    if args.write:
        for path in DOCUMENTS:
            path.write_text(render(path.read_text(), path.parent))
        print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in DOCUMENTS)}")
        return
    stale = check()
    if stale:
        print(f"tables out of date with benchmarks/results/*.json: {', '.join(stale)} (run --write)", file=sys.stderr)
        sys.exit(1)
    print("every table matches its JSON")


if __name__ == "__main__":
    main()
