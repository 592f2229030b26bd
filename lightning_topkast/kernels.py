r"""The per-step passes of Top-KAST over one masked tensor, each a single pass over memory.

Set membership is one byte per weight (:data:`B_BIT`, :data:`A_BIT`, :data:`EVER_BIT`), so a masked fp32 weight
costs 5 bytes: θ and its byte. Every pass exists twice, with identical results:

- :class:`CKernels`: fused loops in ``_kernels.c``, compiled on first use with the system C compiler and called
  through ``ctypes``, for fp32 and fp64 tensors on CPU. On CPU a bool-masked ``torch.where`` is many times slower
  than a multiply and every torch operation is a pass of its own; one fused pass does the work of five to ten.
- :class:`TorchKernels`: the same passes as torch operations, for GPUs (where they are memory-bound either way and
  need no host sync), half-precision tensors, and CPUs without a C compiler.

``LIGHTNING_TOPKAST_KERNELS=torch`` turns the compiled kernels off; ``LIGHTNING_TOPKAST_CACHE`` names the folder
the compiled library is kept in (default ``~/.cache/lightning_topkast``).

Scores rank |θ| exactly as :func:`lightning_topkast.selection.magnitude_order` does, through the bits of the
IEEE representation with the sign cleared (:func:`scores`): larger |θ| first, -0 and +0 tied, NaN last. A
:class:`Threshold` ``(score, split)`` selects every entry with a larger score and, among entries with exactly that
score, those whose index is below ``split``: ties go to the lower index, as in a stable descending sort. So a
prefix of the ranking, the forward set A or the backward set B, is one threshold.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

B_BIT, A_BIT, EVER_BIT = 1, 2, 4
RUNGS = 16  # thresholds one counting pass evaluates

_INFINITY = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000, torch.float64: 0x7FF << 52}
_INT_OF = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


class KernelWarning(UserWarning):
    """The compiled CPU kernels are unavailable; the slower torch operations run instead."""


class Threshold(NamedTuple):
    """Entries with a score above ``score``, and those with exactly ``score`` at a (global) index below ``split``."""

    score: int
    split: int


class FinishCounts(NamedTuple):
    """What :meth:`Kernels.finish` counts against the current thresholds of A and B."""

    forward_kept: int  # members of A at or above A's threshold
    forward_all: int  # entries at or above A's threshold
    backward_kept: int  # members of B at or above B's threshold
    backward_all: int  # entries at or above B's threshold
    explorers_above: int  # members of B \ A at or above A's threshold


class Pick(NamedTuple):
    """What :meth:`Kernels.pick` finds in one window of scores ``[lo, hi)``, looking for the ``k``-th entry."""

    above: int  # entries scoring at least hi
    count: int  # entries in the window
    threshold: Threshold | None  # the one naming the k-th entry, when the window holds it and at most PICK_CAP


PICK_CAP = 1 << 16  # entries a window may hold for a pick


class Refreshed(NamedTuple):
    """What :meth:`Kernels.refresh` did: the new thresholds and spacings, and :meth:`Kernels.apply`'s counts."""

    forward: Threshold
    backward: Threshold
    spacing: tuple[float, float]
    left: int  # members that left A
    size: int  # the size of the new A


PrepareJob = tuple[Tensor, Tensor, Tensor, Tensor, float, float]  # prepare's arguments: theta, code, param, grad, lams
FinishJob = tuple[Tensor, Tensor, Tensor, float, float, Threshold, Threshold, int]  # finish's: theta ... offset


