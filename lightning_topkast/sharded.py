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
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_topkast.batched import Queries

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
