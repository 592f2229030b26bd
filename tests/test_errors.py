"""Bad input raises before the first step, with a message naming the argument, the value and what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLP, make_loader, make_trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_topkast import TopKASTCallback
from lightning_topkast.validation import check_strategy

CONSTRUCTOR_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"forward_sparsity": 1.0}, ValueError, r"forward_sparsity=1\.0\): must be in \[0, 1\.0\)"),
    ({"forward_sparsity": -0.1}, ValueError, r"forward_sparsity=-0\.1\): must be in \[0, 1\.0\)"),
    ({"forward_sparsity": "0.8"}, TypeError, r"forward_sparsity='0\.8'\): must be a number"),
    ({"forward_sparsity": True}, TypeError, r"forward_sparsity=True\): must be a number"),
    ({"backward_sparsity": 0.9}, ValueError, r"backward_sparsity=0\.9\): must be in \[0, 0\.8\] \(at most forward"),
    ({"backward_sparsity": -0.5}, ValueError, r"backward_sparsity=-0\.5\): must be in \[0, 0\.8\]"),
    ({"update_interval": 0}, ValueError, r"update_interval=0\): must be an integer >= 1"),
    ({"update_interval": 2.5}, ValueError, r"update_interval=2\.5\): must be an integer >= 1"),
    ({"exploration_penalty": -1e-4}, ValueError, r"exploration_penalty=-0\.0001\): must be a finite number >= 0"),
    ({"exploration_penalty": float("nan")}, ValueError, r"exploration_penalty=nan\): must be a finite number"),
    ({"distribution": "erdos"}, ValueError, r"distribution='erdos'\): unknown; use one of 'uniform', 'erk', 'global'"),
    ({"include": "net.*"}, TypeError, r"include='net\.\*'\): must be a list of parameter-name globs"),
    ({"exclude": [3]}, TypeError, r"exclude=\[3\]\): must be a list"),
    ({"sparsity_overrides": ["fc"]}, TypeError, r"sparsity_overrides=\['fc'\]\): must map names"),
    ({"sparsity_overrides": {"fc": 0.9}}, ValueError, r"sparsity_overrides=\{'fc': 0\.9\}\): give \[forward"),
    ({"sparsity_overrides": {"fc": [0.5, 0.7]}}, ValueError, r"sparsity_overrides\['fc'\]\[1\]=0\.7\): must be in"),
    ({"sparsity_overrides": {"fc": [1.0, 0.5]}}, ValueError, r"sparsity_overrides\['fc'\]\[0\]=1\.0\): must be in"),
    ({"verbose": "yes"}, TypeError, r"verbose='yes'\): must be True or False"),
    ({"dense_first_layer": 1}, TypeError, r"dense_first_layer=1\): must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), CONSTRUCTOR_ERRORS)
def test_constructor_rejects(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        TopKASTCallback(**kwargs)


class Recorder(torch.optim.SGD):
    """Counts steps, to prove that a rejected configuration never reached the first one."""

    steps = 0

    def step(self, closure: Any = None) -> Any:
        Recorder.steps += 1
        return super().step(closure)


class RecordingMLP(MLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return Recorder(self.parameters(), lr=0.1)


class SparseEmbedding(RecordingMLP):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8, sparse=True)


FIT_ERRORS: list[tuple[dict[str, Any], type[nn.Module], str]] = [
    (
        {"include": ["encoder.*"]},
        RecordingMLP,
        r"include=\[\.\.\., 'encoder\.\*', \.\.\.\]\): 'encoder\.\*' matches no",
    ),
    ({"exclude": ["Conv2d"]}, RecordingMLP, r"exclude=\[\.\.\., 'Conv2d', \.\.\.\]\).*Candidates: 'net\.0\.weight'"),
    ({"include": ["Linear"], "exclude": ["net.*"]}, RecordingMLP, r"found no parameter to mask"),
    ({"sparsity_overrides": {"head.weight": [0.5, 0.5]}}, RecordingMLP, r"'head\.weight' names no masked tensor"),
    (
        {"forward_sparsity": 0.999, "backward_sparsity": 0.5},
        RecordingMLP,
        r"net\.2\.weight \(256 weights\) would keep.*<= 0\.9980",
    ),
    ({"include": ["Embedding"], "dense_first_layer": False}, SparseEmbedding, r"nn\.Embedding has sparse=True"),
]


@pytest.mark.parametrize(("kwargs", "model_type", "message"), FIT_ERRORS)
def test_fit_rejects_before_the_first_step(
    tmp_path: Path, kwargs: dict[str, Any], model_type: type[nn.Module], message: str
) -> None:
    Recorder.steps = 0
    trainer = make_trainer(tmp_path, [TopKASTCallback(**kwargs)], max_steps=2)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model_type(), make_loader())
    assert Recorder.steps == 0


@pytest.mark.parametrize("strategy", [FSDPStrategy(), ModelParallelStrategy()])
def test_sharded_strategies_are_rejected(strategy: object) -> None:
    name = type(strategy).__name__
    with pytest.raises(ValueError, match=rf"does not support Trainer\(strategy={name}\).*Use strategy='ddp'"):
        check_strategy(strategy)


def test_metrics_before_fit_say_when_masks_exist() -> None:
    with pytest.raises(RuntimeError, match=r"built at the start of Trainer\.fit"):
        TopKASTCallback().summary()
