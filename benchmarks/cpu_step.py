"""Step time of Top-KAST against dense in one process, interleaved: the engine's own cost per step on CPU.

    python benchmarks/cpu_step.py --json benchmarks/results/cpu_step.json

A bare torch loop (no Lightning: no hooks, no logging), fp32, SGD with Nesterov momentum and weight decay, the
exploration penalty on, 80/50 sparsity with the first layer dense, on two models: LeNet-300-100 at batch 128 (two
masked tensors, 31k weights, a ~3 ms step) and a 24-layer MLP of width 128 at batch 64 (23 masked tensors), where
fixed per-tensor costs show. Each configuration trains its own copy of the model in the same process; they take
turns in blocks of ``--block`` steps (the order rotating), and each block's median step time is paired with the
dense block of the same round. The table gives the ratio of the medians and the median of the paired ratios.
``overhead.py`` times the same methods through Lightning (bf16 autocast, the callback's hooks and logging), each
run in a fresh process; this one is less noisy on a shared machine, as every configuration sees the same drifts.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from lightning_topkast import TopKAST


def make(model: str) -> tuple[nn.Module, int, tuple[int, ...]]:
    """The model, its batch size and the shape of one input."""
    if model == "lenet":
        return common.LeNet300100(), 128, (1, 28, 28)
    layers = [nn.Sequential(nn.Linear(128, 128), nn.ReLU()) for _ in range(23)]
    return nn.Sequential(*layers, nn.Linear(128, 10)), 64, (128,)


def step_times(model_name: str, update_interval: int, rounds: int, block: int) -> dict[str, list[float]]:
    """Per configuration, the median step time of each block, in round order."""
    torch.manual_seed(0)
    base, batch, shape = make(model_name)
    configs = {}
    for name in ("dense", "Top-KAST"):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        engine = None
        if name != "dense":
            masked = [n for n, p in model.named_parameters() if p.dim() == 2][1:]  # the first layer stays dense
            params = {n: p for n, p in model.named_parameters() if n in masked}
            engine = TopKAST(
                params, dict.fromkeys(params, (0.2, 0.5)), update_interval=update_interval, early_refresh=0.01
            )
            engine.attach([optimizer])
        configs[name] = (model, optimizer, engine)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(50)]

    def step(name: str, i: int) -> float:
        model, optimizer, engine = configs[name]
        x, y = data[i % len(data)]
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if engine is not None:
            engine.before_step(optimizer)
        optimizer.step()
        return time.perf_counter() - start

    for i in range(300):  # warm-up: the first refreshes search from scratch
        for name in configs:
            step(name, i)
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            times[name].append(statistics.median(step(name, r * block + i) for i in range(block)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "mlp23"], choices=["lenet", "mlp23"])
    parser.add_argument("--intervals", nargs="+", type=int, default=[1, 100])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = common.provenance()
    found: dict[str, dict[str, dict[str, list[float]]]] = {}
    print("| model | update_interval | dense (ms) | Top-KAST (ms) | ratio of medians | median paired ratio |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        for interval in args.intervals:
            times = step_times(model, interval, args.rounds, args.block)
            found.setdefault(model, {})[str(interval)] = times
            dense, sparse = statistics.median(times["dense"]), statistics.median(times["Top-KAST"])
            paired = statistics.median(t / d for t, d in zip(times["Top-KAST"], times["dense"], strict=True))
            cells = f"{dense * 1e3:.3f} | {sparse * 1e3:.3f} | {sparse / dense:.3f} | {paired:.3f}"
            print(f"| {model} | {interval} | {cells} |", flush=True)
    if args.json:
        common.write_json(args.json, {"kind": "cpu_step", "runs": found}, started)


if __name__ == "__main__":
    main()
