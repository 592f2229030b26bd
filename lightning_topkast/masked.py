"""A masked parameter's state (θ and its set bytes) and the selection units that tensors form.

A selection unit is what one top-k ranks: one tensor, or every tensor of the global pool. It holds the sizes of A
and B over its entries, the thresholds of its last refresh, and the schedule's counters
(:mod:`lightning_topkast.schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_topkast import kernels, selection, sharded
from lightning_topkast.kernels import A_BIT, B_BIT, EVER_BIT
from lightning_topkast.schedule import Flag


@dataclass(eq=False)
class MaskedTensor:
    """One masked parameter: its dense values θ and one byte per weight for A, B and "ever in A".

    Of a sharded parameter (a ``DTensor``), θ and the set bytes cover this rank's shard only.
    """

    name: str
    param: nn.Parameter
    forward_density: float
    backward_density: float
    in_global_pool: bool
    kernels: kernels.Kernels
    theta: Tensor = field(init=False)
    code: Tensor = field(init=False)
    forward_size: Any = field(init=False, default=0)  # |A| now: an int, or a 0-dim tensor without host syncs
    unit: Unit = field(init=False, repr=False)  # the tensors selected together with this one
    offset: int = field(init=False, default=0)  # index of this tensor's first entry in its unit
    placement: sharded.Placement | None = field(init=False, default=None)  # where a shard lies in the whole tensor

    def __post_init__(self) -> None:
        self.placement = sharded.placement_of(self.name, self.param)
        self.theta = self.local_param.detach().clone(memory_format=torch.contiguous_format)
        self.code = torch.zeros_like(self.theta, dtype=torch.uint8)

    @property
    def local_param(self) -> Tensor:
        """The parameter's values this rank holds: the parameter, or a ``DTensor``'s local shard (same storage)."""
        return sharded.local(self.param)

    @property
    def local_grad(self) -> Tensor | None:
        """The parameter's gradient on this rank (a ``DTensor``'s local shard), or None."""
        grad = self.param.grad
        return None if grad is None else sharded.local(grad)

    def optimizer_states(self, optimizer: Optimizer) -> dict[str, Tensor]:
        """Every state tensor ``optimizer`` keeps for the parameter in its shape, whatever it calls it (local shards).

        Any optimizer: its state for the parameter is found by shape, not by name.
        """
        states = optimizer.state.get(self.param, {})
        return {
            key: sharded.local(v) for key, v in states.items() if isinstance(v, Tensor) and v.shape == self.param.shape
        }

    @property
    def numel(self) -> int:
        """Number of weights held here (of a sharded parameter: in this rank's shard)."""
        return self.theta.numel()

    @property
    def total(self) -> int:
        """Number of weights in the whole tensor, over every shard."""
        return self.numel if self.placement is None else self.placement.numel

    @property
    def shape(self) -> list[int]:
        """The whole tensor's shape."""
        return list(self.theta.shape if self.placement is None else self.placement.shape)

    @property
    def forward_set(self) -> Tensor:
        """A as a bool tensor of the parameter's shape (a new tensor: compute it once per use)."""
        return self._bit(A_BIT)

    @property
    def backward_set(self) -> Tensor:
        """B as a bool tensor of the parameter's shape."""
        return self._bit(B_BIT)

    @property
    def ever_active(self) -> Tensor:
        """The weights that have ever been in A, as a bool tensor of the parameter's shape."""
        return self._bit(EVER_BIT)

    def _bit(self, bit: int) -> Tensor:
        return (self.code & bit) != 0

    @torch.no_grad()
    def write_forward_weights(self) -> None:
        """Make the parameter hold α: θ on A, exactly 0 elsewhere."""
        self.local_param.copy_(torch.where(self.forward_set, self.theta, 0))

    def kernels_for(self, *tensors: Tensor) -> kernels.Kernels:
        """This tensor's kernels, or torch's when a tensor they would touch is laid out otherwise."""
        if all(t.is_contiguous() for t in tensors):
            return self.kernels
        return kernels.TorchKernels()


@dataclass(eq=False)
class Unit:
    """Tensors whose sets are selected together: one tensor, or all of the global pool."""

    tensors: list[MaskedTensor]
    forward_k: int  # |A| and |B| over the unit
    backward_k: int
    forward: Any = None  # thresholds of the last refresh: Threshold, or two 0-dim tensors without host syncs
    backward: Any = None
    since_refresh: int = 0
    spacing: tuple[float | None, float | None] = (None, None)  # score units per entry near A's and B's thresholds
    # without host syncs: the early-refresh test of the last step, read one late
    early_flag: Flag | None = None
    size: int = field(init=False)
    mantissa: int = field(init=False)  # of θ's dtype: a score step of 2 ** mantissa doubles |θ|
    top: int = field(init=False)  # the score of inf

    def __post_init__(self) -> None:
        self.size = 0
        for tensor in self.tensors:  # ties across a pool go to the earlier tensor: global indices in this order
            # a shard's entries start where it lies in the whole tensor (a sharded tensor is a unit of its own)
            tensor.unit, tensor.offset = self, self.size if tensor.placement is None else tensor.placement.offset
            self.size += tensor.numel
        dtype = self.tensors[0].theta.dtype
        self.mantissa, self.top = kernels.mantissa_bits(dtype), kernels.infinity_score(dtype)


def make_unit(tensors: list[MaskedTensor]) -> Unit:
    """The unit of ``tensors``, which share one (D, D + M): |A| and |B| counted over all their entries."""
    size = sum(t.total for t in tensors)
    forward, backward = tensors[0].forward_density, tensors[0].backward_density
    return Unit(tensors, selection.count(forward, size), selection.count(backward, size))
