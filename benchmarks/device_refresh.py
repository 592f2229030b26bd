"""One refresh of every masked tensor of a 127M-parameter language model on the device path, per implementation.

    python benchmarks/device_refresh.py --json benchmarks/results/device_refresh.json           # on a GPU
    python benchmarks/device_refresh.py --device cpu --model lm --repeats 3                    # a smoke run

The model is overhead.py's ``llm`` (GPT-2-small's size, 145 masked tensors, 80/50 sparsity, fused AdamW after one
bf16 step, so that the optimizer state exists). For each implementation of the device path it times a whole refresh
of all masked tensors (both sets selected exactly from |θ| and applied: codes, α, optimizer state), median over
``--repeats`` after warm-up, with CUDA events on a GPU:

- ``triton``: the fused Triton passes and the radix select (:class:`lightning_topkast.triton_kernels.TritonGroup`);
- ``torch``: the same passes as torch operations and a stable sort (:class:`lightning_topkast.device.FlatGroup`);
- ``per tensor``: the passes per tensor with ``torch.kthvalue``, the device path before the flat groups.

Then it runs two optimizer steps of each with the engine's own calls under ``torch.cuda.set_sync_debug_mode
("error")``, which raises on any operation that waits for the device, and records that none did.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import overhead

from lightning_topkast import TopKAST
from lightning_topkast.device import FlatPasses

IMPLEMENTATIONS = ("triton", "torch", "per tensor")
FORWARD, BACKWARD = 0.2, 0.5


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """The device path's passes as ``name`` chooses (the Triton group where it runs, unless told torch)."""
    before = os.environ.get("LIGHTNING_TOPKAST_KERNELS")
    if name != "triton":
        os.environ["LIGHTNING_TOPKAST_KERNELS"] = "torch"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LIGHTNING_TOPKAST_KERNELS", None)
        else:
            os.environ["LIGHTNING_TOPKAST_KERNELS"] = before


def build(model_name: str, name: str, device: torch.device) -> tuple[Any, TopKAST, torch.optim.Optimizer]:
    """The model on ``device``, its engine (device path, ``name``'s passes) and fused AdamW after one step."""
    torch.manual_seed(0)
    module = overhead.make_model(model_name, 100)
    names = common.masked_weights(module)[1]
    module = module.to(device)
    params = dict(module.named_parameters())
    engine = TopKAST({n: params[n] for n in names}, dict.fromkeys(names, (FORWARD, BACKWARD)), sync_free=True)
    engine.batched_passes = name != "per tensor"
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=device.type == "cuda")
    engine.attach([optimizer])
    step(module, engine, optimizer, device)
    return module, engine, optimizer


def step(module: Any, engine: TopKAST, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    vocab, context = (overhead.LLM_VOCAB, 256) if isinstance(module, overhead.LLM) else (overhead.VOCAB, 64)
    ids = torch.randint(0, vocab, (4, context + 1), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = module(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    engine.before_step(optimizer)
    optimizer.step()
    optimizer.zero_grad()


@torch.no_grad()
def refresh_once(engine: TopKAST) -> None:
    if engine._flat:
        for index, groups in engine._flat.items():
            for group in groups:
                group.refresh(None, FlatPasses(group).state_kinds(engine._optimizers[index]))
    else:
        engine.refresh()


def time_refresh(engine: TopKAST, device: torch.device, repeats: int) -> list[float]:
    """Milliseconds per refresh of all masked tensors, each timed alone after three warm-ups."""
    for _ in range(3):
        refresh_once(engine)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            refresh_once(engine)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            refresh_once(engine)
            times.append((time.perf_counter() - began) * 1e3)
    return times


def sync_checked(call: Callable[..., None]) -> Callable[..., None]:
    """``call`` under CUDA's sync check: any operation in it that waits for the device raises."""

    def checked(*args: Any) -> None:
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked


def steps_without_syncs(module: Any, engine: TopKAST, optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Two steps with the engine's own calls under CUDA's sync check; True if nothing waited (False: it raised)."""
    if device.type != "cuda":
        return False
    after_step, before_step = engine._after_step, engine.before_step
    engine._after_step, engine.before_step = sync_checked(after_step), sync_checked(before_step)  # type: ignore[method-assign]
    try:
        for _ in range(2):
            step(module, engine, optimizer, device)
    except RuntimeError as error:
        print(f"  a sync: {error}", file=sys.stderr)
        return False
    finally:
        engine._after_step, engine.before_step = after_step, before_step  # type: ignore[method-assign]
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llm", choices=("llm", "lm"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = common.provenance()
    device = torch.device(args.device)
    found: dict[str, dict[str, Any]] = {}
    for name in args.implementations:
        with implementation(name):
            module, engine, optimizer = build(args.model, name, device)
            group = type(next(iter(engine._flat.values()))[0]).__name__ if engine._flat else "per tensor"
            times = time_refresh(engine, device, args.repeats)
            found[name] = {
                "group": group,
                "tensors": len(engine.tensors),
                "weights": sum(t.numel for t in engine.tensors.values()),
                "refresh_ms": times,
                "median_ms": statistics.median(times),
                "no_sync": steps_without_syncs(module, engine, optimizer, device),
                "bytes_per_weight": engine.memory_bytes() / sum(t.numel for t in engine.tensors.values()),
            }
        print(
            f"{name:10s} ({group}): {found[name]['median_ms']:8.3f} ms per refresh of {found[name]['tensors']} "
            f"tensors, {found[name]['weights'] / 1e6:.1f}M weights; no sync in a step: {found[name]['no_sync']}",
            flush=True,
        )
        del module, engine, optimizer
    if args.json:
        where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        record = {"kind": "device refresh", "model": args.model, "device": where, "runs": found}
        common.write_json(args.json, record, started)


if __name__ == "__main__":
    main()
