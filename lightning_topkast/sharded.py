"""The exact top-k of tensors sharded across processes: a radix select whose histograms are summed over the shards.

Each process holds, of every selection unit, one contiguous range of its entries, possibly empty: FSDP2 shards a
tensor's rows, which is a contiguous range of its flat entries. The thresholds must still be those of the whole
unit, in the order of :mod:`lightning_topkast.kernels` (score of |θ|, ties to the lower index, NaN last), so that
every process selects its part of the same sets as one process holding everything would. The search needs no
process to see another's entries, only sums:

1. rounds of 11-bit digits of the key (the score + 1, 0 for NaN) from the top: each process counts the digits of
   its entries that match the prefix found so far, per query, and the histograms are summed over the processes
   (one all-reduce per round of ``queries × 2,048`` counts); every process then picks the same digit and rank;
2. each process counts its entries equal to the key found, per query, and says where its range starts; one
   all-reduce of those tables tells each process how many tied entries lie before its range;
3. the process whose range holds the wanted tie names its index; one all-reduce of the indices (0 elsewhere)
   gives the threshold's split to all.

:func:`select_shards` is a generator that yields each tensor to be summed over the processes and receives the sum,
so the same code runs under ``torch.distributed`` (:func:`select_distributed`) and against simulated shards in one
process (the tests). Nothing is read back to the host, and the number of all-reduces does not depend on the number
of tensors: 3 rounds and 2 more for fp32.

The rest wires it into the engine. :func:`placement_of` reads where a ``DTensor`` parameter's shard lies in the whole
tensor (FSDP2's ``fully_shard``: rows on one mesh dimension, replicated on the others, as in HSDP); the engine keeps θ
and the set bytes of the local shard only, and a unit's ``offset`` is the whole tensor's index of the shard's first
entry, so every per-entry pass compares against the whole unit's thresholds unchanged. :class:`ShardedGroup` is
the device path's :class:`~lightning_topkast.device.FlatGroup` whose selection and counts are summed over the ranks
that share the shards. Where the sharded θ and sets go in a checkpoint: :mod:`lightning_topkast.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_topkast import kernels
from lightning_topkast.batched import Queries
from lightning_topkast.device import FlatGroup

if TYPE_CHECKING:
    from lightning_topkast.masked import Unit

DIGIT_BITS = 11
BINS = 1 << DIGIT_BITS
KEY_BITS = {torch.int16: 15, torch.int32: 31, torch.int64: 63}  # of the scores' dtype: fp16/bf16, fp32, fp64

Search = Generator[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Shard:
    """This process's part of every selection unit, and the queries asked of the whole units.

    Args:
        local: the local flat buffer's segments, one per unit, and the queries (``k`` counts over the whole unit);
            each unit must have the same number of queries, one after the other.
        offsets: per unit, the index in the unit of this process's first entry.
        totals: per unit, its number of entries over all processes.
        process: this process's index among ``processes``.
        processes: how many processes hold parts of the units.
    """

    local: Queries
    offsets: tuple[int, ...]
    totals: tuple[int, ...]
    process: int = 0
    processes: int = 1
    tensors: dict[str, Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        units, queries = len(self.local.sizes), len(self.local.k)
        per_unit = queries // max(units, 1)
        if units * per_unit != queries or list(self.local.segment) != [
            u for u in range(units) for _ in range(per_unit)
        ]:
            raise ValueError("sharded selection takes the same number of queries for every unit, unit by unit")
        device = self.local.device
        totals = [self.totals[s] for s in self.local.segment]
        named = [min(max(k, 1), total) for k, total in zip(self.local.k, totals, strict=True)]
        values = {
            "named": torch.tensor(named, dtype=torch.int64),
            # split = the named entry's index in its unit + this: one past it, or at it for k = 0
            "split_shift": torch.tensor([0 if k <= 0 else 1 for k in self.local.k], dtype=torch.int64),
            "offsets": torch.tensor(self.offsets, dtype=torch.int64),
            "query_rows": torch.arange(queries, dtype=torch.int64).view(units, per_unit) * BINS,
        }
        object.__setattr__(self, "tensors", {name: t.to(device) for name, t in values.items()})

    @property
    def per_unit(self) -> int:
        """Queries per unit."""
        return len(self.local.k) // max(len(self.local.sizes), 1)


def select_shards(scores: Tensor, shard: Shard) -> Search:
    """Every query's threshold over the whole units, from this process's flat ``scores``: ``[queries, 2]`` int64.

    A generator: it yields tensors to be summed over the processes, receives each sum, and returns the thresholds,
    equal on every process and to :func:`lightning_topkast.batched.select_by_sort` over the whole units.
    """
    local, units, per_unit = shard.local, len(shard.local.sizes), shard.per_unit
    key_bits = KEY_BITS[scores.dtype]
    key = scores.to(torch.int64) + 1  # NaN's -1 is 0: last
    queries = len(local.k)
    prefix = torch.zeros(queries, dtype=torch.int64, device=scores.device)
    rank = shard.tensors["named"].clone()
    rows = local.per_entry(shard.tensors["query_rows"])  # [entries, per_unit]: each query's first bin
    for r in range(-(-key_bits // DIGIT_BITS)):
        shift = max(key_bits - DIGIT_BITS * (r + 1), 0)
        width = key_bits - DIGIT_BITS * r - shift
        high = local.per_entry((prefix >> (shift + width)).view(units, per_unit))
        match = (key[:, None] >> (shift + width)) == high
        digit = (key >> shift) & ((1 << width) - 1)
        counts = torch.zeros(queries * BINS, dtype=torch.int64, device=scores.device)
        counts.scatter_add_(0, (rows + digit[:, None]).view(-1), match.view(-1).to(torch.int64))
        counts = (yield counts).view(queries, BINS)  # summed over the processes
        above = counts.sum(1, keepdim=True) - counts.cumsum(1)  # entries in higher bins
        chosen = (above < rank[:, None]) & (above + counts >= rank[:, None])
        prefix = prefix | ((chosen * torch.arange(BINS, device=scores.device)).sum(1) << shift)
        rank = rank - (chosen * above).sum(1)
    tie = key[:, None] == local.per_entry(prefix.view(units, per_unit))  # [entries, per_unit]
    running = torch.cumsum(tie, 0)
    starts = local.tensors["segment_starts"]
    before_unit = torch.cat([running.new_zeros(1, per_unit), running])[starts]  # [units, per_unit]
    ends = torch.cat([running.new_zeros(1, per_unit), running])[starts + local.tensors["sizes"]]
    ties = (ends - before_unit).view(-1)
    table = torch.zeros(shard.processes, queries + units, dtype=torch.int64, device=scores.device)
    table[shard.process, :queries] = ties
    table[shard.process, queries:] = shard.tensors["offsets"]
    table = yield table  # every process's ties and where its range starts
    offsets = table[:, queries:].repeat_interleave(per_unit, dim=1)  # [processes, queries]
    mine = shard.tensors["offsets"].repeat_interleave(per_unit)
    wanted = rank - (table[:, :queries] * (offsets < mine)).sum(0)  # the rank among this process's ties
    in_unit = running - local.per_entry(before_unit)
    hit = tie & (in_unit == local.per_entry(wanted.view(units, per_unit)))
    index = torch.arange(scores.numel(), device=scores.device) - local.per_entry(starts)
    index = index + local.per_entry(shard.tensors["offsets"])
    candidates = torch.where(
        hit, index[:, None] + local.per_entry(shard.tensors["split_shift"].view(units, per_unit)), 0
    )
    split = torch.zeros(queries, dtype=torch.int64, device=scores.device)
    split.scatter_reduce_(0, (rows // BINS).view(-1), candidates.view(-1), "amax")
    split = yield split  # the index from the one process whose range holds the entry, 0 from the others
    return torch.stack([prefix - 1, split], dim=1)


def select_distributed(scores: Tensor, shard: Shard, all_reduce: Callable[[Tensor], None]) -> Tensor:
    """:func:`select_shards` with ``all_reduce`` (in place, summing: ``torch.distributed.all_reduce``, say)."""
    search = select_shards(scores, shard)
    reply = None
    while True:
        try:
            request = search.send(reply)  # type: ignore[arg-type]
        except StopIteration as done:
            return done.value
        all_reduce(request)
        reply = request


def select_simulated(parts: Sequence[tuple[Tensor, Shard]]) -> list[Tensor]:
    """:func:`select_shards` on several simulated processes at once, each ``(scores, shard)``.

    Sums stand in for the all-reduces. Returns each process's thresholds.
    """
    searches = [select_shards(scores, shard) for scores, shard in parts]
    requests = [next(search) for search in searches]
    while True:
        total = torch.stack(requests).sum(0)
        results, requests = [], []
        for search in searches:
            try:
                requests.append(search.send(total.clone()))
            except StopIteration as done:
                results.append(done.value)
        if results:
            return results


# --- sharded parameters -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where this rank's shard of a ``DTensor`` parameter lies in the whole tensor.

    Args:
        shape: the whole tensor's shape.
        offset: the whole tensor's flat index of the shard's first entry (its rows are contiguous in it).
        group: the process group of the mesh dimension that shards the rows; the other dimensions replicate.
        mesh: the parameter's device mesh, and ``placements`` on it: to wrap θ and the sets for checkpoints.
    """

    shape: torch.Size
    offset: int
    group: Any
    mesh: Any
    placements: tuple[Any, ...]

    @property
    def numel(self) -> int:
        """Entries of the whole tensor."""
        return self.shape.numel()

    def wrap(self, local_tensor: Tensor) -> Tensor:
        """``local_tensor`` (the shard's θ or set bytes) as a ``DTensor`` laid out as the parameter: no copy."""
        from torch.distributed.tensor import DTensor

        stride = _stride(self.shape)
        return DTensor.from_local(local_tensor, self.mesh, self.placements, shape=self.shape, stride=stride)

    def shard_of(self, whole: Tensor) -> Tensor:
        """This rank's rows of ``whole``, a tensor of the whole shape (a consolidated checkpoint's)."""
        rows = _local_shape_and_offset(self.shape, self.mesh, self.placements)[0][0]
        first = self.offset // max(_stride(self.shape)[0], 1)
        return whole.reshape(self.shape)[first : first + rows]


