"""The device path's selection as Triton kernels: a radix select over the score bits of many tensors at once.

Each query (:class:`lightning_topkast.batched.Queries`) finds the ``k``-th entry of its segment in the order of
:mod:`lightning_topkast.kernels` (score of |θ|, ties to the lower index, NaN last), in a fixed number of launches
whatever the number of tensors, with no sort and no host sync:

1. rounds of 11-bit digits from the top of the key (2 for fp16/bf16, 3 for fp32, 6 for fp64): each tile of a
   segment counts the digits of its entries that match the prefix found so far in a histogram of its own
   (registers), then adds it to its query's histogram with one atomic per non-empty bin. The top digit of |θ| is
   its exponent, so most entries share a few bins: per-entry atomics there would serialise. A pick per query then
   finds the bin that holds its entry and the rank left within it;
2. a tie pass: each tile counts the entries equal to the key found; a pick per query walks its tiles' counts and
   finds the entry of the wanted rank by a cumulative sum within one tile: the threshold's split.

``TRITON_INTERPRET=1`` runs these kernels on CPU tensors (with numpy), which is how CI tests them against the
sort and the CPU path. The kernels take θ's bits as integers and load no pointer from memory, two things the
interpreter could not do.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_topkast import kernels
from lightning_topkast.batched import Queries
from lightning_topkast.device import Coefficients, FlatGroup

try:  # Triton ships with torch's CUDA wheels; on a CPU-only machine it is optional
    import triton
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

DIGIT_BITS = 11
BINS = 1 << DIGIT_BITS
_KEY_BITS = {torch.float16: 15, torch.bfloat16: 15, torch.float32: 31, torch.float64: 63}
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


launches = 0  # Triton kernels launched so far


@functools.cache
def _jit() -> Any:
    from lightning_topkast import _triton

    return _triton


def _launch(kernel: str, grid: int, *args: Any, **constants: Any) -> None:
    global launches
    launches += 1
    # no fused multiply-add: the passes round as torch's operations and the C loops (-ffp-contract=off) do
    getattr(_jit(), kernel)[(grid,)](*args, **constants, enable_fp_fusion=False)


ON_CPU = False  # tests set it: CPU tensors then take the Triton path too, run by the interpreter


def available(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``: a CUDA GPU, or, for tests, CPU tensors under the interpreter.

    The interpreter (``TRITON_INTERPRET=1`` before Triton is imported, and numpy) runs each program in Python: far
    too slow to train with, exact enough to test with. :data:`ON_CPU` opts CPU tensors in.
    """
    if triton is None or os.environ.get("LIGHTNING_TOPKAST_KERNELS") == "torch":
        return False
    if device.type == "cpu":
        return ON_CPU and os.environ.get("TRITON_INTERPRET") == "1"
    return device.type == "cuda"


