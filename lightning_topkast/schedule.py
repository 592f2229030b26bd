r"""When a refresh runs: the rule of ``update_interval`` and ``early_refresh``, and its per-unit counters.

A selection unit (one tensor, or the whole global pool) refreshes at the step where ``update_interval`` optimizer
steps have passed since its last refresh ("interval"), or sooner when the early refresh's test says the members of
B \ A at or above A's threshold number at least ``early_refresh`` of |A|, and at least one ("early"). The counters a
unit keeps for it are ``since_refresh`` and, where no device value may be read back in a step, ``early_flag``: the
test of one step, copied to the host while the device runs on and read at the next step (:class:`HostCopy`). The
engine counts steps the same way on every rank and saves both counters in its state, so every rank refreshes at the
same steps, and a resumed run at the ones the uninterrupted run did.

Examples:
    >>> from types import SimpleNamespace
    >>> schedule = Schedule(update_interval=3, early_refresh=0.05)
    >>> clock = SimpleNamespace(since_refresh=0, early_flag=None)  # a unit's counters
    >>> [schedule.due(clock, early=False) for _ in range(3)]
    [None, None, 'interval']
    >>> schedule.refreshed(clock); schedule.due(clock, early=True), schedule.needed(forward_k=10)
    ('early', 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


class Flag(Protocol):
    """A test's outcome that may still be on its way from the device."""

    def read(self) -> bool:
        """The outcome, on the host."""


class Clock(Protocol):
    """A unit's counters for the schedule: steps since its last refresh, and the early test waiting to be read."""

    since_refresh: int
    early_flag: Flag | None


@dataclass(frozen=True)
class Schedule:
    r"""The rule of when: at least every ``update_interval`` steps, sooner on the early refresh's test.

    Args:
        update_interval: the most optimizer steps between two refreshes of a unit.
        early_refresh: the fraction of |A| that the members of B \ A at or above A's threshold must reach (and at
            least one) for an early refresh; None never refreshes early.
    """

    update_interval: int = 1
    early_refresh: float | None = None

    def due(self, clock: Clock, early: bool) -> str | None:
        """Count one step on ``clock``; why the unit refreshes now ("interval" or "early"), or None."""
        clock.since_refresh += 1
        if clock.since_refresh >= self.update_interval:
            return "interval"
        return "early" if early else None

    def due_on_last_test(self, clock: Clock) -> str | None:
        """:meth:`due`, deciding "early" on the test of the last step (read now, long after its copy began)."""
        return self.due(clock, clock.early_flag is not None and clock.early_flag.read())

    def refreshed(self, clock: Clock) -> None:
        """The unit refreshed: the interval starts again, and a test of the old sets is void."""
        clock.since_refresh, clock.early_flag = 0, None

    def needed(self, forward_k: int) -> float:
        """How many explorers above A's threshold call for an early refresh of a unit whose |A| is ``forward_k``."""
        return max(1.0, self.early_refresh * forward_k)  # type: ignore[operator]

    def early_test(self, forward_k: int, explorers: Any) -> Any:
        """Whether ``explorers`` call for an early refresh: a bool, or for a device count a :class:`HostCopy`."""
        needed = self.needed(forward_k)
        if isinstance(explorers, Tensor):
            return to_host(explorers >= needed)
        return explorers >= needed


# --- reading a device value a step late ---------------------------------------------------------------------------


@dataclass(eq=False)
class HostCopy:
    """A device value on its way to the host: read a step later, when its copy has long finished."""

    value: Tensor
    copied: torch.cuda.Event | None = None

    _values: Any = field(default=None, init=False, repr=False)

    def read(self) -> bool:
        """The value (any entry true, for a vector), waiting for the copy only if the host ran a step ahead."""
        if self._values is None:
            if self.copied is not None and not self.copied.query():
                # waits only where the host runs more than a step ahead of the device: then the copy is not done
                self.copied.synchronize()
            self._values = self.value.tolist()
        return bool(self._values)

    def entries(self, count: int) -> list[HostEntry]:
        """One reader per entry of a vector, sharing this copy (read once)."""
        return [HostEntry(self, i) for i in range(count)]


@dataclass(eq=False)
class HostEntry:
    """One entry of a :class:`HostCopy` of a vector."""

    copy: HostCopy
    entry: int

    def read(self) -> bool:
        """The entry's value."""
        self.copy.read()
        return bool(self.copy._values[self.entry])


def to_host(flag: Tensor) -> HostCopy:
    """Start copying ``flag`` to the host; on a GPU into pinned memory, completing while the device runs on."""
    if flag.device.type == "cpu":
        return HostCopy(flag.clone())
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return HostCopy(host, copied)
