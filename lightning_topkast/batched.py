"""Exact top-k thresholds of many tensors at once, on any device, with no host sync.

The device path's selection. Every masked tensor of one dtype and device lies in one flat buffer; a *segment* is
the range of one selection unit (one tensor, or a global pool) in it, and a *query* asks for the top-``k`` threshold
of one segment. One call answers every query, so the work launched does not grow with the number of tensors.

The order is the CPU path's (:mod:`lightning_topkast.kernels`): the integer score of |θ|, ties to the lower index,
NaN last, so the sets are the CPU path's, bit for bit. A :class:`~lightning_topkast.kernels.Threshold` names the
``k``-th entry: its score and one past its index in the segment. (The CPU path writes ``k = 0`` and ``k = size`` as
sentinels, ``(top + 1, 0)`` and ``(-1, size)``; here they name the first and the last entry: the same sets.) Two
implementations, equal bit for bit:

- :func:`select_by_sort`: one stable sort of segment-keyed scores (as JaxPruner's exact top-k), in torch operations
  (:func:`segment_order`; the device path also reads the new sets from the order itself);
- :func:`lightning_topkast.triton_kernels.select_by_radix`: a radix select over the score bits in Triton, a few
  rounds of per-tile digit histograms and no sort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

_SEGMENT_SHIFT = 32  # segment ids above the scores, which take at most 32 bits below fp64


@dataclass(frozen=True)
class Queries:
    """Segments of a flat buffer and the top-``k`` thresholds asked of them; built once, on the host.

    Args:
        sizes: the length of each segment, in order: segment ``i`` starts where ``i - 1`` ends.
        segment: the segment of each query.
        k: the number of entries each query's threshold selects.
        device: where the flat buffer lives.
    """

    sizes: tuple[int, ...]
    segment: tuple[int, ...]
    k: tuple[int, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    starts: tuple[int, ...] = field(init=False)
    tensors: dict[str, Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        object.__setattr__(self, "starts", tuple(starts))
        first = [starts[s] for s in self.segment]
        named = [min(max(k, 1), self.sizes[s]) for k, s in zip(self.k, self.segment, strict=True)]
        values = {
            "sizes": torch.tensor(self.sizes, dtype=torch.int64),
            "segment_starts": torch.tensor(starts, dtype=torch.int64),
            "start": torch.tensor(first, dtype=torch.int64),
            # the entry a threshold names: the k-th, or the first for k = 0 (then it selects what is before it)
            "named": torch.tensor(named, dtype=torch.int64),
            "position": torch.tensor([a + n - 1 for a, n in zip(first, named, strict=True)], dtype=torch.int64),
            # split = the named entry's flat index + this: one past it in its segment, or at it for k = 0
            "split_shift": torch.tensor([1 - a - (k <= 0) for a, k in zip(first, self.k, strict=True)]),
            "segment_base": torch.arange(len(self.sizes), dtype=torch.int64) << _SEGMENT_SHIFT,
            "query_base": torch.tensor(self.segment, dtype=torch.int64) << _SEGMENT_SHIFT,
        }
        object.__setattr__(self, "tensors", {name: t.to(self.device) for name, t in values.items()})

    @property
    def numel(self) -> int:
        """Entries in the flat buffer."""
        return sum(self.sizes)

    def cached(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        """A tensor derived from the layout, made on first use."""
        if name not in self.tensors:
            self.tensors[name] = make()
        return self.tensors[name]

    def per_entry(self, values: Tensor) -> Tensor:
        """``values`` of shape ``[segments, ...]`` repeated for every entry of each segment (no host sync)."""
        return torch.repeat_interleave(values, self.tensors["sizes"], dim=0, output_size=self.numel)


def select_by_sort(scores: Tensor, queries: Queries, top: int, out: Tensor | None = None) -> Tensor:
    """Every query's threshold from one stable sort of the flat integer ``scores``: ``[queries, 2]`` (score, split).

    ``scores`` are :func:`lightning_topkast.kernels.scores` of the flat buffer and ``top`` the score of inf. The
    threshold names an entry of the order (:func:`segment_order`): the ``k``-th, so that it selects the first ``k``;
    for ``k = 0`` the first, with the split at its index, so that it selects none. Written into ``out`` if given.

    Examples:
        >>> from lightning_topkast.kernels import infinity_score, scores
        >>> q = Queries(sizes=(5, 3), segment=(0, 0, 1), k=(3, 5, 1))
        >>> theta = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, -0.5, 0.5, 0.25])
        >>> select_by_sort(scores(theta), q, infinity_score(theta.dtype))[:, 1].tolist()
        [3, 1, 1]
    """
    return thresholds_in_order(scores, segment_order(scores, queries, top), queries, out)


def segment_order(scores: Tensor, queries: Queries, top: int) -> Tensor:
    """The flat indices of every segment's entries in the selection order, one segment after the other.

    Within a segment: descending score (-0.5 ties 0.5), ties by index (a stable sort), NaN (score -1) last. The
    sort key puts the segment above the score, so each segment keeps its range of positions: the ``k``-th entry of
    segment ``s`` is at position ``start(s) + k - 1``, known in advance.

    Examples:
        >>> from lightning_topkast.kernels import infinity_score, scores
        >>> theta = torch.tensor([1.0, 3.0, 2.0, 3.0, -0.5, float("nan"), 0.5])
        >>> segment_order(scores(theta), Queries(sizes=(4, 3), segment=(), k=()), infinity_score(theta.dtype)).tolist()
        [1, 3, 2, 0, 4, 6, 5]
    """
    if scores.dtype == torch.int64:  # fp64: 63 bits of score leave no room for the segment: two stable sorts
        by_score = torch.sort(top - scores, stable=True).indices  # ascending in this is descending |θ|, NaN last
        segment = queries.per_entry(torch.arange(len(queries.sizes), device=scores.device))
        return by_score[torch.sort(segment[by_score], stable=True).indices]
    base = queries.cached(f"segment_base + {top}", lambda: queries.tensors["segment_base"] + top)
    return torch.sort(queries.per_entry(base) - scores, stable=True).indices  # int64 keys: segment, then top - score


def thresholds_in_order(scores: Tensor, order: Tensor, queries: Queries, out: Tensor | None = None) -> Tensor:
    """Every query's threshold ``[queries, 2]`` (score, split): the entry at its position of ``order``."""
    index = order[queries.tensors["position"]]
    if out is None:
        out = torch.empty(len(queries.k), 2, dtype=torch.int64, device=scores.device)
    torch.add(index, queries.tensors["split_shift"], out=out[:, 1])
    out[:, 0].copy_(scores[index])
    return out
