"""Which parameters Top-KAST masks, and why each of the others stays dense.

Candidates are the floating-point parameters with two or more dimensions that no normalisation layer owns, in
registration order, each tensor once (a weight tied between two modules is one tensor with one mask, under its first
name). By default every trainable candidate is masked, whether a known layer owns it (Linear, Conv, Embedding,
MultiheadAttention, LSTM) or it is a raw ``nn.Parameter`` used through ``F.linear``: the convention of JaxPruner and
Cerebras' sparsity. Biases, other 1-D parameters and normalisation layers are never masked.

``include`` / ``exclude`` patterns match either a parameter name (``fnmatch`` glob, e.g. ``"encoder.*.weight"``) or
the class name of the module that owns it (e.g. ``"Conv2d"``, or ``"Linear"`` for any subclass of it). An explicit
``include`` is the user's word: ``dense_first_layer`` / ``dense_last_layer`` shape the default selection only. When
they would leave nothing to mask (a one-layer model), the layer is masked anyway and a note says why.

"First" and "last" mean the order in which the forward pass uses the tensors when that order is known
(:class:`ForwardOrder` records it from one forward pass), and registration order before. The two differ more often
than one would think: LitGPT's ``GPT`` registers its output head ``lm_head`` before the token embedding
``transformer.wte``, so by registration the "first layer" is the head and the "last" is a block's projection.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
# norms written by hand in the wild: LlamaRMSNorm, T5LayerNorm, FusedLayerNorm, ScaleNorm, BatchNorm2d
_NORM_NAME = re.compile(r"Norm(\d[dD])?$")

DEFAULT_REASON = "default: floating point, 2+ dims, trainable"
FIRST = "dense_first_layer"
LAST = "dense_last_layer"


def glob_match(name: str, pattern: str) -> bool:
    """Whether ``name`` is ``pattern`` or matches it as an ``fnmatch`` glob (case-sensitive): the one matcher.

    Examples:
        >>> glob_match("encoder.0.weight", "encoder.*"), glob_match("net.[46].weight", "net.[46].weight")
        (True, True)
    """
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


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
        return glob_match(self.name, pattern) or pattern in self.type_names


@dataclass(frozen=True)
class Selection:
    """The outcome of target selection: what ``TopKASTCallback.select_targets`` returns.

    Attributes:
        masked: names of the tensors to mask, in order.
        kept_dense: candidates (floating point, 2+ dims, outside norms) left dense, each with the reason.
        reasons: why each masked tensor is masked.
        never_masked: the other parameters (biases, 1-D, normalisation layers), each with the reason.
        notes: what the user should hear about (e.g. a switch overruled on a one-layer model).
    """

    masked: list[str]
    kept_dense: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    never_masked: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, NORM_MODULE_TYPES):
        return True
    return any(_NORM_NAME.search(cls.__name__) for cls in type(module).__mro__ if issubclass(cls, nn.Module))


def _never_reason(module: nn.Module, param: nn.Parameter) -> str | None:
    if _is_norm(module):
        return f"normalisation layer ({type(module).__name__})"
    if not param.is_floating_point():
        return f"not floating point ({param.dtype})"
    if param.ndim < 2:
        return "bias or other 1-D parameter" if param.ndim == 1 else "scalar"
    return None


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{param_name}" if module_name else param_name, module, param


def candidates(model: nn.Module) -> Iterator[Candidate]:
    """Every floating-point parameter of 2+ dimensions outside normalisation layers, in registration order, once."""
    for name, module, param in _walk(model):
        if _never_reason(module, param) is None:
            yield Candidate(name, module, param)


def never_masked(model: nn.Module) -> dict[str, str]:
    """The parameters that are not candidates, each with the reason (biases, 1-D, norms, integer tensors)."""
    return {name: why for name, module, param in _walk(model) if (why := _never_reason(module, param)) is not None}


def select(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dense_first_layer: bool = True,
    dense_last_layer: bool = False,
    order: Sequence[str] | None = None,
) -> Selection:
    """Choose the parameters to mask; every ``include`` and ``exclude`` entry must match some candidate.

    Without ``include``, every trainable candidate is masked except those ``exclude`` names, and then
    ``dense_first_layer`` / ``dense_last_layer`` keep the first / last of them dense unless that would leave nothing
    to mask: first and last in ``order`` (candidate names in the order a forward pass uses them, from
    :class:`ForwardOrder`), or in registration order when ``order`` is None or names none of them. With
    ``include``, exactly the included candidates not excluded are masked.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> selection = select(model)
        >>> selection.masked, selection.kept_dense
        (['2.weight'], {'0.weight': 'first layer (dense_first_layer=True)'})
        >>> select(model, include=["Linear"]).masked  # include is the user's word
        ['0.weight', '2.weight']
    """
    pool = list(candidates(model))
    _check_patterns("include", include, pool)
    _check_patterns("exclude", exclude, pool)
    masked: dict[str, str] = {}
    dense: dict[str, str] = {}
    for candidate in pool:
        chosen, why = _decide(candidate, include, exclude)
        (masked if chosen else dense)[candidate.name] = why
    notes: list[str] = []
    if include is None:
        notes = _apply_first_last(masked, dense, dense_first_layer, dense_last_layer, order)
    if not masked:
        raise ValueError(_nothing_to_mask(pool, include, exclude, dense))
    order = [c.name for c in pool]
    return Selection(
        masked=list(masked),
        kept_dense={name: dense[name] for name in order if name in dense},
        reasons=masked,
        never_masked=never_masked(model),
        notes=notes,
    )


def _decide(candidate: Candidate, include: Sequence[str] | None, exclude: Sequence[str] | None) -> tuple[bool, str]:
    """Whether ``candidate`` is masked (before the first/last switches), and why."""
    if include is not None:
        hit = next((p for p in include if candidate.matches(p)), None)
        if hit is None:
            return False, "not matched by include"
        why = f"include {hit!r}"
    elif not candidate.param.requires_grad:
        return False, "frozen (requires_grad=False)"
    else:
        why = DEFAULT_REASON
    excluded = next((p for p in exclude or () if candidate.matches(p)), None)
    return (False, f"exclude {excluded!r}") if excluded is not None else (True, why)


def _apply_first_last(
    masked: dict[str, str], dense: dict[str, str], first: bool, last: bool, used: Sequence[str] | None
) -> list[str]:
    """Move the first/last masked tensor to ``dense``; if that would empty ``masked``, keep them and say why."""
    order = [name for name in used or () if name in masked] or list(masked)
    where = " in the forward pass" if order and used and order[0] in used else ""
    dropped: dict[str, str] = {}
    if first and order:
        dropped[order[0]] = FIRST
    if last and order and order[-1] not in dropped:
        dropped[order[-1]] = LAST
    if not dropped:
        return []
    if len(dropped) < len(masked):
        for name, switch in dropped.items():
            dense[name] = f"{'first' if switch == FIRST else 'last'} layer{where} ({switch}=True)"
            del masked[name]
        return []
    switches = sorted(set(dropped.values()))
    flags = ", ".join(f"{s}=True" for s in switches)
    names = ", ".join(dropped)
    for name in dropped:
        masked[name] = f"masked anyway: {flags} would leave nothing to mask"
    fix = ", ".join(f"{s}=False" for s in switches)
    return [
        f"TopKASTCallback({flags}) would keep {names} dense, and it is all there is to mask: masking it anyway. "
        f"Pass {fix} to silence this, or exclude={list(dropped)!r} to train it dense."
    ]


class ForwardOrder(TorchFunctionMode):
    """Records the order in which a forward pass first hands each candidate of ``model`` to a torch function.

    A function mode sees the ``nn.Parameter`` objects themselves (``F.linear(x, self.weight)``,
    ``F.embedding(ids, self.weight)``, an LSTM's list of flat weights), before autocast makes copies of them, so a
    tied weight counts at its first use and a raw ``nn.Parameter`` used through ``F.linear`` counts where it is used,
    not where its module's ``forward`` begins. Only uses inside the ``forward`` of ``model`` or one of its submodules
    count: a callback that reads the weights in ``on_train_batch_start`` (a snapshot, a norm) is not the forward
    pass, and neither is a strategy's wrapper (DDP's, Lightning's), so every strategy finds the same order. Entered
    and left across Lightning hooks (:meth:`start`, :meth:`stop`), around the first training batch's forward only.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._names = {id(c.param): c.name for c in candidates(model)}
        self._modules = {id(module) for module in model.modules()}
        self.order: list[str] = []
        self._depth = 0  # module forward calls in progress
        self._hooks: list[Any] = []  # while recording: the global forward hooks that count them

    def start(self) -> None:
        """Begin recording (a no-op while recording)."""
        if self._hooks:
            return
        self._depth = 0
        self._hooks = [
            register_module_forward_pre_hook(lambda module, args: self._enter(module)),
            register_module_forward_hook(lambda module, args, output: self._leave(module), always_call=True),
        ]
        self.__enter__()

    def stop(self) -> None:
        """End recording (a no-op unless recording)."""
        if self._hooks:
            self.__exit__(None, None, None)
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    def _enter(self, module: nn.Module) -> None:
        self._depth += id(module) in self._modules

    def _leave(self, module: nn.Module) -> None:
        self._depth = max(self._depth - (id(module) in self._modules), 0)

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self._depth:
            for leaf in tree_leaves((args, kwargs)):
                name = self._names.pop(id(leaf), None) if isinstance(leaf, Tensor) else None
                if name is not None:
                    self.order.append(name)
        return func(*args, **kwargs)


def _check_patterns(argument: str, patterns: Sequence[str] | None, pool: list[Candidate]) -> None:
    for pattern in patterns or ():
        if not any(c.matches(pattern) for c in pool):
            raise ValueError(
                f"TopKASTCallback({argument}=[..., {pattern!r}, ...]): {pattern!r} matches no parameter of two or "
                f"more dimensions by name (glob) or module type. {_known(pool)}"
            )


def _nothing_to_mask(
    pool: list[Candidate], include: Sequence[str] | None, exclude: Sequence[str] | None, dense: Mapping[str, str]
) -> str:
    known = _known(pool)
    if not pool:
        return (
            "TopKASTCallback found no parameter to mask: Top-KAST masks floating-point parameters of two or more "
            f"dimensions outside normalisation layers (weight matrices, kernels, embeddings). {known}"
        )
    if include is not None and not include:
        return (
            "TopKASTCallback(include=[]): selects no parameter to mask. List parameter-name globs or module class "
            f"names, e.g. include=['Linear'], or leave include unset to mask every candidate. {known}"
        )
    if any(why.startswith("exclude ") for why in dense.values()):
        argument = f"include={list(include)!r}, exclude={list(exclude or [])!r}" if include else f"exclude={exclude!r}"
        what = "every tensor that include selects" if include else "every candidate"
        frozen = [name for name, why in dense.items() if why.startswith("frozen")]
        also = f" (the others are frozen: {', '.join(frozen)})" if frozen else ""
        return (
            f"TopKASTCallback({argument}): exclude removes {what}{also}, leaving nothing to mask. Remove a pattern "
            f"from exclude. {known}"
        )
    return (
        "TopKASTCallback found no parameter to mask: every candidate is frozen (requires_grad=False). Name the ones "
        f"to mask anyway with include=[...]. {known}"
    )


def _known(pool: list[Candidate], limit: int = 8) -> str:
    if not pool:
        return "The model has no such parameter."
    names = ", ".join(repr(c.name) for c in pool[:limit]) + (", ..." if len(pool) > limit else "")
    types = ", ".join(repr(t) for t in dict.fromkeys(c.type_names[0] for c in pool))
    return f"Candidates: {names}; module types: {types}."
