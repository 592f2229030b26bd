"""Cost of one mask refresh against tensor size, and what the callback holds in memory per masked weight.

    python benchmarks/refresh.py --sizes 1 2 4 8 16 --repeats 7 --plot benchmarks/results/refresh.png

For one fp32 tensor of N million weights at forward/backward sparsity 80/50, times (median of repeats, interleaved):
the whole refresh of the engine (select A and B, turnover, penalty weights, masks, writing α), the selection alone
as the package does it (a band around a sampled threshold), the same selection by a full ``torch.kthvalue`` and by
``torch.topk``, the two ways it could be done without the band. Memory: the engine's bytes per masked weight, from
``reporting.memory_overhead_bytes``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from lightning_topkast import TopKAST, selection
from lightning_topkast.reporting import memory_overhead_bytes

FORWARD, BACKWARD = 0.2, 0.5  # densities: sparsity 80/50


def full_select_sets(theta: Tensor) -> tuple[Tensor, Tensor]:
    """A and B by one full k-th value select each over all scores: the refresh before the band select."""
    scores, n = selection.magnitude_scores(theta), theta.numel()
    sets = []
    for density in (FORWARD, BACKWARD):
        k = selection.count(density, n)
        threshold = torch.kthvalue(scores, n - k + 1).values
        sets.append(scores >= threshold)  # ties ignored: a timing stand-in, not a replacement
    return sets[0], sets[1]


def topk_sets(theta: Tensor) -> tuple[Tensor, Tensor]:
    """A and B by ``torch.topk`` indices scattered into masks, as most dynamic-sparse libraries do."""
    scores, n = selection.magnitude_scores(theta), theta.numel()
    sets = []
    for density in (FORWARD, BACKWARD):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.topk(scores, selection.count(density, n), sorted=False).indices] = True
        sets.append(mask)
    return sets[0], sets[1]


def measure(millions: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(millions * 1024, 1024) * 0.02)
    engine = TopKAST({"w": param}, {"w": (FORWARD, BACKWARD)})
    tensor = engine.tensors["w"]
    theta = tensor.theta
    candidates: dict[str, Callable[[], object]] = {
        "refresh": lambda: engine.refresh([tensor]),
        "band select": lambda: selection.forward_backward_sets(theta, FORWARD, BACKWARD),
        "full kthvalue": lambda: full_select_sets(theta),
        "torch.topk": lambda: topk_sets(theta),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):  # interleaved, so noise hits every candidate alike
        for name, fn in candidates.items():
            times[name] += common.time_ms(fn, 1, warmup=1)  # the warm-up call takes first-touch allocation
    result = {name: statistics.median(values) for name, values in times.items()}
    result["bytes per weight"] = memory_overhead_bytes(engine.tensors) / tensor.numel
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="tensor sizes, in 2^20 weights")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of time against size here")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}, ms")
    print("| weights | refresh | band select | full kthvalue | torch.topk | refresh ms per 1M | bytes per weight |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for millions in args.sizes:
        rows[millions] = r = measure(millions, args.repeats)
        print(
            f"| {millions}M | {r['refresh']:.1f} | {r['band select']:.1f} | {r['full kthvalue']:.1f} | "
            f"{r['torch.topk']:.1f} | {r['refresh'] / millions:.2f} | {r['bytes per weight']:.0f} |"
        )
    if args.plot:
        fig, ax = common.new_figure(5.5, 3.2)
        for name in ("refresh", "band select", "full kthvalue", "torch.topk"):
            ax.plot(args.sizes, [rows[m][name] for m in args.sizes], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="weights in the tensor (millions)", ylabel="ms, median")
        ax.set_xticks(args.sizes, [str(m) for m in args.sizes])
        ax.set_title("One mask refresh (sparsity 80/50, fp32, CPU)")
        ax.legend()
        common.save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
