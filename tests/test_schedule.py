"""The rule of when a refresh runs, on plain counters: no tensors, no engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_topkast.schedule import HostCopy, Schedule, to_host


def _clock(since_refresh: int = 0, early_flag: object = None) -> SimpleNamespace:
    return SimpleNamespace(since_refresh=since_refresh, early_flag=early_flag)


def test_the_interval_is_the_longest_gap_counted_in_steps() -> None:
    schedule, clock = Schedule(update_interval=4), _clock()
    reasons = [schedule.due(clock, early=False) for _ in range(6)]
    assert reasons == [None, None, None, "interval", "interval", "interval"]  # only a refresh resets the count
    schedule.refreshed(clock)
    assert clock.since_refresh == 0
    assert [schedule.due(clock, early=False) for _ in range(4)] == [None, None, None, "interval"]


def test_an_early_test_refreshes_before_the_interval_and_the_interval_wins_a_tie() -> None:
    schedule, clock = Schedule(update_interval=3, early_refresh=0.1), _clock()
    assert schedule.due(clock, early=True) == "early"
    assert schedule.due(clock, early=False) is None
    assert schedule.due(clock, early=True) == "interval"


def test_a_refresh_voids_the_test_waiting_to_be_read() -> None:
    schedule, clock = Schedule(update_interval=10, early_refresh=0.1), _clock(7, HostCopy(torch.tensor(True)))
    schedule.refreshed(clock)
    assert (clock.since_refresh, clock.early_flag) == (0, None)
    assert schedule.due_on_last_test(clock) is None


def test_the_device_path_decides_on_the_last_steps_test() -> None:
    schedule = Schedule(update_interval=10, early_refresh=0.1)
    assert schedule.due_on_last_test(_clock(0, HostCopy(torch.tensor(True)))) == "early"
    assert schedule.due_on_last_test(_clock(0, HostCopy(torch.tensor(False)))) is None
    assert schedule.due_on_last_test(_clock(0, None)) is None


@pytest.mark.parametrize(
    ("fraction", "forward_k", "needed"), [(0.01, 40, 1.0), (0.05, 40, 2.0), (0.5, 7, 3.5), (1e-9, 10**6, 1.0)]
)
def test_the_early_test_needs_a_fraction_of_a_and_at_least_one_explorer(
    fraction: float, forward_k: int, needed: float
) -> None:
    schedule = Schedule(update_interval=100, early_refresh=fraction)
    assert schedule.needed(forward_k) == needed
    assert schedule.early_test(forward_k, int(needed)) is (int(needed) >= needed)
    assert schedule.early_test(forward_k, int(needed) + 1) is True


def test_a_device_count_is_tested_on_the_device_and_read_later() -> None:
    schedule = Schedule(update_interval=100, early_refresh=0.05)
    flag = schedule.early_test(40, torch.tensor(2))
    assert isinstance(flag, HostCopy)
    assert flag.read() is True
    entries = to_host(torch.tensor([True, False, True])).entries(3)
    assert [entry.read() for entry in entries] == [True, False, True]
