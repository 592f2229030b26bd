"""Cost of one mask refresh against tensor size: after a typical step, from scratch, and the ways to select.

    python benchmarks/refresh.py --sizes 1 2 4 8 16 --repeats 7 --plot benchmarks/results/refresh.png \\
        --json benchmarks/results/refresh.json

For one fp32 tensor of N million weights at forward/backward sparsity 80/50, times in ms (median of repeats,
interleaved):

- *after a step*: the engine's whole post-step work at ``update_interval=1`` (θ merged from the update, α written,
  A and B re-selected exactly, optimizer state kept on B) after an SGD step with a Gaussian gradient. The step size
  is set so that, per step, about as many weights cross the thresholds as on the benchmark CNN in training (a few
  hundredths of a percent; the table gives the measured number);
- *full refresh*: the engine's refresh from scratch, as at the first step (both thresholds picked in a window that a
  strided sample brackets, then the sets written);
- the selection alone by ``selection.forward_backward_sets`` (the public full selection: a k-th value of the integer
  scores, then a compare), by a full ``torch.kthvalue`` on |θ| and by ``torch.topk`` indices scattered into masks.

It also reports what the engine holds per masked weight, measured from its tensors' storages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from lightning_topkast import TopKAST, selection

FORWARD, BACKWARD = 0.2, 0.5  # densities: sparsity 80/50
LR, GRAD_SCALE = 0.1, 5e-4  # a step moves a weight by ~5e-5 against a spread of 0.02


def full_select_sets(theta: Tensor) -> tuple[Tensor, Tensor]:
    """A and B by one full k-th value select each over all magnitudes."""
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


class StepTimer:
    """SGD steps through the engine with a fresh gradient each; times the post-step work (the step post-hook)."""

    def __init__(self, engine: TopKAST, param: nn.Parameter, seed: int) -> None:
        self.engine, self.param = engine, param
        self.optimizer = torch.optim.SGD([param], lr=LR)
        engine.attach([self.optimizer])
        self.generator = torch.Generator().manual_seed(seed)
        self.seconds: list[float] = []
        self.crossed: list[int] = []
        after_step = engine._after_step

        def timed(index: int) -> None:
            before = self.engine.tensors["w"].forward_set
            start = time.perf_counter()
            after_step(index)
            self.seconds.append(time.perf_counter() - start)
            self.crossed.append(int((before & ~self.engine.tensors["w"].forward_set).sum()))

        engine._after_step = timed  # type: ignore[method-assign]

    def __call__(self) -> None:
        self.param.grad = torch.randn(self.param.shape, generator=self.generator) * GRAD_SCALE
        self.engine.before_step(self.optimizer)
        self.optimizer.step()


def measure(millions: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(millions * 1024, 1024) * 0.02)
    engine = TopKAST({"w": param}, {"w": (FORWARD, BACKWARD)}, update_interval=1, penalty=1e-4)
    tensor = engine.tensors["w"]
    steps = StepTimer(engine, param, seed=millions)
    for _ in range(3):  # the first refreshes learn the spacing of scores near the thresholds
        steps()
    steps.seconds.clear()
    steps.crossed.clear()
    # from θ: the parameter holds α, 80% exact zeros, whose ties would time the tie path instead of a selection
    other = TopKAST({"w": nn.Parameter(tensor.theta.clone())}, {"w": (FORWARD, BACKWARD)})
    theta = other.tensors["w"].theta
    candidates: dict[str, Callable[[], object]] = {
        "after a step": steps,
        "full refresh": lambda: other.refresh(),
        "forward_backward_sets": lambda: selection.forward_backward_sets(theta, FORWARD, BACKWARD),
        "full kthvalue": lambda: full_select_sets(theta),
        "torch.topk": lambda: topk_sets(theta),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):  # interleaved, so noise hits every candidate alike
        for name, fn in candidates.items():
            times[name] += common.time_ms(fn, 1, warmup=0 if name == "after a step" else 1)
    times["after a step"] = [s * 1e3 for s in steps.seconds]  # the post-hook alone, not the SGD update
    result = {name: statistics.median(values) for name, values in times.items()}
    result["crossed A per step"] = statistics.median(steps.crossed)
    result["weights"] = tensor.numel
    result["bytes per weight"] = engine.memory_bytes() / tensor.numel
    return result


def table(rows: dict[int, dict[str, float]]) -> str:
    """One row per tensor size: the post-step work, a full refresh, the selects, movement and bytes per weight."""
    lines = [
        "| weights | after a step (ms) | full refresh (ms) | full / after a step | forward_backward_sets "
        "| full kthvalue | torch.topk | members leaving A per step | bytes per weight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for millions, r in rows.items():
        lines.append(
            f"| {millions}M | {r['after a step']:.2f} | {r['full refresh']:.1f} | "
            f"{r['full refresh'] / r['after a step']:.1f} | {r['forward_backward_sets']:.1f} | "
            f"{r['full kthvalue']:.1f} | {r['torch.topk']:.1f} | {r['crossed A per step']:.0f} "
            f"({r['crossed A per step'] / r['weights']:.4%}) | {r['bytes per weight']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="tensor sizes, in 2^20 weights")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of time against size here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    started = common.provenance()  # of the code that runs, not of whatever is checked out at the end

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}, ms")
    rows = {}
    for millions in args.sizes:
        rows[millions] = measure(millions, args.repeats)
        print(f"  {millions}M: {rows[millions]['after a step']:.2f} ms after a step", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        record = {"forward_density": FORWARD, "backward_density": BACKWARD, "lr": LR, "grad_scale": GRAD_SCALE}
        common.write_json(args.json, {**record, "repeats": args.repeats, "rows": rows}, started)
    if args.plot:
        fig, ax = common.new_figure(5.5, 3.2)
        for name in ("after a step", "full refresh", "forward_backward_sets", "full kthvalue", "torch.topk"):
            ax.plot(args.sizes, [rows[m][name] for m in args.sizes], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="weights in the tensor (millions)", ylabel="ms, median")
        ax.set_xticks(args.sizes, [str(m) for m in args.sizes])
        ax.set_title("One mask refresh (sparsity 80/50, fp32, CPU)")
        ax.legend(fontsize=7)
        common.save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
