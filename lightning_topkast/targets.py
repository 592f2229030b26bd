"""Which parameters Top-KAST masks.

Candidates are the parameters with two or more dimensions that no normalisation layer owns, in registration order,
each tensor once (a weight tied between two modules is one tensor with one mask). Biases and norm parameters are
never masked. By default the weights of Linear, Conv, Embedding, MultiheadAttention and recurrent layers are
masked; ``include`` / ``exclude`` patterns match either a parameter name (``fnmatch`` glob, e.g.
``"encoder.*.weight"``) or the class name of the module that owns it (e.g. ``"Conv2d"``, or ``"Linear"`` for any
subclass of it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.RNNBase,
)
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True)
class Candidate:
    """A parameter that could be masked, with the module that owns it."""

    name: str
    module: nn.Module
    param: nn.Parameter

    @property
    def type_names(self) -> list[str]:
        """Class names of the owning module and its bases, so ``"Linear"`` also matches a Linear subclass."""
        return [cls.__name__ for cls in type(self.module).__mro__ if issubclass(cls, nn.Module)]

    def matches(self, pattern: str) -> bool:
        """Whether ``pattern`` is a glob of the parameter name or a class name of its module."""
        return fnmatch.fnmatchcase(self.name, pattern) or pattern in self.type_names

    @property
    def is_default(self) -> bool:
        """Masked when no ``include`` is given: a weight of a default layer type."""
        return isinstance(self.module, DEFAULT_MODULE_TYPES) and "weight" in self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Selection:
    """The outcome of target selection: names to mask, in order, and the names kept dense with the reason."""

    masked: list[str]
    kept_dense: dict[str, str]


def candidates(model: nn.Module) -> Iterator[Candidate]:
    """Every parameter of ≥ 2 dimensions outside normalisation layers, in registration order, each tensor once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.ndim >= 2 and not isinstance(module, NORM_MODULE_TYPES):
                yield Candidate(f"{module_name}.{param_name}" if module_name else param_name, module, param)


def select(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dense_first_layer: bool = True,
    dense_last_layer: bool = False,
) -> Selection:
    """Choose the parameters to mask; every ``include`` and ``exclude`` entry must match some candidate.

    ``dense_first_layer`` / ``dense_last_layer`` keep the first / last chosen tensor (registration order) dense.
    """
    pool = list(candidates(model))
    _check_patterns("include", include, pool)
    _check_patterns("exclude", exclude, pool)
    chosen = [c for c in pool if (any(c.matches(p) for p in include) if include is not None else c.is_default)]
    chosen = [c for c in chosen if not any(c.matches(p) for p in exclude or ())]
    kept_dense: dict[str, str] = {}
    if dense_first_layer and chosen:
        kept_dense[chosen.pop(0).name] = "first layer (dense_first_layer=True)"
    if dense_last_layer and chosen:
        kept_dense[chosen.pop().name] = "last layer (dense_last_layer=True)"
    if not chosen:
        raise ValueError(_nothing_to_mask(pool, include, exclude, kept_dense))
    return Selection([c.name for c in chosen], kept_dense)


def _check_patterns(argument: str, patterns: Sequence[str] | None, pool: list[Candidate]) -> None:
    for pattern in patterns or ():
        if not any(c.matches(pattern) for c in pool):
            raise ValueError(
                f"TopKASTCallback({argument}=[..., {pattern!r}, ...]): {pattern!r} matches no parameter of two or "
                f"more dimensions by name (glob) or module type. {_known(pool)}"
            )


def _nothing_to_mask(
    pool: list[Candidate], include: Sequence[str] | None, exclude: Sequence[str] | None, kept_dense: dict[str, str]
) -> str:
    why = f"include={list(include)!r}, exclude={list(exclude or [])!r}" if include is not None else "the defaults"
    dense = f" and kept dense: {', '.join(f'{n} ({r})' for n, r in kept_dense.items())}" if kept_dense else ""
    return (
        f"TopKASTCallback found no parameter to mask with {why}{dense}. Masked by default are the weights of "
        f"Linear, Conv, Embedding, MultiheadAttention and RNN layers; name others with include=[...], or pass "
        f"dense_first_layer=False for a one-layer model. {_known(pool)}"
    )


def _known(pool: list[Candidate], limit: int = 8) -> str:
    if not pool:
        return "The model has no parameter of two or more dimensions."
    names = ", ".join(repr(c.name) for c in pool[:limit]) + (", ..." if len(pool) > limit else "")
    types = ", ".join(repr(t) for t in dict.fromkeys(c.type_names[0] for c in pool))
    return f"Candidates: {names}; module types: {types}."