class Kernels(Protocol):
    """The passes over one flat masked tensor. ``offset`` is its first entry's index in a global pool."""

    def prepare(self, theta: Tensor, code: Tensor, param: Tensor, grad: Tensor, lam_a: float, lam_e: float) -> None:
        r"""Before the update: ``param`` = θ on B, 0 elsewhere; ``grad`` on B only, plus the penalty's c·θ.

        c is ``lam_a`` on A and ``lam_e`` on B \ A; both 0 turns the penalty off.
        """

    def finish(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        dec_a: float,
        dec_e: float,
        forward: Threshold,
        backward: Threshold,
        offset: int,
    ) -> FinishCounts:
        r"""After the update: θ = ``param`` on B, θ elsewhere; ``param`` = θ on A, 0 elsewhere; counts.

        On B, θ is ``param`` less dec·param (the decoupled penalty, dec = ``dec_a`` on A, ``dec_e`` on B \ A; both 0
        turns it off). The counts are against the current ``forward`` and ``backward`` thresholds.
        """

    def prepare_many(self, jobs: Sequence[PrepareJob]) -> None:
        """:meth:`prepare` of several tensors, in one call where the backend can."""

    def finish_many(self, jobs: Sequence[FinishJob]) -> list[FinishCounts]:
        """:meth:`finish` of several tensors, in one call where the backend can; the counts of each."""

    def count_at_least(self, theta: Tensor, rungs: Sequence[int]) -> list[int]:
        """For each of up to :data:`RUNGS` scores, the number of entries scoring at least that."""

    def pick(self, thetas: Sequence[Tensor], windows: Sequence[tuple[int, int, int]]) -> list[Pick]:
        """For one or two ``(lo, hi, k)``: the ``k``-th entry of the order if its score is in ``[lo, hi)``, and counts.

        ``thetas`` are a unit's tensors in order (several for a global pool); ``k`` counts from the top of all of
        them, and the threshold's split is a global index.
        """

    def refresh(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        states: Sequence[Tensor],
        ks: tuple[int, int],
        previous: tuple[Threshold, Threshold],
        at_previous: tuple[int, int],
        spacing: tuple[float | None, float | None],
    ) -> Refreshed | None:
        """A single tensor's refresh in one call when the spacing predicts both windows, or None (then search).

        The fast path of :func:`lightning_topkast.selection.search_threshold` followed by :meth:`apply`: a
        threshold whose count is still k stays, the other is picked in one window around its predicted score.
        """

    def apply(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        forward: Threshold,
        backward: Threshold,
        offset: int,
        states: Sequence[Tensor],
    ) -> tuple[int, int, int]:
        """New sets from the thresholds, ``param`` = θ on the new A; ``states`` zeroed outside old B ∩ new B.

        Returns how many members left A, how many entries changed their membership of B, and the new size of A.
        """

    def keep(self, x: Tensor, code: Tensor, bits: int) -> None:
        """``x`` where every bit of ``bits`` is set in ``code``, 0 elsewhere, in place."""


