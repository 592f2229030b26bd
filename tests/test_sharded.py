"""The sharded selection against the selection of the whole units: simulated processes, in one process."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_device import segments

from lightning_topkast import kernels
from lightning_topkast.batched import Queries, select_by_sort
from lightning_topkast.sharded import Shard, select_simulated


def _shards(values: torch.Tensor, sizes: list[int], ks: list[int], cuts: list[list[int]]) -> list[tuple]:
    """Each process's (scores, shard): of every unit, the range between its cut points (possibly empty)."""
    processes = len(cuts[0]) + 1
    starts = [sum(sizes[:u]) for u in range(len(sizes))]
    parts = []
    for p in range(processes):
        pieces, local_sizes, offsets = [], [], []
        for u, size in enumerate(sizes):
            bounds = [0, *sorted(min(c, size) for c in cuts[u]), size]
            lo, hi = bounds[p], bounds[p + 1]
            pieces.append(values[starts[u] + lo : starts[u] + hi])
            local_sizes.append(hi - lo)
            offsets.append(lo)
        local = Queries(tuple(local_sizes), tuple(u for u in range(len(sizes)) for _ in range(2)), tuple(ks))
        scores = kernels.scores(torch.cat(pieces))
        parts.append((scores, Shard(local, tuple(offsets), tuple(sizes), p, processes)))
    return parts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments(max_segments=4, max_size=60), st.integers(1, 4), st.data())
def test_sharded_selection_equals_the_whole(case: tuple, processes: int, data: st.DataObject) -> None:
    """Uneven and empty ranges, ties across their boundaries, NaN and ±inf, every dtype: every process finds the
    thresholds one process holding every unit finds."""
    values, sizes, ks = case
    cuts = [data.draw(st.lists(st.integers(0, size), min_size=processes - 1, max_size=processes - 1)) for size in sizes]
    whole = select_by_sort(
        kernels.scores(values), Queries(tuple(sizes), tuple(u for u in range(len(sizes)) for _ in range(2)), tuple(ks)),
        kernels.infinity_score(values.dtype),
    )  # fmt: skip
    for found in select_simulated(_shards(values, sizes, ks, cuts)):
        assert torch.equal(found, whole)


def test_a_tie_that_spans_every_process() -> None:
    """One value everywhere: the split is decided by the tie pass alone, across the ranges."""
    values = torch.full((10,), 0.5)
    for k in range(11):
        parts = _shards(values, [10], [k, k], [[3, 3, 7]])  # the second process's range is empty
        for found in select_simulated(parts):
            assert found.tolist() == [[kernels.scores(values[:1]).item(), max(k, 0) if k else 0]] * 2


def test_the_queries_must_be_unit_by_unit() -> None:
    local = Queries((3, 4), (0, 1, 0, 1), (1, 1, 2, 2))
    with pytest.raises(ValueError, match="unit by unit"):
        Shard(local, (0, 0), (3, 4))


def _gloo_rank(rank: int, port: int, values: torch.Tensor, sizes: list[int], ks: list[int], out: str) -> None:
    import torch.distributed as dist

    from lightning_topkast.sharded import select_distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        scores, shard = _shards(values, sizes, ks, [[size // 3] for size in sizes])[rank]
        torch.save(select_distributed(scores, shard, dist.all_reduce), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_find_the_whole_units_thresholds(tmp_path) -> None:
    """Real all-reduces between two processes, each holding a third or two thirds of every unit."""
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    sizes = [1000, 1, 37, 5000]
    values = torch.randn(sum(sizes), generator=g)
    values[::7] = values[3]  # ties across the ranges' boundary
    ks = [k for size in sizes for k in (size // 5, size // 2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(port, values, sizes, ks, str(tmp_path / "found")), nprocs=2)
    layout = Queries(tuple(sizes), tuple(u for u in range(len(sizes)) for _ in range(2)), tuple(ks))
    whole = select_by_sort(kernels.scores(values), layout, kernels.infinity_score(values.dtype))
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"found.{rank}"), whole)