def placement_of(name: str, param: Tensor) -> Placement | None:
    """The shard of ``param`` this rank holds, or None for a plain tensor; raises on shards the top-k cannot follow.

    Supported: rows sharded on one mesh dimension (FSDP2's ``Shard(0)``), ``Replicate`` on the others (HSDP).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return None
    placements = tuple(param.placements)
    sharded = [d for d, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(sharded) > 1 or any(type(placements[d]) is not Shard or placements[d].dim != 0 for d in sharded):
        raise ValueError(
            f"{name} is a DTensor placed as {placements}: Top-KAST follows shards of rows on one mesh dimension "
            "(FSDP2's fully_shard, Shard(0), with Replicate elsewhere as in HSDP). Tensor-parallel shards are not "
            "supported: exclude the parameter (exclude=[...]) or train it with data parallelism only."
        )
    mesh = param.device_mesh
    if not sharded:  # replicated everywhere: every rank holds the whole tensor, as under DDP
        return None
    _, offset = _local_shape_and_offset(param.shape, mesh, placements)
    flat = sum(o * s for o, s in zip(offset, _stride(param.shape), strict=True))
    return Placement(param.shape, flat, mesh.get_group(sharded[0]), mesh, placements)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (sharing its storage), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def all_reduce(values: Tensor, group: Any) -> Tensor:
    """Sum ``values`` over ``group`` in place; returns them."""
    torch.distributed.all_reduce(values, group=group)
    return values


def unit_thresholds(scores: Tensor, k: Sequence[int], placement: Placement) -> list[tuple[Tensor, Tensor]]:
    """The thresholds selecting the top ``k`` of one sharded tensor from this rank's ``scores``: 0-dim tensors."""
    queries = Queries((scores.numel(),), (0,) * len(k), tuple(k), scores.device)
    shard = Shard(queries, (placement.offset,), (placement.numel,), *_rank(placement.group))
    found = select_distributed(scores, shard, lambda t: all_reduce(t, placement.group))
    return [(row[0], row[1]) for row in found]


