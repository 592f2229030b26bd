"""Sparsity you can see: the mask figures, drawn exactly, sent to W&B (offline) and TensorBoard, and read back."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import MLP, fit, make_engine, wandb_history
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_topkast import TopKASTCallback, figures
from lightning_topkast.reporting import thresholds

KEYS = ["topkast/masks/densities", "topkast/masks/magnitude/net.2.weight", "topkast/masks/magnitude/net.4.weight"]


# --- the figures --------------------------------------------------------------------------------------------------


def test_thresholds_are_the_smallest_magnitudes_in_a_and_b() -> None:
    theta = torch.tensor([[0.5, -0.1], [-0.3, 0.05]])
    a, b = theta.abs() >= 0.5, theta.abs() >= 0.3
    assert thresholds(theta, a, b) == (0.5, float(torch.tensor(0.3)))
    assert thresholds(theta, torch.zeros_like(a), b)[0] == float("inf")  # an empty set has no threshold


def test_histogram_marks_both_thresholds_and_splits_the_weights_by_set() -> None:
    tensor = make_engine().tensors["w"]
    figure = figures.magnitude_histogram("w", tensor, step=3)
    (ax,) = figure.axes
    lines = {line.get_label(): line.get_xdata()[0] for line in ax.lines}
    a, b = thresholds(tensor.theta, tensor.forward_set, tensor.backward_set)
    assert lines == {f"B threshold {b:.3g}": b, f"A threshold {a:.3g}": a}
    # stacked bars: outside B, B \ A, A; their heights add up to the set sizes
    heights = [sum(p.get_height() for p in container.patches) for container in ax.containers]
    assert heights == [128 - 64, 64 - 32, 32]
    assert ax.get_title() == "w, after 3 steps"


def test_density_chart_shows_each_tensor_forward_and_backward_density() -> None:
    figure = figures.density_chart(
        [{"name": "a", "forward": 0.2, "backward": 0.5}, {"name": "b", "forward": 0.1, "backward": 0.3}], step=7
    )
    (ax,) = figure.axes
    backward, forward = ax.containers
    assert [p.get_height() for p in backward.patches] == [0.5, 0.3]
    assert [p.get_height() for p in forward.patches] == [0.2, 0.1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


def test_mask_images_are_rgb_arrays_under_one_key_each() -> None:
    images = figures.mask_images(make_engine().tensors, step=1, prefix="topkast")
    assert sorted(images) == ["topkast/masks/densities", "topkast/masks/magnitude/w"]
    for image in images.values():
        assert image.dtype == np.uint8
        assert image.ndim == 3
        assert image.shape[2] == 3


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(
        ImportError,
        match=r"TopKASTCallback\(log_masks_every_n_steps=10\) draws its figures with matplo"
        r"tlib, which is not installed: pip install \"lightning-topkast\[figures\]\"",
    ):
        TopKASTCallback(log_masks_every_n_steps=10)
    TopKASTCallback()  # off by default: no matplotlib needed


# --- the loggers --------------------------------------------------------------------------------------------------


class Drawn:
    """Records every image the callback sends, to compare with what the loggers wrote."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images: list[tuple[int, dict[str, np.ndarray]]] = []
        original = figures.mask_images

        def spy(tensors: Any, step: int, prefix: str) -> dict[str, np.ndarray]:
            images = original(tensors, step, prefix)
            self.images.append((step, images))
            return images

        monkeypatch.setattr(figures, "mask_images", spy)


def _fit_drawing(tmp_path: Path, logger: Any, every: int = 2) -> TopKASTCallback:
    """:func:`conftest.fit` for 5 steps, drawing the masks every ``every`` steps for ``logger``."""
    topkast = TopKASTCallback(log_masks_every_n_steps=every, verbose=False)
    fit(tmp_path, MLP(), [topkast], max_steps=5, max_epochs=-1, logger=logger, log_every_n_steps=1)
    return topkast


def test_tensorboard_gets_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = Drawn(monkeypatch)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit_drawing(tmp_path, logger)
    assert [step for step, _ in drawn.images] == [2, 4]  # optimizer steps done when drawn
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == KEYS
    for key in KEYS:
        written = events.Images(key)
        assert [event.step for event in written] == [1, 3]  # where Lightning logs the same batch's scalars
        for event, (_, images) in zip(written, drawn.images, strict=True):
            decoded = matplotlib.image.imread(io.BytesIO(event.encoded_image_string), format="png")
            assert np.array_equal((decoded[..., :3] * 255).round().astype(np.uint8), images[key]), key


def test_wandb_offline_run_gets_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = Drawn(monkeypatch)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="topkast-tests")
    run = logger.experiment
    try:
        _fit_drawing(tmp_path, logger)
        files, run_file = Path(run.dir), Path(run.dir).parent / f"run-{run.id}.wandb"
    finally:
        run.finish()
    rows = [row for row in wandb_history(run_file) if any(key.startswith("topkast/masks/") for key in row)]
    assert len(rows) == 2 * len(KEYS)
    for row, (step, key) in zip(rows, [(s, k) for s in (1, 3) for k in KEYS], strict=True):
        assert row["trainer/global_step"] == step
        assert row[f"{key}/_type"] == "images/separated"
        (name,) = row[f"{key}/filenames"]
        image = drawn.images[(step - 1) // 2][1][key]
        assert (row[f"{key}/height"], row[f"{key}/width"]) == image.shape[:2]
        decoded = matplotlib.image.imread(files / name)
        assert np.array_equal((decoded[..., :3] * 255).round().astype(np.uint8), image), key


def test_loggers_without_media_are_skipped_and_nothing_is_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = Drawn(monkeypatch)
    logger = CSVLogger(tmp_path, name="csv")
    topkast = _fit_drawing(tmp_path, logger, every=1)
    assert topkast.engine is not None
    assert topkast.engine.steps == [5]
    assert drawn.images == []


def test_off_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = Drawn(monkeypatch)
    _fit_drawing(tmp_path, TensorBoardLogger(tmp_path, name="tb"), every=0)
    assert drawn.images == []
