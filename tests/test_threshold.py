"""The band select behind every refresh: exact on large tensors, whatever the sample brackets."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_topkast import selection
from lightning_topkast.selection import kth_largest, magnitude_order, magnitude_scores, top_mask

N = 200_003  # above the size where the band select takes over, and not a multiple of the sample stride


@functools.cache
def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(N, generator=g)
    return {
        "normal": normal,
        "ascending": torch.arange(N, dtype=torch.float32),
        "descending": torch.arange(N, 0, -1, dtype=torch.float32),
        # a sample that sees only one of the two regimes brackets the wrong place
        "strided_outliers": torch.where(torch.arange(N) % 49 == 0, 1e6, normal),
        "few_values": torch.randint(0, 5, (N,), generator=g).float(),
        "all_equal": torch.full((N,), 0.25),
        "mostly_zero": torch.where(torch.rand(N, generator=g) < 0.97, 0.0, normal),
        "signed_zeros_and_nan": torch.where(torch.arange(N) % 3 == 0, -0.0, normal).index_fill(0, torch.arange(7), 1e9),
        "bf16": normal.bfloat16(),
    }


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("k", [1, 2, 997, N // 10, N // 2, N - 1000, N - 1])
def test_kth_largest_equals_a_full_select(name: str, k: int) -> None:
    scores = magnitude_scores(_cases()[name])
    expected = torch.kthvalue(scores, scores.numel() - k + 1).values
    assert kth_largest(scores, k).item() == expected.item()


@pytest.mark.parametrize("name", ["normal", "few_values", "mostly_zero", "strided_outliers"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.95])
def test_top_mask_is_the_prefix_of_the_stable_order(name: str, density: float) -> None:
    theta = _cases()[name]
    k = selection.count(density, theta.numel())
    expected = torch.zeros(theta.numel(), dtype=torch.bool)
    expected[magnitude_order(theta)[:k]] = True
    mask = top_mask(magnitude_scores(theta), k)
    assert int(mask.sum()) == k
    assert torch.equal(mask, expected)


def _spy_on_selects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the tensors the real ``torch.kthvalue`` is called on."""
    sizes: list[int] = []
    full_select = torch.kthvalue

    def recording(x: torch.Tensor, k: int) -> torch.return_types.kthvalue:
        sizes.append(x.numel())
        return full_select(x, k)

    monkeypatch.setattr(torch, "kthvalue", recording)
    return sizes


def test_the_exact_select_runs_on_a_small_band(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _spy_on_selects(monkeypatch)
    scores = magnitude_scores(_cases()["normal"])
    for k in (N // 10, N // 2):
        kth_largest(scores, k)
    assert len(sizes) == 2
    assert max(sizes) < N // 10


def test_a_bracket_that_misses_falls_back_to_the_full_select(monkeypatch: pytest.MonkeyPatch) -> None:
    # the strided sample sees only the multiples of the stride, which here are the largest entries
    n = 2**17
    stride = n // selection.SAMPLE_SIZE
    scores = torch.where(torch.arange(n) % stride == 0, 10.0 + torch.arange(n) / n, torch.rand(n))
    expected = torch.kthvalue(scores, n - n // 3 + 1).values
    sizes = _spy_on_selects(monkeypatch)
    assert kth_largest(scores, n // 3).item() == expected.item()
    assert sizes[-1] == n