class ShardedGroup(FlatGroup):
    """A flat group of sharded units (one tensor each) that share one process group.

    Every pass is the flat group's over the local shards; what needs the whole tensors is summed over the group:
    the selection's histograms (:func:`select_shards`), the early refresh's counts (so every rank refreshes at the
    same step) and the turnover.
    """

    def __init__(self, units: Sequence[Unit]) -> None:
        super().__init__(units)
        placements = [unit.tensors[0].placement for unit in self.units]
        self.group = placements[0].group
        self.shard = Shard(
            self.queries,
            tuple(p.offset for p in placements),
            tuple(p.numel for p in placements),
            *_rank(self.group),
        )

    def explorers(self) -> Tensor:
        """Summed over the ranks: every rank decides the early refresh on the same counts."""
        return all_reduce(super().explorers(), self.group)

    def refresh(self, due: Tensor | None, states: Sequence[Sequence[Tensor | None]]) -> tuple[Tensor, Tensor]:
        """The whole units' thresholds from every rank's histograms, then the flat group's apply against them.

        (The flat group reads its sets from a sort's order; a rank's order knows nothing of the other shards.)
        Returns the turnover summed over the ranks.
        """
        scores = kernels.scores(self.theta)
        found = select_distributed(scores, self.shard, lambda t: all_reduce(t, self.group))
        if due is None:
            self.thresholds.copy_(found)
        else:
            torch.where(torch.repeat_interleave(due, 2)[:, None], found, self.thresholds, out=self.thresholds)
        left, size = self.apply(scores, due, states)
        return all_reduce(torch.stack([left, size]), self.group).unbind(0)


def _rank(group: Any) -> tuple[int, int]:
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _stride(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _local_shape_and_offset(shape: torch.Size, mesh: Any, placements: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(shape, mesh, placements)