# --- scores ------------------------------------------------------------------------------------------------------


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type whose values rank |θ| for a float ``dtype``."""
    if dtype not in _INT_OF:
        raise TypeError(f"Top-KAST masks floating-point tensors (float16, bfloat16, float32, float64), got {dtype}")
    return _INT_OF[dtype]


def infinity_score(dtype: torch.dtype) -> int:
    """The score of ±inf, the largest a non-NaN value has: its bits, all exponent bits set and none of the rest."""
    score_dtype(dtype)  # the check
    return _INFINITY[dtype]


def mantissa_bits(dtype: torch.dtype) -> int:
    """Bits of the significand: a score step of ``2 ** mantissa_bits`` doubles |θ|."""
    return round(-math.log2(torch.finfo(dtype).eps))  # eps is 2 ** -mantissa


def scores(theta: Tensor) -> Tensor:
    """Flat integer scores of ``theta``: the bits of |θ| (larger |θ| scores higher, ±0 tie), and -1 for NaN.

    Examples:
        >>> s = scores(torch.tensor([0.5, -2.0, float("nan"), -0.0, 0.0]))
        >>> (s[1] > s[0] > s[3]).item(), (s[3] == s[4]).item(), s[2].item()
        (True, True, -1)
    """
    int_type = score_dtype(theta.dtype)
    bits = theta.detach().reshape(-1).view(int_type) & torch.iinfo(int_type).max
    return torch.where(bits > infinity_score(theta.dtype), -1, bits)


def at_least(scores: Tensor, threshold: Threshold | tuple[Tensor, Tensor], offset: int = 0) -> Tensor:
    """Bool mask of the flat ``scores`` at or above ``threshold``; the first score has (global) index ``offset``.

    ``threshold`` may hold two 0-dim tensors instead of ints (:func:`lightning_topkast.selection.threshold_tensors`):
    then nothing is read back to the host.

    Examples:
        >>> at_least(torch.tensor([3, 5, 3, 3, 1]), Threshold(3, 3)).tolist()
        [True, True, True, False, False]
    """
    score, split = threshold
    if isinstance(split, Tensor):
        index = torch.arange(offset, offset + scores.numel(), device=scores.device)
        return (scores > score) | ((scores == score) & (index < split))
    split = min(max(split - offset, 0), scores.numel())
    mask = scores >= score
    mask[split:] = scores[split:] > score
    return mask


def _bit(code: Tensor, bit: int) -> Tensor:
    # 0/1 bytes reinterpreted as bools: no copy
    return ((code >> (bit.bit_length() - 1)) & 1).view(torch.bool)


def _per_set(code: Tensor, on_a: float, on_exploring: float, like: Tensor) -> Tensor:
    r"""``on_a`` on A, ``on_exploring`` on B \ A, 0 outside B, in ``like``'s dtype.

    A table lookup: a Python scalar in ``torch.where`` would make float32 values of fp64 coefficients.
    """
    return _set_table(on_a, on_exploring, like.dtype, like.device)[(code & (A_BIT | B_BIT)).long()]


@lru_cache(maxsize=32)
def _set_table(on_a: float, on_exploring: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # built once per coefficients, not at every step; filled on the device, since ``torch.tensor`` of a list would
    # copy from the host, which waits on a GPU
    table = torch.zeros(4, dtype=dtype, device=device)
    table.select(0, B_BIT).fill_(on_exploring)
    table.select(0, A_BIT | B_BIT).fill_(on_a)
    return table


# --- torch operations ----------------------------------------------------------------------------------------------


class TorchKernels:
    """The passes as torch operations: any device and dtype, no host sync except where a count is returned."""

    def prepare(self, theta: Tensor, code: Tensor, param: Tensor, grad: Tensor, lam_a: float, lam_e: float) -> None:
        """See :meth:`Kernels.prepare`."""
        in_b = _bit(code, B_BIT)
        kept = torch.where(in_b, theta, 0)
        param.copy_(kept)
        masked = torch.where(in_b, grad, 0)
        if lam_a or lam_e:
            masked = masked + _per_set(code, lam_a, lam_e, theta) * kept  # g + (c·θ), as the C loop rounds it
        grad.copy_(masked)

    def merge(self, theta: Tensor, code: Tensor, param: Tensor, dec_a: float, dec_e: float) -> None:
        """The writes of :meth:`finish` without its counts."""
        moved = param
        if dec_a or dec_e:
            moved = param + _per_set(code, dec_a, dec_e, param) * param
        theta.copy_(torch.where(_bit(code, B_BIT), moved, theta))
        param.copy_(torch.where(_bit(code, A_BIT), theta, 0))

    def finish(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        dec_a: float,
        dec_e: float,
        forward: Threshold,
        backward: Threshold,
        offset: int,
    ) -> FinishCounts:
        """See :meth:`Kernels.finish`."""
        self.merge(theta, code, param, dec_a, dec_e)
        return FinishCounts(*(int(n) for n in self.finish_counts(theta, code, forward, backward, offset)))

    def prepare_many(self, jobs: Sequence[PrepareJob]) -> None:
        """See :meth:`Kernels.prepare_many`."""
        for job in jobs:
            self.prepare(*job)

    def finish_many(self, jobs: Sequence[FinishJob]) -> list[FinishCounts]:
        """See :meth:`Kernels.finish_many`."""
        return [self.finish(*job) for job in jobs]

    def finish_counts(
        self, theta: Tensor, code: Tensor, forward: Threshold, backward: Threshold, offset: int
    ) -> Tensor:
        """:class:`FinishCounts` as one device tensor (no host sync)."""
        s = scores(theta)
        in_a, in_b = _bit(code, A_BIT).reshape(-1), _bit(code, B_BIT).reshape(-1)
        ga, gb = at_least(s, forward, offset), at_least(s, backward, offset)
        return torch.stack([(ga & in_a).sum(), ga.sum(), (gb & in_b).sum(), gb.sum(), (ga & in_b & ~in_a).sum()])

    def count_at_least(self, theta: Tensor, rungs: Sequence[int]) -> list[int]:
        """See :meth:`Kernels.count_at_least`."""
        s = scores(theta)
        return [int((s >= rung).sum()) for rung in rungs]

    def pick(self, thetas: Sequence[Tensor], windows: Sequence[tuple[int, int, int]]) -> list[Pick]:
        """See :meth:`Kernels.pick`."""
        s = torch.cat([scores(t) for t in thetas])
        found = []
        for lo, hi, k in windows:
            above, inside = int((s >= hi).sum()), (s >= lo) & (s < hi)
            count, threshold = int(inside.sum()), None
            if above < k <= above + count and count <= PICK_CAP:
                index = torch.nonzero(inside).flatten()
                order = torch.sort(s[index], descending=True, stable=True).indices  # stable: ties by index
                entry = index[order[k - above - 1]]
                threshold = Threshold(int(s[entry]), int(entry) + 1)
            found.append(Pick(above, count, threshold))
        return found

    def refresh(self, *args: object) -> None:
        """See :meth:`Kernels.refresh`: torch operations take the searching path."""
        return

    def apply(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        forward: Threshold,
        backward: Threshold,
        offset: int,
        states: Sequence[Tensor],
    ) -> tuple[int, int, int]:
        """See :meth:`Kernels.apply`."""
        left, changed, size = self.apply_counts(theta, code, param, forward, backward, offset, states)
        return int(left), int(changed), int(size)

    def apply_counts(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        forward: Threshold | tuple[Tensor, Tensor],
        backward: Threshold | tuple[Tensor, Tensor],
        offset: int,
        states: Sequence[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`apply` with its counts left on the device (no host sync)."""
        s = scores(theta)
        in_a = at_least(s, forward, offset).view(theta.shape)
        in_b = at_least(s, backward, offset).view(theta.shape)
        was_a, was_b = _bit(code, A_BIT), _bit(code, B_BIT)
        counts = ((was_a & ~in_a).sum(), (was_b ^ in_b).sum(), in_a.sum())
        stay = was_b & in_b
        for state in states:
            state.copy_(torch.where(stay, state, 0))
        ever = _bit(code, EVER_BIT) | in_a
        code.copy_(in_b.to(torch.uint8) | (in_a.to(torch.uint8) << 1) | (ever.to(torch.uint8) << 2))
        param.copy_(torch.where(in_a, theta, 0))
        return counts

    def keep(self, x: Tensor, code: Tensor, bits: int) -> None:
        """See :meth:`Kernels.keep`."""
        x.copy_(torch.where((code & bits) == bits, x, 0))


