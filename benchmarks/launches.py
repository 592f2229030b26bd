"""Launches per optimizer step on the device path, counted on CPU tensors: they do not grow with the tensors.

    python benchmarks/launches.py --json benchmarks/results/launches.json

A launch is a torch operation that is not a view (nor a host-side scalar, which launches nothing on a device), or a
Triton kernel. The count covers the engine's own code in a step (``before_step`` and the optimizer's step
post-hook), not the optimizer's update, on a stack of ``nn.Linear(8, 8)`` layers with fused-style AdamW state, at
80/50 sparsity with the exploration penalty:

- ``interval 1``: a refresh at every step (the default);
- ``interval 100``: the early-refresh test at every step, with a fraction (1.0) it never reaches, so no refresh.

Implementations: the device path's flat groups with Triton's fused kernels (counted, not run: what the host launches
does not depend on the data, which is what a sync-free step means) and with torch operations, and the per-tensor
passes the device path used before (``batched_passes=False``). The first step is left out: it zeroes optimizer state
that arrived from elsewhere and builds the coefficient tables.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from lightning_topkast import TopKAST, triton_kernels

IMPLEMENTATIONS = ("triton", "torch", "per tensor")
TARGET = 40

# aliasing (views), and host-side scalars that launch nothing on a device
FREE = {"view", "_unsafe_view", "split_with_sizes", "split", "select", "slice", "unbind", "detach", "alias", "t",
        "expand", "unsqueeze", "reshape", "lift_fresh", "scalar_tensor"}  # fmt: skip


class CountLaunches(TorchDispatchMode):
    """Counts the torch operations dispatched inside it, by name, views and host-side scalars left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def kernels_counted(implementation: str) -> Iterator[dict[str, int]]:
    """The device path as ``implementation`` runs it; Triton's kernels counted instead of run."""
    counted = {"kernels": 0}
    saved = triton_kernels.available, triton_kernels._launch
    if implementation == "triton":
        triton_kernels.available = lambda device: triton_kernels.triton is not None  # type: ignore[assignment]
        triton_kernels._launch = lambda *args, **kwargs: counted.update(kernels=counted["kernels"] + 1)  # type: ignore[assignment]
    try:
        yield counted
    finally:
        triton_kernels.available, triton_kernels._launch = saved


def launches_per_step(layers: int, update_interval: int, implementation: str, steps: int = 4) -> list[int]:
    """Launches of the engine's own code in each step but the first, on ``layers`` masked ``nn.Linear(8, 8)``."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    engine = TopKAST(
        params, dict.fromkeys(params, (0.2, 0.5)), update_interval=update_interval, early_refresh=1.0, sync_free=True
    )
    engine.batched_passes = implementation != "per tensor"
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    counts = []
    with kernels_counted(implementation) as counted:
        engine.attach([optimizer])
        after_step, counter = engine._after_step, CountLaunches()

        def watched(index: int) -> None:
            with counter:
                after_step(index)

        engine._after_step = watched  # type: ignore[method-assign]
        for _ in range(steps):
            x = torch.full((2, 8), 0.5)
            F.mse_loss(model(x), x).backward()
            counter.ops.clear()
            counted["kernels"] = 0
            with counter:
                engine.before_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
            counts.append(sum(counter.ops.values()) + counted["kernels"])
    return counts[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", nargs="+", type=int, default=[22, 82])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = common.provenance()
    found: dict[str, dict[str, dict[str, list[int]]]] = {}
    print(f"| implementation | schedule | {' | '.join(f'{n} tensors' for n in args.tensors)} | target |")
    print(f"|---|---|{'---|' * len(args.tensors)}---|")
    for implementation in IMPLEMENTATIONS:
        for interval, schedule in ((1, "interval 1: a refresh every step"), (100, "interval 100: the test only")):
            runs = {str(n): launches_per_step(n, interval, implementation) for n in args.tensors}
            found.setdefault(implementation, {})[schedule] = runs
            cells = " | ".join(str(max(runs[str(n)])) for n in args.tensors)
            print(f"| {implementation} | {schedule} | {cells} | {TARGET} |", flush=True)
    if args.json:
        common.write_json(args.json, {"kind": "launches", "target": TARGET, "runs": found}, started)


if __name__ == "__main__":
    main()
