"""The callback's own cost per step, apart from the forward and backward passes, and why AdamW makes it larger.

    python benchmarks/optimizer_step.py --plot benchmarks/results/optimizer_step.png

Part 1 times only what Top-KAST adds around the update, on the Transformer LM of ``overhead.py``: from after
``backward()`` to the end of ``optimizer.step()`` (``TopKAST.before_step``, the update, the step post-hook; a
refresh every step at interval 1), against the same optimizer step without Top-KAST, for AdamW unfused (torch's
CPU default) and ``fused=True``. Every configuration trains its own copy of the model; the steps are interleaved
and the table gives the median.

Part 2 is the cause of the unfused AdamW's extra time: torch's ``sqrt`` on CPU is several times slower on zeros
than on positive numbers, and Top-KAST keeps AdamW's second moment at exactly 0 outside the backward set B (so
that nothing outside B moves). It times ``sqrt`` and a whole AdamW step over 12 tensors of 262,144 weights with
none or half of the gradients zero.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from overhead import VOCAB

from lightning_topkast import TopKAST

TENSOR = 262_144


def callback_cost(steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds from after backward() to the end of the step, per configuration."""
    torch.manual_seed(0)
    module = common.CharLM(VOCAB, 1000, d_model=256, n_layers=4, n_heads=8, context=64)
    base = module.model
    masked = [name.removeprefix("model.") for name in common.masked_weights(module)[1]]
    ids = torch.randint(0, VOCAB, (16, 65))
    runs = {}
    for fused in (False, True):
        for interval in (None, 100, 1):
            model = copy.deepcopy(base)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=fused)
            engine = None
            if interval is not None:
                params = dict(model.named_parameters())
                densities = dict.fromkeys(masked, (0.2, 0.5))
                engine = TopKAST({n: params[n] for n in masked}, densities, update_interval=interval)
                engine.attach([optimizer])
            name = ("dense" if interval is None else f"Top-KAST, interval {interval}") + (", fused" if fused else "")
            runs[name] = (model, optimizer, engine)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(warmup + steps):
        for name, (model, optimizer, engine) in runs.items():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            start = time.perf_counter()
            if engine is not None:
                engine.before_step(optimizer)
            optimizer.step()
            if step >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
            optimizer.zero_grad()
    return {name: statistics.median(t) for name, t in times.items()}


def adamw_step_ms(implementation: str, zero_fraction: float) -> float:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(TENSOR, generator=g)) for _ in range(12)]
    for p in params:  # AdamW leaves the gradient as it is, so one draw serves every step
        p.grad = torch.randn(TENSOR, generator=g) * (torch.rand(TENSOR, generator=g) >= zero_fraction)
    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[implementation]
    optimizer = torch.optim.AdamW(params, lr=1e-3, **flags)
    return statistics.median(common.time_ms(optimizer.step, 25, warmup=3))


def sqrt_ms() -> dict[str, float]:
    positive = torch.rand(TENSOR) + 0.5
    half_zero = positive * (torch.rand(TENSOR, generator=torch.Generator().manual_seed(1)) < 0.5)
    inputs = [("positive", positive), ("half zeros", half_zero), ("all zeros", torch.zeros(TENSOR))]
    return {name: statistics.median(common.time_ms(x.sqrt, 30)) for name, x in inputs}


def tables(record: dict) -> str:
    """The three tables of this benchmark, from its JSON record."""
    cost = record["callback_cost"]
    lines = [
        f"`before_step` + `optimizer.step` + post-hook, LM with 3.2M masked weights, median of {record['steps']} steps",
        "",
        "| configuration | ms | over the same dense step (ms) |",
        "|---|---|---|",
    ]
    for name, ms in cost.items():
        dense = cost["dense, fused" if name.endswith("fused") else "dense"]
        lines.append(f"| {name} | {ms:.1f} | {ms - dense:+.1f} |")
    lines += ["", f"`sqrt` of {TENSOR:,} floats, median of 30, ms", "", "| input | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in record["sqrt"].items()]
    lines += [
        "",
        f"AdamW step over 12 tensors of {TENSOR:,} weights, median of 25, ms",
        "",
        "| implementation | no zero gradients | half the gradients zero |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {none:.2f} | {half:.2f} |" for name, (none, half) in record["adamw"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of part 1 here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    started = common.provenance()  # of the code that runs, not of whatever is checked out at the end
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    record = {
        "steps": args.steps,
        "callback_cost": callback_cost(args.steps, args.warmup),
        "sqrt": sqrt_ms(),
        "adamw": {i: (adamw_step_ms(i, 0.0), adamw_step_ms(i, 0.5)) for i in ("for-loop", "foreach", "fused")},
    }
    print(tables(record))
    if args.json:
        common.write_json(args.json, record, started)
    if args.plot:
        plot(record["callback_cost"], args.plot)


def plot(cost: dict[str, float], path: Path) -> None:
    fig, ax = common.new_figure(6.5, 3.0)
    names = list(cost)
    ax.barh(names, [cost[n] for n in names], color=["gray" if n.startswith("dense") else "C0" for n in names])
    ax.invert_yaxis()
    ax.set(xlabel="ms per step (after backward, to the end of the update)", title="Top-KAST's own cost per step, LM")
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