@dataclass(frozen=True)
class RadixPlan:
    """The tiles of every query's segment, built once on the host for a :class:`~lightning_topkast.batched.Queries`.

    A tile is ``block * blocks_per_tile`` entries of one segment; a tile never spans two segments, so its histogram
    belongs to one query. Larger tiles mean fewer atomics per round; smaller ones more parallel work.
    """

    queries: Queries
    dtype: torch.dtype
    block: int = 1024
    blocks_per_tile: int = 16
    tables: dict[str, Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tile = self.block * self.blocks_per_tile
        tile_query, tile_start, tile_end, first, last = [], [], [], [], []
        for q, segment in enumerate(self.queries.segment):
            start, size = self.queries.starts[segment], self.queries.sizes[segment]
            first.append(len(tile_start))
            for lo in range(start, start + max(size, 1), tile):
                tile_query.append(q)
                tile_start.append(lo)
                tile_end.append(min(lo + tile, start + size))
            last.append(len(tile_start))
        rounds = -(-_KEY_BITS[self.dtype] // DIGIT_BITS)
        q = len(self.queries.segment)
        values = {
            "tile_query": torch.tensor(tile_query, dtype=torch.int64),
            "tile_start": torch.tensor(tile_start, dtype=torch.int64),
            "tile_end": torch.tensor(tile_end, dtype=torch.int64),
            "first_tile": torch.tensor(first, dtype=torch.int64),
            "last_tile": torch.tensor(last, dtype=torch.int64),
            # per query: the key's prefix found so far, and the named entry's rank among those matching it
            "search": torch.stack([torch.zeros(q, dtype=torch.int64), self.queries.tensors["named"].cpu()]),
            "search_now": torch.zeros(2, q, dtype=torch.int64),
            "histograms": torch.zeros(rounds, q, BINS, dtype=torch.int32),
            "ties": torch.zeros(len(tile_start), dtype=torch.int64),
        }
        object.__setattr__(self, "tables", {name: t.to(self.queries.device) for name, t in values.items()})

    @property
    def tiles(self) -> int:
        """Tiles over all queries."""
        return self.tables["tile_query"].numel()


def select_by_radix(theta: Tensor, plan: RadixPlan, out: Tensor | None = None, due: Tensor | None = None) -> Tensor:
    """Every query's threshold over the flat ``theta``: ``[queries, 2]`` int64 (score, split).

    The same as :func:`lightning_topkast.batched.select_by_sort` finds.

    Written into ``out`` when given, and there only for the queries whose unit (query // 2) is ``due``.
    """
    if triton is None:
        raise RuntimeError("select_by_radix needs Triton: pip install triton (and numpy, to interpret it on CPU)")
    bits = theta.view(_INT[theta.dtype])
    tables = plan.tables
    key_bits, top = _KEY_BITS[theta.dtype], kernels.infinity_score(theta.dtype)
    search = tables["search_now"]
    search.copy_(tables["search"])
    histograms = tables["histograms"].zero_()  # one launch zeroes every round's
    prefix, rank = search[0], search[1]
    queries, tiles = prefix.numel(), plan.tiles
    constants = {"TOP": top, "MAXPOS": (1 << key_bits) - 1, "BLOCK": plan.block, "ITERS": plan.blocks_per_tile}
    where = (tables["tile_query"], tables["tile_start"], tables["tile_end"])
    for r in range(histograms.shape[0]):
        shift = max(key_bits - DIGIT_BITS * (r + 1), 0)
        width = key_bits - DIGIT_BITS * r - shift
        digits = {"SHIFT": shift, "WIDTH": width, "BINS": BINS}
        _launch("_histogram", tiles, bits, *where, prefix, histograms[r], **digits, **constants)
        _launch("_pick_digit", queries, histograms[r], prefix, rank, SHIFT=shift, BINS=BINS)
    ties = tables["ties"]
    _launch("_count_ties", tiles, bits, *where, prefix, ties, **constants)
    if out is None:
        out = torch.empty(queries, 2, dtype=torch.int64, device=theta.device)
    _launch(
        "_pick_tie", queries, bits, ties, tables["first_tile"], tables["last_tile"], tables["tile_start"],
        tables["tile_end"], plan.queries.tensors["split_shift"], prefix, rank, out, out if due is None else due,
        HAS_DUE=due is not None, **constants,
    )  # fmt: skip
    return out


class TritonGroup(FlatGroup):
    """:class:`~lightning_topkast.device.FlatGroup`'s passes as fused Triton kernels: one launch a pass.

    Each pass reads and writes the flat buffers once, in tiles that never span two tensors, so a tile loads its
    tensor's coefficients and its unit's thresholds once. fp32 and fp64 groups run every pass here; fp16 and
    bf16 groups only the selection (the interpreter that CI tests with has no half-precision arithmetic), their
    other passes the torch operations.
    """

    def __init__(self, units: Sequence[Any], block: int = 1024, blocks_per_tile: int = 4) -> None:
        super().__init__(units)
        self.radix = RadixPlan(self.queries, self.dtype, block=block, blocks_per_tile=blocks_per_tile * 4)
        self.fused = self.dtype in (torch.float32, torch.float64)
        self.block, self.blocks_per_tile = block, blocks_per_tile
        tile = block * blocks_per_tile
        starts, ends, tensors, units_of = [], [], [], []
        offset = 0
        unit_of = {id(t): u for u, unit in enumerate(self.units) for t in unit.tensors}
        for i, tensor in enumerate(self.tensors):
            for lo in range(offset, offset + max(tensor.numel, 1), tile):
                starts.append(lo)
                ends.append(min(lo + tile, offset + tensor.numel))
                tensors.append(i)
                units_of.append(unit_of[id(tensor)])
            offset += tensor.numel
        self.tiles = torch.tensor([tensors, units_of, starts, ends], dtype=torch.int64, device=self.device)
        self.unit_starts = self.queries.tensors["segment_starts"]
        key_bits = _KEY_BITS[self.dtype]
        self._constants = {"BLOCK": block, "ITERS": blocks_per_tile, "TOP": self.top, "MAXPOS": (1 << key_bits) - 1}

    @property
    def _grid(self) -> int:
        return self.tiles.shape[1]

    def prepare(self, grads: Sequence[Tensor | None], coefficients: Coefficients | None) -> None:
        """See :meth:`FlatGroup.prepare`."""
        if not self.fused:
            super().prepare(grads, coefficients)
            return
        flat = self._gather(grads, self.theta)
        kept = torch.empty_like(self.theta)
        table, stride = self._table(coefficients)
        _launch(
            "_prepare", self._grid, self.theta, self.code, flat, kept, table, *self.tiles,
            COEF_STRIDE=stride, PENALTY=coefficients is not None, BLOCK=self.block, ITERS=self.blocks_per_tile,
        )  # fmt: skip
        torch._foreach_copy_(self.params, self._pieces(kept))
        self._scatter(grads, flat)

    def merge(self, coefficients: Coefficients | None, alpha: bool) -> None:
        """See :meth:`FlatGroup.merge`."""
        if not self.fused:
            super().merge(coefficients, alpha)
            return
        flat = torch.cat([p.reshape(-1) for p in self.params])
        table, stride = self._table(coefficients)
        _launch(
            "_merge", self._grid, self.theta, self.code, flat, table, *self.tiles, COEF_STRIDE=stride,
            DECOUPLED=coefficients is not None, ALPHA=alpha, BLOCK=self.block, ITERS=self.blocks_per_tile,
        )  # fmt: skip
        if alpha:
            torch._foreach_copy_(self.params, self._pieces(flat))

    def explorers(self) -> Tensor:
        """See :meth:`FlatGroup.explorers`."""
        counts = torch.zeros(len(self.units), dtype=torch.int64, device=self.device)
        _launch(
            "_explorers", self._grid, self.theta.view(_INT[self.dtype]), self.code, self.thresholds, self.unit_starts,
            counts, *self.tiles, **self._constants,
        )  # fmt: skip
        return counts

    def refresh(self, due: Tensor | None, states: Sequence[Sequence[Tensor | None]]) -> tuple[Tensor, Tensor]:
        """See :meth:`FlatGroup.refresh`: the radix select writes the due units' thresholds in place."""
        select_by_radix(self.theta, self.radix, out=self.thresholds, due=due)
        if not self.fused:
            return self.apply(kernels.scores(self.theta), due, states)
        fused = [kind for kind in states if all(s is None or s.dtype == self.dtype for s in kind)][:2]
        gathered = [self._gather(kind, self.theta) for kind in fused]
        alpha = torch.empty_like(self.theta)
        counts = torch.zeros(len(self.tensors), 2, dtype=torch.int64, device=self.device)  # a listener may keep them
        _launch(
            "_apply", self._grid, self.theta, self.theta.view(_INT[self.dtype]), self.code, self.thresholds,
            self.unit_starts, self.thresholds if due is None else due, *[*gathered, self.theta, self.theta][:2],
            alpha, counts, *self.tiles, HAS_DUE=due is not None, STATES=len(fused), **self._constants,
        )  # fmt: skip
        for kind, flat in zip(fused, gathered, strict=True):
            self._scatter(kind, flat)
        torch._foreach_copy_(self.params, self._pieces(alpha))
        rest = [kind for kind in states if not any(kind is f for f in fused)]
        if rest:  # zeroed against the new B only: enough, as a third kind of state is rare and stays zero outside B
            self.keep_states(rest)
        return counts[:, 0], counts[:, 1]

    def _table(self, coefficients: Coefficients | None) -> tuple[Tensor, int]:
        """The coefficient table and the kernels' row stride into it (0: one row for every tensor)."""
        if coefficients is None:
            return self.theta, 0  # unread
        table = self.coefficient_table(coefficients)
        return table, 0 if table.shape[0] == 1 else 2


@functools.lru_cache(maxsize=64)
def plan_for(queries: Queries, dtype: torch.dtype) -> RadixPlan:
    """The plan of ``queries``, built once per layout."""
    return RadixPlan(queries, dtype)