# --- compiled C ----------------------------------------------------------------------------------------------------


_c_int64, _c_int32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_SUFFIX = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}


class CKernels:
    """The passes as fused C loops (``_kernels.c``) for contiguous fp32/fp64 CPU tensors."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype) -> None:
        suffix, scalar = _SUFFIX[dtype]
        self.dtype = dtype
        self._prepare = _function(
            library, f"topkast_prepare_{suffix}", [_c_int64, *[_ptr] * 4, scalar, scalar, _c_int32]
        )
        self._finish = _function(
            library,
            f"topkast_finish_{suffix}",
            [_c_int64, *[_ptr] * 3, scalar, scalar, _c_int32, *[_c_int64] * 4, _ptr],
        )
        self._prepare_many = _function(library, f"topkast_prepare_many_{suffix}", [_c_int32, _ptr, _ptr])
        self._finish_many = _function(library, f"topkast_finish_many_{suffix}", [_c_int32, _ptr, _ptr, _ptr])
        self._scalar = scalar
        self._count = _function(library, f"topkast_count_at_least_{suffix}", [_c_int64, _ptr, _ptr, _ptr])
        self._apply = _function(
            library, f"topkast_apply_{suffix}", [_c_int64, *[_ptr] * 3, *[_c_int64] * 4, *[_ptr] * 3, _c_int32, _ptr]
        )
        self._keep = _function(library, f"topkast_keep_{suffix}", [_c_int64, _ptr, _ptr, _c_int32])
        self._pick = _function(
            library, f"topkast_pick_{suffix}", [_c_int32, _ptr, _ptr, _ptr, _ptr, _c_int64, _ptr], ctypes.c_int32
        )
        self._refresh = _function(
            library,
            f"topkast_refresh_{suffix}",
            [_c_int64, *[_ptr] * 7, _c_int64, _c_int64, *[_ptr] * 3, _c_int32, _ptr],
            ctypes.c_int32,
        )
        self._out = (ctypes.c_int64 * RUNGS)()  # counts come back here: a ctypes array reads back cheaper than a tensor
        self._top = infinity_score(dtype)

    def prepare(self, theta: Tensor, code: Tensor, param: Tensor, grad: Tensor, lam_a: float, lam_e: float) -> None:
        """See :meth:`Kernels.prepare`."""
        penalty = int(bool(lam_a or lam_e))
        self._prepare(theta.numel(), _p(theta), _p(code), _p(param), _p(grad), lam_a, lam_e, penalty)

    def finish(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        dec_a: float,
        dec_e: float,
        forward: Threshold,
        backward: Threshold,
        offset: int,
    ) -> FinishCounts:
        """See :meth:`Kernels.finish`."""
        n = theta.numel()
        decoupled = int(bool(dec_a or dec_e))
        fa, fb = _local(forward, offset, n), _local(backward, offset, n)
        self._finish(n, _p(theta), _p(code), _p(param), dec_a, dec_e, decoupled, *fa, *fb, self._out)
        return FinishCounts(*self._out[:5])

    def prepare_many(self, jobs: Sequence[PrepareJob]) -> None:
        """See :meth:`Kernels.prepare_many`: one C call for all of them, its arguments in two arrays."""
        rows = [
            x
            for theta, code, param, grad, lam_a, lam_e in jobs
            for x in (theta.numel(), theta.data_ptr(), code.data_ptr(), param.data_ptr(), grad.data_ptr(),
                      int(bool(lam_a or lam_e)))
        ]  # fmt: skip
        lams = [lam for job in jobs for lam in job[4:]]
        self._prepare_many(len(jobs), (_c_int64 * len(rows))(*rows), (self._scalar * len(lams))(*lams))

    def finish_many(self, jobs: Sequence[FinishJob]) -> list[FinishCounts]:
        """See :meth:`Kernels.finish_many`: one C call for all of them, its arguments in two arrays."""
        rows = []
        for theta, code, param, dec_a, dec_e, forward, backward, offset in jobs:
            n = theta.numel()
            rows += (n, theta.data_ptr(), code.data_ptr(), param.data_ptr(), int(bool(dec_a or dec_e)))
            rows += (*_local(forward, offset, n), *_local(backward, offset, n))
        decs = [dec for job in jobs for dec in job[3:5]]
        out = (_c_int64 * (5 * len(jobs)))()
        self._finish_many(len(jobs), (_c_int64 * len(rows))(*rows), (self._scalar * len(decs))(*decs), out)
        return [FinishCounts(*out[5 * t : 5 * t + 5]) for t in range(len(jobs))]

    def count_at_least(self, theta: Tensor, rungs: Sequence[int]) -> list[int]:
        """See :meth:`Kernels.count_at_least`."""
        if len(rungs) > RUNGS:
            raise ValueError(f"count_at_least takes at most {RUNGS} rungs, got {len(rungs)}")
        padded = (ctypes.c_int64 * RUNGS)(*rungs, *[rungs[-1]] * (RUNGS - len(rungs)))
        self._count(theta.numel(), _p(theta), padded, self._out)
        return self._out[: len(rungs)]

    def pick(self, thetas: Sequence[Tensor], windows: Sequence[tuple[int, int, int]]) -> list[Pick]:
        """See :meth:`Kernels.pick`."""
        if not 1 <= len(windows) <= 2:
            raise ValueError(f"pick takes one or two windows, got {len(windows)}")
        both = [*windows, *windows][:2]
        bounds = (ctypes.c_int64 * 4)(*(x for lo, hi, _ in both for x in (lo, hi)))
        ks = (ctypes.c_int64 * 2)(*(k for _, _, k in both))
        sizes = (ctypes.c_int64 * len(thetas))(*(t.numel() for t in thetas))
        pointers = (ctypes.c_void_p * len(thetas))(*(_p(t) for t in thetas))
        if self._pick(len(thetas), sizes, pointers, bounds, ks, PICK_CAP, self._out) != 0:
            raise MemoryError("Top-KAST's pick kernel could not allocate its buffers")
        out = self._out[:8]
        return [
            Pick(out[4 * w], out[4 * w + 1], Threshold(out[4 * w + 2], out[4 * w + 3]) if out[4 * w + 3] >= 0 else None)
            for w in range(len(windows))
        ]

    def refresh(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        states: Sequence[Tensor],
        ks: tuple[int, int],
        previous: tuple[Threshold, Threshold],
        at_previous: tuple[int, int],
        spacing: tuple[float | None, float | None],
    ) -> Refreshed | None:
        """See :meth:`Kernels.refresh`."""
        fused = [s for s in states if _fits(s, theta)][:3]
        if len(fused) < len(states):
            return None  # states the loop cannot zero: the searching path zeroes them
        thresholds = (ctypes.c_int64 * 4)(*previous[0], *previous[1])
        gaps = (ctypes.c_double * 2)(*(g or 0.0 for g in spacing))
        pointers = [_p(s) for s in fused] + [None] * (3 - len(fused))
        done = self._refresh(
            theta.numel(), _p(theta), _p(code), _p(param), thresholds, (ctypes.c_int64 * 2)(*ks),
            (ctypes.c_int64 * 2)(*at_previous), gaps, self._top, PICK_CAP, *pointers, len(fused), self._out,
        )  # fmt: skip
        if done < 0:
            raise MemoryError("Top-KAST's refresh kernel could not allocate its buffers")
        if not done:
            return None
        left, _, size = self._out[:3]
        forward, backward = Threshold(thresholds[0], thresholds[1]), Threshold(thresholds[2], thresholds[3])
        return Refreshed(forward, backward, (gaps[0], gaps[1]), left, size)

    def apply(
        self,
        theta: Tensor,
        code: Tensor,
        param: Tensor,
        forward: Threshold,
        backward: Threshold,
        offset: int,
        states: Sequence[Tensor],
    ) -> tuple[int, int, int]:
        """See :meth:`Kernels.apply`."""
        n = theta.numel()
        fused = [s for s in states if _fits(s, theta)][:3]
        others = [s for s in states if not any(s is f for f in fused)]
        for state in others:  # another dtype or layout, or a fourth tensor: outside the old B now, the new B after
            self.keep(state, code, B_BIT)
        pointers = [_p(s) for s in fused] + [None] * (3 - len(fused))
        fa, fb = _local(forward, offset, n), _local(backward, offset, n)
        self._apply(n, _p(theta), _p(code), _p(param), *fa, *fb, *pointers, len(fused), self._out)
        for state in others:
            self.keep(state, code, B_BIT)
        left, changed, size = self._out[:3]
        return left, changed, size

    def keep(self, x: Tensor, code: Tensor, bits: int) -> None:
        """See :meth:`Kernels.keep`."""
        if x.dtype != self.dtype or x.device.type != "cpu" or not x.is_contiguous():
            _TORCH.keep(x, code, bits)
        else:
            self._keep(x.numel(), _p(x), _p(code), bits)


def _p(t: Tensor) -> int:
    return t.data_ptr()


def _fits(state: Tensor, theta: Tensor) -> bool:
    return state.dtype == theta.dtype and state.device == theta.device and state.is_contiguous()


def _local(threshold: Threshold, offset: int, n: int) -> tuple[int, int]:
    return threshold.score, min(max(threshold.split - offset, 0), n)


def _function(library: ctypes.CDLL, name: str, argtypes: list, restype: type | None = None) -> ctypes._CFuncPtr:
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, restype
    return function


# --- choosing and building -----------------------------------------------------------------------------------------

_TORCH = TorchKernels()


def for_tensor(t: Tensor, compiled: bool | None = None) -> Kernels:
    """The kernels for ``t``: compiled C for contiguous fp32/fp64 CPU tensors when the library builds, else torch.

    ``compiled``: True requires the C kernels (raises if they cannot be used), False refuses them, None chooses.
    """
    fits = t.device.type == "cpu" and t.dtype in _SUFFIX and t.is_contiguous()
    if compiled is False or (compiled is None and os.environ.get("LIGHTNING_TOPKAST_KERNELS") == "torch"):
        return _TORCH
    library = _library() if fits else None
    if library is None:
        if compiled:
            raise RuntimeError(
                f"compiled Top-KAST kernels need a contiguous float32/float64 CPU tensor and a C compiler; got "
                f"{t.dtype} on {t.device} ({'compiler missing or failed' if fits else 'unsupported tensor'})"
            )
        return _TORCH
    return _c_kernels(library, t.dtype)


@cache
def _c_kernels(library: ctypes.CDLL, dtype: torch.dtype) -> CKernels:
    return CKernels(library, dtype)


@cache
def _library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        warnings.warn(
            f"lightning_topkast could not build its CPU kernels ({error}); the per-step passes run as torch "
            "operations instead, several times slower on CPU. Install a C compiler (cc) to build them, or set "
            "LIGHTNING_TOPKAST_KERNELS=torch to silence this.",
            KernelWarning,
            stacklevel=3,
        )
        return None


def _build() -> Path:
    """Compile ``_kernels.c`` once per source, compiler, torch installation and CPU; later calls find it cached."""
    package = resources.files("lightning_topkast")
    sources = {name: package.joinpath(name).read_bytes() for name in _SOURCES}
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    torch_lib = Path(torch.__file__).parent / "lib"
    openmp = ["-fopenmp", f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]  # torch's own OpenMP runtime: one thread pool
    base = [compiler, "-O3", "-march=native", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC"]
    # torch's folder is in the key: a library linked against one venv's OpenMP must not serve another venv
    key = hashlib.sha256(b"\0".join([*sources.values(), " ".join(base + openmp).encode(), _cpu_id().encode()]))
    folder = Path(os.environ.get("LIGHTNING_TOPKAST_CACHE") or Path.home() / ".cache" / "lightning_topkast")
    target = folder / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        for name, text in sources.items():
            (Path(work) / name).write_bytes(text)
        built = Path(work) / "kernels.so"
        error = ""
        for flags in (openmp, []):  # without OpenMP (Apple clang, say) the loops still vectorise, on one thread
            command = [*base, *flags, str(Path(work) / _SOURCES[0]), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: DDP ranks building at once all end with a whole file
                return target
            error = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RuntimeError(f"{compiler} failed: {error}")


_SOURCES = ("_kernels.c", "_kernels_impl.h")


def _cpu_id() -> str:
    # -march=native code runs only on the CPU it was built for: a home folder shared across machines needs one
    # library per CPU model
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
        model = next((line for line in info.splitlines() if line.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()
