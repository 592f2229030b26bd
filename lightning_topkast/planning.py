"""The plan of a Top-KAST run: which tensors are masked and at which densities, settled before the first step.

:func:`plan` is pure (a model and a :class:`Config` in, a :class:`Plan` out; nothing is written to the model) and
owns everything that is decided from the model's structure: the targets (``targets.select``, or a ``Selection``
from ``TopKASTCallback.select_targets``), the per-name ``sparsity_overrides``, the density distribution and the
feasibility checks. The callback builds the engine from its output in one place::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> p = plan(model, Config(forward_sparsity=0.9, backward_sparsity=0.8, sparsity_overrides={"4.*": (0.5, 0.5)}))
    >>> p.densities
    {'2.weight': (0.1, 0.2), '4.weight': (0.5, 0.5)}
    >>> p.selection.kept_dense
    {'0.weight': 'first layer (dense_first_layer=True)'}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_topkast import distributions, targets
from lightning_topkast.selection import count
from lightning_topkast.targets import Selection
from lightning_topkast.validation import density


@dataclass(frozen=True)
class Config:
    """The arguments that decide targets and densities, as ``TopKASTCallback`` validated them."""

    forward_sparsity: float = 0.8
    backward_sparsity: float = 0.5
    distribution: str = "uniform"
    sparsity_overrides: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    dense_first_layer: bool = True
    dense_last_layer: bool = False


@dataclass(frozen=True)
class Plan:
    """What Top-KAST will do to a model.

    Attributes:
        selection: the targets and why every candidate is masked or kept dense.
        parameters: the masked parameters by name, in order (the engine's input).
        densities: ``{name: (D, D + M)}``, forward and backward density per masked tensor.
        global_pool: the names ranked together by one top-k (``distribution="global"``), else empty.
        pinned: ``{name: pattern}`` for the tensors a ``sparsity_overrides`` entry pins.
        shapes: the shape of every candidate (masked or kept dense), in registration order.
    """

    selection: Selection
    parameters: dict[str, nn.Parameter]
    densities: dict[str, tuple[float, float]]
    global_pool: list[str]
    pinned: dict[str, str]
    shapes: dict[str, tuple[int, ...]]


def plan(model: nn.Module, config: Config, selection: Selection | None = None) -> Plan:
    """Targets, densities and feasibility for ``model``; raises ``ValueError`` naming the argument at fault.

    ``selection`` replaces the default target selection (``targets.select`` with the config's patterns).
    """
    if selection is None:
        selection = targets.select(
            model, config.include, config.exclude, config.dense_first_layer, config.dense_last_layer
        )
    parameters = _parameters(model, selection)
    pinned = _pinned(config.sparsity_overrides, parameters)
    free = {name: tuple(p.shape) for name, p in parameters.items() if name not in pinned}
    densities = distributions.forward_backward_densities(
        config.distribution, free, density(config.forward_sparsity), density(config.backward_sparsity)
    )
    for name, pattern in pinned.items():
        forward, backward = config.sparsity_overrides[pattern]
        densities[name] = (density(forward), density(backward))
    global_pool = list(free) if config.distribution == "global" else []
    _check_dense_gradients(model, parameters)
    _check_forward_sets(config, parameters, densities, global_pool, pinned)
    named = dict(model.named_parameters(remove_duplicate=False))
    shapes = {c.name: tuple(c.param.shape) for c in targets.candidates(model)}
    shapes.update({name: tuple(named[name].shape) for name in selection.masked if name not in shapes})
    return Plan(
        selection=selection,
        parameters=parameters,
        densities={name: densities[name] for name in parameters},
        global_pool=global_pool,
        pinned=pinned,
        shapes=shapes,
    )


def _parameters(model: nn.Module, selection: Selection) -> dict[str, nn.Parameter]:
    """The selected parameters by name; names must exist and name distinct tensors."""
    named = dict(model.named_parameters(remove_duplicate=False))
    parameters: dict[str, nn.Parameter] = {}
    seen: dict[int, str] = {}
    for name in selection.masked:
        if name not in named:
            close = [n for n in named if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:8]
            raise ValueError(
                f"TopKASTCallback.select_targets returned {name!r}, which is not a parameter of the model. "
                f"Parameters with the same last name: {', '.join(close) or 'none'}"
            )
        param = named[name]
        if id(param) in seen:
            raise ValueError(
                f"TopKASTCallback.select_targets returned {seen[id(param)]!r} and {name!r}, which are one tied "
                "tensor: name it once (a tied tensor has one mask)"
            )
        seen[id(param)] = name
        parameters[name] = param
    return parameters


def _pinned(overrides: Mapping[str, tuple[float, float]], parameters: Mapping[str, nn.Parameter]) -> dict[str, str]:
    """``{name: pattern}``: the last override pattern that matches each masked tensor; every pattern must match."""
    pinned: dict[str, str] = {}
    for pattern, pair in overrides.items():
        hits = [name for name in parameters if targets.glob_match(name, pattern)]
        if not hits:
            names = list(parameters)
            raise ValueError(
                f"TopKASTCallback(sparsity_overrides={{{pattern!r}: {list(pair)}}}): {pattern!r} names no masked "
                f"tensor. Masked tensors: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
            )
        pinned.update(dict.fromkeys(hits, pattern))
    return pinned


def _check_dense_gradients(model: nn.Module, parameters: Mapping[str, nn.Parameter]) -> None:
    masked = {id(p) for p in parameters.values()}
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse and id(module.weight) in masked:
            kind = type(module).__name__
            raise ValueError(
                f"TopKASTCallback masks dense gradients, but an nn.{kind} has sparse=True; build it with "
                f"sparse=False or exclude it with exclude=['{kind}']"
            )


def _check_forward_sets(
    config: Config,
    parameters: Mapping[str, nn.Parameter],
    densities: Mapping[str, tuple[float, float]],
    global_pool: list[str],
    pinned: Mapping[str, str],
) -> None:
    """Refuse a budget that leaves a tensor (or the global pool) an empty forward set, with the largest fix."""
    free = {name: tuple(p.shape) for name, p in parameters.items() if name not in pinned}
    suggestion = f"Use forward_sparsity <= {distributions.max_sparsity(config.distribution, free):.4f}"
    if global_pool:
        total = sum(parameters[name].numel() for name in global_pool)
        forward_density = densities[global_pool[0]][0]
        if count(forward_density, total) == 0:
            raise ValueError(
                f"TopKASTCallback(forward_sparsity={config.forward_sparsity}, distribution='global'): the {total} "
                f"weights ranked together would keep round({forward_density:.4g} * {total}) = 0 in the forward "
                f"set, cutting the network off. {suggestion}."
            )
    for name, param in parameters.items():
        forward_density = densities[name][0]
        if name in global_pool or count(forward_density, param.numel()) > 0:
            continue
        if name in pinned:
            pattern = pinned[name]
            argument = f"sparsity_overrides={{{pattern!r}: {list(config.sparsity_overrides[pattern])}}}"
            alone = distributions.max_sparsity("uniform", {name: tuple(param.shape)})
            fix = f"Pin it at a forward sparsity <= {alone:.4f}"
        else:
            argument = f"forward_sparsity={config.forward_sparsity}"
            fix = f"{suggestion}, pin it with sparsity_overrides"
        raise ValueError(
            f"TopKASTCallback({argument}): {name} ({param.numel()} weights) would keep "
            f"round({forward_density:.4g} * {param.numel()}) = 0 weights in its forward set, cutting the layer "
            f"off. {fix}, or exclude it."
        )
