"""Argument checks for ``TopKASTCallback`` and hints about the training setup.

Each error names the argument, shows the value and says what is valid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def check_strategy(strategy: object, refused: tuple[type, ...], model_parallel: type) -> None:
    """Raise for a strategy whose shards the whole tensor's top-k cannot follow.

    ``refused``: Lightning's ``FSDPStrategy`` (FSDP1's flat parameters) and ``DeepSpeedStrategy``; ``model_parallel``:
    ``ModelParallelStrategy``, supported with data parallelism only (FSDP2). The caller passes the classes, so a
    subclass is caught by ``isinstance`` and a rename in Lightning fails at import, not silently.
    """
    if isinstance(strategy, refused):
        raise ValueError(
            f"TopKASTCallback does not support Trainer(strategy={type(strategy).__name__}): its shards are not the "
            "whole tensors Top-KAST ranks. Shard with FSDP2 instead: Trainer(strategy=ModelParallelStrategy("
            'data_parallel_size=N, tensor_parallel_size=1)) with fully_shard in configure_model (README, "Training '
            "models larger than one device\"), or use strategy='ddp' or a single device."
        )
    if isinstance(strategy, model_parallel):
        try:
            mesh = strategy.device_mesh  # type: ignore[attr-defined]  # built by setup_environment, before fit's setup
        except RuntimeError:  # not set up yet: judged when it is
            return
        size = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
        if size > 1:
            raise ValueError(
                f"TopKASTCallback does not support ModelParallelStrategy(tensor_parallel_size={size}): tensor-parallel "
                "shards split rows and columns across ranks. Use tensor_parallel_size=1 (FSDP2 data parallelism)."
            )


def check_sharded_plan(parameters: Mapping[str, torch.Tensor], distribution: str) -> None:
    """Raise for a configuration sharded parameters do not support: one top-k over several sharded tensors."""
    from lightning_topkast.sharded import placement_of

    if distribution != "global":
        return
    names = [name for name, p in parameters.items() if placement_of(name, p) is not None]
    if names:
        raise ValueError(
            f"distribution='global' with sharded parameters ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
            "): one top-k over several sharded tensors is not supported. Use distribution='uniform' or 'erk'."
        )


def slow_optimizers(optimizers: Sequence[torch.optim.Optimizer], masked: Sequence[torch.Tensor]) -> list[str]:
    """Hints for Adam/AdamW updating masked CPU tensors without ``fused=True``: their step is several times slower.

    Top-KAST keeps the optimizer state at exactly 0 outside B, and torch's unfused CPU ``sqrt`` of the second
    moment is 5-9x slower on zeros (benchmarks/optimizer_step.py); the fused kernel does not care.
    """
    ids = {id(p) for p in masked if p.device.type == "cpu"}
    hints = []
    for optimizer in optimizers:
        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or optimizer.defaults.get("fused"):
            continue
        if any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
            name = type(optimizer).__name__
            hints.append(
                f"{name} updates masked CPU tensors without fused=True: its step is several times slower on the zero "
                f"state Top-KAST keeps outside the backward set (torch's unfused sqrt is slow on zeros). "
                f"Build it with torch.optim.{name}(..., fused=True)."
            )
    return hints


def density(sparsity: float) -> float:
    """The density ``1 - sparsity``, the paper's D."""
    # 1 - 0.8 is 0.19999999999999996 in floats; rounding keeps summaries and checkpoints free of that noise
    return round(1.0 - sparsity, 12)


def fraction(argument: str, value: Any, upper: float, closed: bool = True) -> float:
    """A number in ``[0, upper]`` (``[0, upper)`` when not ``closed``)."""
    interval = f"[0, {upper}]" if closed else f"[0, {upper})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"TopKASTCallback({argument}={value!r}): must be a number in {interval}")
    inside = 0.0 <= value <= upper if closed else 0.0 <= value < upper
    if not inside:
        why = ""
        if argument == "backward_sparsity":
            why = " (at most forward_sparsity, because the backward set contains the forward set)"
        raise ValueError(f"TopKASTCallback({argument}={value!r}): must be in {interval}{why}")
    return float(value)


def optional_fraction(argument: str, value: Any) -> float | None:
    """A number in ``[0, 1]``, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"TopKASTCallback({argument}={value!r}): must be a number in [0, 1], or None to turn it off")
    return float(value)


def choice(argument: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"TopKASTCallback({argument}={value!r}): unknown; use one of {', '.join(map(repr, choices))}")
    return str(value)


def flag(argument: str, value: Any) -> bool:
    """True or False, nothing truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"TopKASTCallback({argument}={value!r}): must be True or False")
    return value


def positive_int(argument: str, value: Any) -> int:
    """An integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TopKASTCallback({argument}={value!r}): must be an integer >= 1 (optimizer steps)")
    return value


def non_negative_int(argument: str, value: Any, meaning: str) -> int:
    """An integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"TopKASTCallback({argument}={value!r}): must be an integer >= 0 ({meaning})")
    return value


def non_negative(argument: str, value: Any) -> float:
    """A finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"TopKASTCallback({argument}={value!r}): must be a finite number >= 0 (0 turns it off)")
    return float(value)


def patterns(argument: str, value: Any) -> list[str] | None:
    """A list of name globs or module class names, or None."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise TypeError(
            f"TopKASTCallback({argument}={value!r}): must be a list of parameter-name globs or module class names, "
            f"e.g. {argument}=['encoder.*', 'Conv2d']"
        )
    return list(value)


def overrides(value: Any) -> dict[str, tuple[float, float]]:
    """``{name: (forward_sparsity, backward_sparsity)}`` with each pair valid."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"TopKASTCallback(sparsity_overrides={value!r}): must map names to [forward_sparsity, backward_sparsity]"
        )
    pinned = {}
    for name, pair in value.items():
        if not isinstance(name, str):
            raise TypeError(
                f"TopKASTCallback(sparsity_overrides={dict(value)!r}): keys must be parameter names or globs (str), "
                f"got {name!r}; e.g. {{'net.2.weight': [0.9, 0.8]}}"
            )
        example = f"sparsity_overrides={{{name!r}: [0.9, 0.8]}}"
        if isinstance(pair, str | Mapping) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"TopKASTCallback(sparsity_overrides={{{name!r}: {pair!r}}}): give [forward_sparsity, "
                f"backward_sparsity], e.g. {example}"
            )
        forward = fraction(f"sparsity_overrides[{name!r}][0]", pair[0], upper=1.0, closed=False)
        backward = fraction(f"sparsity_overrides[{name!r}][1]", pair[1], upper=forward)
        pinned[name] = (forward, backward)
    return pinned
