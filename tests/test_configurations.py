"""Each way of choosing what is masked and how densely, exercised by a real Trainer.fit with exact counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLP, assert_alpha, make_loader, make_trainer
from torch import nn

from lightning_topkast import TopKASTCallback
from lightning_topkast.distributions import erk
from lightning_topkast.selection import count


class Wider(MLP):
    """Four Linear layers of different shapes, so distributions differ per tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3)
        )


def fit(tmp_path: Path, **kwargs: Any) -> TopKASTCallback:
    callback = TopKASTCallback(update_interval=2, **kwargs)
    make_trainer(tmp_path, [callback], max_steps=6).fit(Wider(), make_loader(n=96))
    assert callback.engine is not None
    assert_alpha(callback.engine)
    return callback


def sizes(callback: TopKASTCallback) -> dict[str, tuple[int, int]]:
    assert callback.engine is not None
    return {n: (int(t.forward_set.sum()), int(t.backward_set.sum())) for n, t in callback.engine.tensors.items()}


def test_global_distribution_keeps_the_exact_total_and_ranks_across_tensors(tmp_path: Path) -> None:
    callback = fit(tmp_path, distribution="global", forward_sparsity=0.9, backward_sparsity=0.7)
    assert callback.engine is not None
    tensors = callback.engine.tensors
    total = sum(t.numel for t in tensors.values())
    assert sum(a for a, _ in sizes(callback).values()) == count(0.1, total)
    assert sum(b for _, b in sizes(callback).values()) == count(0.3, total)
    # one top-k over all: every weight kept beats every weight dropped, across tensors
    kept = torch.cat([t.theta[t.forward_set].abs() for t in tensors.values()])
    dropped = torch.cat([t.theta[~t.forward_set].abs() for t in tensors.values()])
    assert bool(kept.min() >= dropped.max())
    assert (
        len({round(a / t.numel, 6) for (a, _), t in zip(sizes(callback).values(), tensors.values(), strict=True)}) > 1
    )


def test_erk_gives_each_tensor_its_erk_density(tmp_path: Path) -> None:
    callback = fit(tmp_path, distribution="erk", forward_sparsity=0.8, backward_sparsity=0.6)
    assert callback.engine is not None
    shapes = {n: tuple(t.theta.shape) for n, t in callback.engine.tensors.items()}
    forward, backward = erk(shapes, 0.2), erk(shapes, 0.4)
    for name, t in callback.engine.tensors.items():
        assert sizes(callback)[name] == (count(forward[name], t.numel), count(backward[name], t.numel))


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_sparsity_overrides_pin_a_tensor_and_the_rest_follow_the_distribution(
    tmp_path: Path, distribution: str
) -> None:
    callback = fit(
        tmp_path, distribution=distribution, sparsity_overrides={"net.4.weight": [0.5, 0.25]}, forward_sparsity=0.9
    )
    assert callback.engine is not None
    pinned = callback.engine.tensors["net.4.weight"]
    assert (pinned.forward_density, pinned.backward_density) == (0.5, 0.75)
    assert sizes(callback)["net.4.weight"] == (count(0.5, 24 * 16), count(0.75, 24 * 16))
    rest = [t for n, t in callback.engine.tensors.items() if n != "net.4.weight"]
    assert sum(int(t.forward_set.sum()) for t in rest) == pytest.approx(0.1 * sum(t.numel for t in rest), abs=2)


def test_glob_override_pins_every_match(tmp_path: Path) -> None:
    callback = fit(tmp_path, sparsity_overrides={"net.[46].weight": [0.0, 0.0]})
    assert sizes(callback)["net.4.weight"] == (24 * 16, 24 * 16)  # dense
    assert sizes(callback)["net.6.weight"] == (16 * 3, 16 * 3)
    assert sizes(callback)["net.2.weight"] == (count(0.2, 32 * 24), count(0.5, 32 * 24))


def test_dense_first_and_last_layer_and_exclude(tmp_path: Path) -> None:
    callback = fit(tmp_path, dense_first_layer=True, dense_last_layer=True, exclude=["net.4.*"])
    assert callback.engine is not None
    assert list(callback.engine.tensors) == ["net.2.weight"]
    assert callback.kept_dense == {
        "net.0.weight": "first layer in the forward pass (dense_first_layer=True)",
        "net.4.weight": "exclude 'net.4.*'",
        "net.6.weight": "last layer in the forward pass (dense_last_layer=True)",
    }
    table = callback.summary_table().splitlines()
    assert table[2].startswith("0 | net.0.weight | (32, 8)  | 256    | dense       | dense       |     |     |")
    assert [line.rsplit(" | ", 1)[-1] for line in table[2:6]] == [
        "first layer in the forward pass (dense_first_layer=True)",
        "default: floating point, 2+ dims, trainable",
        "exclude 'net.4.*'",
        "last layer in the forward pass (dense_last_layer=True)",
    ]
    assert table[-2] == "Kept dense: 3 tensors, 688 weights; never masked: bias or other 1-D parameter (4)"


def test_include_masks_every_match_whatever_the_first_layer_switch(tmp_path: Path) -> None:
    callback = fit(tmp_path, include=["Linear"])
    assert callback.engine is not None
    assert list(callback.engine.tensors) == ["net.0.weight", "net.2.weight", "net.4.weight", "net.6.weight"]
    assert [row["name"] for row in callback.summary()] == list(callback.engine.tensors)
    assert callback.summary()[0] == {
        "name": "net.0.weight",
        "shape": (32, 8),
        "numel": 256,
        "forward_density": 0.2,
        "backward_density": 0.5,
        "forward_set": count(0.2, 256),
        "backward_set": count(0.5, 256),
        "masked": True,
        "why": "include 'Linear'",
    }
