"""Bad input raises before the first step, with a message naming the argument, the value and what is valid.

Every bad configuration is one row of a table (``pytest.param`` with an id) and runs through the same path as a
user's: build the callback, build a real ``Trainer``, ``fit``. The optimizer counts its steps, so each row also
proves that nothing was trained before the error. ``MIN_BAD_CONFIGURATIONS`` makes the size of the battery a
checked fact rather than a claim.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import MLP, fit, guaranteed_count, make_loader, make_trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn

from lightning_topkast import TopKASTCallback
from lightning_topkast.validation import check_strategy

NAN, INF = float("nan"), float("inf")


class PlainMLP(MLP):
    """The MLP with plain SGD. The ``optimizer_steps`` fixture counts its steps: a rejected configuration takes none."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SparseEmbedding(PlainMLP):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8, sparse=True)


class NormsOnly(PlainMLP):
    """Nothing maskable: two LayerNorms, a 1-D scale and a 1-D bias."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm((8,)), nn.LayerNorm((8,)))
        self.scale = nn.Parameter(torch.ones(8))
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale)[:, :3] + self.bias


class Frozen(PlainMLP):
    """A frozen backbone and no trainable matrix: nothing to mask by default."""

    def __init__(self) -> None:
        super().__init__()
        self.net.requires_grad_(False)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bias


class ShardedStrategy(FSDPStrategy):
    """A user's subclass of a sharding strategy: rejected by type, and accepted by Lightning on CPU."""


# --- the battery: (callback kwargs, model, Trainer kwargs, error, message) --------------------------------------------
# Each message regex covers the argument, the bad value and what is valid.

CASES = [
    # forward_sparsity: wrong types, out of range, NaN, inf
    pytest.param(
        {"forward_sparsity": 1.0}, None, {}, ValueError, r"forward_sparsity=1\.0\): must be in \[0, 1\.0\)", id="fs-1.0"
    ),
    pytest.param(
        {"forward_sparsity": 1.5}, None, {}, ValueError, r"forward_sparsity=1\.5\): must be in \[0, 1\.0\)", id="fs-1.5"
    ),
    pytest.param(
        {"forward_sparsity": -0.1},
        None,
        {},
        ValueError,
        r"forward_sparsity=-0\.1\): must be in \[0, 1\.0\)",
        id="fs-negative",
    ),
    pytest.param(
        {"forward_sparsity": NAN}, None, {}, ValueError, r"forward_sparsity=nan\): must be in \[0, 1\.0\)", id="fs-nan"
    ),
    pytest.param(
        {"forward_sparsity": INF}, None, {}, ValueError, r"forward_sparsity=inf\): must be in \[0, 1\.0\)", id="fs-inf"
    ),
    pytest.param(
        {"forward_sparsity": "0.8"},
        None,
        {},
        TypeError,
        r"forward_sparsity='0\.8'\): must be a number in \[0, 1\.0\)",
        id="fs-str",
    ),
    pytest.param(
        {"forward_sparsity": None},
        None,
        {},
        TypeError,
        r"forward_sparsity=None\): must be a number in \[0, 1\.0\)",
        id="fs-none",
    ),
    pytest.param(
        {"forward_sparsity": True},
        None,
        {},
        TypeError,
        r"forward_sparsity=True\): must be a number in \[0, 1\.0\)",
        id="fs-bool",
    ),
    pytest.param(
        {"forward_sparsity": [0.8]},
        None,
        {},
        TypeError,
        r"forward_sparsity=\[0\.8\]\): must be a number in \[0, 1\.0\)",
        id="fs-list",
    ),
    pytest.param(
        {"forward_sparsity": torch.tensor(0.8)},
        None,
        {},
        TypeError,
        r"forward_sparsity=tensor\(0\.8000\)\): must be a number",
        id="fs-tensor",
    ),
    # backward_sparsity: above forward, out of range, wrong types
    pytest.param(
        {"backward_sparsity": 0.9},
        None,
        {},
        ValueError,
        r"backward_sparsity=0\.9\): must be in \[0, 0\.8\] \(at most forward",
        id="bs-above-fs",
    ),
    pytest.param(
        {"forward_sparsity": 0.5, "backward_sparsity": 0.6},
        None,
        {},
        ValueError,
        r"backward_sparsity=0\.6\): must be in \[0, 0\.5\] \(at most forward_sparsity",
        id="bs-above-custom-fs",
    ),
    pytest.param(
        {"backward_sparsity": 1.0},
        None,
        {},
        ValueError,
        r"backward_sparsity=1\.0\): must be in \[0, 0\.8\]",
        id="bs-1.0",
    ),
    pytest.param(
        {"backward_sparsity": -0.5},
        None,
        {},
        ValueError,
        r"backward_sparsity=-0\.5\): must be in \[0, 0\.8\]",
        id="bs-negative",
    ),
    pytest.param(
        {"backward_sparsity": NAN},
        None,
        {},
        ValueError,
        r"backward_sparsity=nan\): must be in \[0, 0\.8\]",
        id="bs-nan",
    ),
    pytest.param(
        {"backward_sparsity": -INF},
        None,
        {},
        ValueError,
        r"backward_sparsity=-inf\): must be in \[0, 0\.8\]",
        id="bs-minus-inf",
    ),
    pytest.param(
        {"backward_sparsity": None},
        None,
        {},
        TypeError,
        r"backward_sparsity=None\): must be a number in \[0, 0\.8\]",
        id="bs-none",
    ),
    # update_interval: zero, negative, float, wrong types (a ValueError, as for every update_interval value)
    pytest.param(
        {"update_interval": 0}, None, {}, ValueError, r"update_interval=0\): must be an integer >= 1", id="ui-0"
    ),
    pytest.param(
        {"update_interval": -5},
        None,
        {},
        ValueError,
        r"update_interval=-5\): must be an integer >= 1",
        id="ui-negative",
    ),
    pytest.param(
        {"update_interval": 2.5},
        None,
        {},
        ValueError,
        r"update_interval=2\.5\): must be an integer >= 1",
        id="ui-float",
    ),
    pytest.param(
        {"update_interval": 100.0},
        None,
        {},
        ValueError,
        r"update_interval=100\.0\): must be an integer >= 1",
        id="ui-integral-float",
    ),
    pytest.param(
        {"update_interval": "100"},
        None,
        {},
        ValueError,
        r"update_interval='100'\): must be an integer >= 1",
        id="ui-str",
    ),
    pytest.param(
        {"update_interval": None},
        None,
        {},
        ValueError,
        r"update_interval=None\): must be an integer >= 1",
        id="ui-none",
    ),
    pytest.param(
        {"update_interval": True},
        None,
        {},
        ValueError,
        r"update_interval=True\): must be an integer >= 1",
        id="ui-bool",
    ),
    # exploration_penalty
    pytest.param(
        {"exploration_penalty": -1e-4},
        None,
        {},
        ValueError,
        r"exploration_penalty=-0\.0001\): must be a finite number >= 0",
        id="ep-negative",
    ),
    pytest.param(
        {"exploration_penalty": NAN},
        None,
        {},
        ValueError,
        r"exploration_penalty=nan\): must be a finite number >= 0",
        id="ep-nan",
    ),
    pytest.param(
        {"exploration_penalty": INF},
        None,
        {},
        ValueError,
        r"exploration_penalty=inf\): must be a finite number >= 0",
        id="ep-inf",
    ),
    pytest.param(
        {"exploration_penalty": "1e-4"},
        None,
        {},
        ValueError,
        r"exploration_penalty='1e-4'\): must be a finite number >= 0",
        id="ep-str",
    ),
    # log_masks_every_n_steps
    pytest.param(
        {"log_masks_every_n_steps": -1},
        None,
        {},
        ValueError,
        r"log_masks_every_n_steps=-1\): must be an integer >= 0 \(optimizer steps; 0 turns it off\)",
        id="masks-negative",
    ),
    pytest.param(
        {"log_masks_every_n_steps": 2.5},
        None,
        {},
        ValueError,
        r"log_masks_every_n_steps=2\.5\): must be an integer >= 0",
        id="masks-float",
    ),
    # distribution
    pytest.param(
        {"distribution": "erdos"},
        None,
        {},
        ValueError,
        r"distribution='erdos'\): unknown; use one of 'uniform', 'erk', 'global'",
        id="dist-unknown",
    ),
    pytest.param(
        {"distribution": "ERK"},
        None,
        {},
        ValueError,
        r"distribution='ERK'\): unknown; use one of 'uniform', 'erk', 'global'",
        id="dist-case",
    ),
    pytest.param(
        {"distribution": None},
        None,
        {},
        ValueError,
        r"distribution=None\): unknown; use one of 'uniform', 'erk'",
        id="dist-none",
    ),
    # flags: nothing truthy
    pytest.param({"verbose": "yes"}, None, {}, TypeError, r"verbose='yes'\): must be True or False", id="verbose-str"),
    pytest.param(
        {"dense_first_layer": 1}, None, {}, TypeError, r"dense_first_layer=1\): must be True or False", id="dfl-int"
    ),
    pytest.param(
        {"decoupled_penalty": "false"},
        None,
        {},
        TypeError,
        r"decoupled_penalty='false'\): must be True or False",
        id="dp-str",
    ),
    pytest.param(
        {"strict_resume": None}, None, {}, TypeError, r"strict_resume=None\): must be True or False", id="sr-none"
    ),
    # include / exclude: wrong types, and patterns that match nothing
    pytest.param(
        {"include": "net.*"},
        None,
        {},
        TypeError,
        r"include='net\.\*'\): must be a list of parameter-name globs or module class names",
        id="include-str",
    ),
    pytest.param(
        {"exclude": [3]},
        None,
        {},
        TypeError,
        r"exclude=\[3\]\): must be a list of parameter-name globs",
        id="exclude-int",
    ),
    pytest.param(
        {"include": ["Linear", None]},
        None,
        {},
        TypeError,
        r"include=\['Linear', None\]\): must be a list of parameter-name globs",
        id="include-none-item",
    ),
    pytest.param(
        {"include": ["encoder.*"]},
        None,
        {},
        ValueError,
        r"include=\[\.\.\., 'encoder\.\*', \.\.\.\]\): 'encoder\.\*' matches no parameter.*Candidates: 'net\.0\.weig"
        r"ht'",
        id="include-no-match",
    ),
    pytest.param(
        {"include": ["*.bias"]},
        None,
        {},
        ValueError,
        r"include=\[\.\.\., '\*\.bias', \.\.\.\]\): '\*\.bias' matches no parameter of two or more dimensions.*Candi"
        r"dates: 'net\.0\.weight'",
        id="include-biases",
    ),
    pytest.param(
        {"exclude": ["Conv2d"]},
        None,
        {},
        ValueError,
        r"exclude=\[\.\.\., 'Conv2d', \.\.\.\]\): 'Conv2d' matches no.*module types: 'Linear'",
        id="exclude-no-type",
    ),
    pytest.param(
        {"exclude": ["net.9.*"]},
        None,
        {},
        ValueError,
        r"exclude=\[\.\.\., 'net\.9\.\*', \.\.\.\]\): 'net\.9\.\*' matches no.*Candidates: 'net\.0\.weight', 'net\.2"
        r"\.weight'",
        id="exclude-no-glob",
    ),
    # nothing left to mask: the message names the argument that did it
    pytest.param(
        {"include": []},
        None,
        {},
        ValueError,
        r"TopKASTCallback\(include=\[\]\): selects no parameter to mask\..*e\.g\. include=\['Linear'\].*Candidates: 'ne"
        r"t\.0\.weight'",
        id="include-empty",
    ),
    pytest.param(
        {"include": ["Linear"], "exclude": ["net.*"]},
        None,
        {},
        ValueError,
        r"TopKASTCallback\(include=\['Linear'\], exclude=\['net\.\*'\]\): exclude removes every tensor that include s"
        r"elects, leaving nothing to mask.*Candidates",
        id="exclude-all-globs",
    ),
    pytest.param(
        {"exclude": ["Linear"]},
        None,
        {},
        ValueError,
        r"TopKASTCallback\(exclude=\['Linear'\]\): exclude removes every candidate, leaving nothing to mask\. Remove a "
        r"pattern from exclude\. Candidates: 'net\.0\.weight'.*module types: 'Linear'",
        id="exclude-all-types",
    ),
    pytest.param(
        {},
        NormsOnly,
        {},
        ValueError,
        r"TopKASTCallback found no parameter to mask: Top-KAST masks floating-point parameters of two or more dimensi"
        r"ons outside normalisation layers.*The model has no such parameter",
        id="norms-only-model",
    ),
    pytest.param(
        {},
        Frozen,
        {},
        ValueError,
        r"every candidate is frozen \(requires_grad=False\)\. Name the ones to mask anyway with include=\[\.\.\.\]",
        id="frozen-model",
    ),
    # sparsity_overrides: wrong shapes and values, names that match nothing
    pytest.param(
        {"sparsity_overrides": ["fc"]},
        None,
        {},
        TypeError,
        r"sparsity_overrides=\['fc'\]\): must map names to \[forward_sparsity, backward_sparsity\]",
        id="ov-list",
    ),
    pytest.param(
        {"sparsity_overrides": "net.2.weight"},
        None,
        {},
        TypeError,
        r"sparsity_overrides='net\.2\.weight'\): must map names to \[forward_sparsity",
        id="ov-str",
    ),
    pytest.param(
        {"sparsity_overrides": {"fc": 0.9}},
        None,
        {},
        ValueError,
        r"sparsity_overrides=\{'fc': 0\.9\}\): give \[forward_sparsity, backward_sparsity\]",
        id="ov-scalar-pair",
    ),
    pytest.param(
        {"sparsity_overrides": {"fc": [0.5, 0.5, 0.5]}},
        None,
        {},
        ValueError,
        r"sparsity_overrides=\{'fc': \[0\.5, 0\.5, 0\.5\]\}\): give \[forward_sparsity, backward_sparsity\]",
        id="ov-triple",
    ),
    pytest.param(
        {"sparsity_overrides": {"fc": "0.9,0.8"}},
        None,
        {},
        ValueError,
        r"sparsity_overrides=\{'fc': '0\.9,0\.8'\}\): give \[forward_sparsity, backward_sparsity\]",
        id="ov-str-pair",
    ),
    # a mapping of length 2 is not a pair
    pytest.param(
        {"sparsity_overrides": {"fc": {"a": 0.9, "b": 0.8}}},
        None,
        {},
        ValueError,
        r"sparsity_overrides=\{'fc': \{'a': 0\.9, 'b': 0\.8\}\}\): give \[forward_sparsity, backward_sparsity\]",
        id="ov-dict-pair",
    ),
    pytest.param(
        {"sparsity_overrides": {"fc": [0.5, 0.7]}},
        None,
        {},
        ValueError,
        r"sparsity_overrides\['fc'\]\[1\]=0\.7\): must be in \[0, 0\.5\]",
        id="ov-bs-above-fs",
    ),
    pytest.param(
        {"sparsity_overrides": {"fc": [1.0, 0.5]}},
        None,
        {},
        ValueError,
        r"sparsity_overrides\['fc'\]\[0\]=1\.0\): must be in \[0, 1\.0\)",
        id="ov-fs-1.0",
    ),
    pytest.param(
        {"sparsity_overrides": {"fc": [NAN, 0.5]}},
        None,
        {},
        ValueError,
        r"sparsity_overrides\['fc'\]\[0\]=nan\): must be in \[0, 1\.0\)",
        id="ov-fs-nan",
    ),
    pytest.param(
        {"sparsity_overrides": {"fc": [0.5, None]}},
        None,
        {},
        TypeError,
        r"sparsity_overrides\['fc'\]\[1\]=None\): must be a number in \[0, 0\.5\]",
        id="ov-bs-none",
    ),
    # keys are names or globs: a number is a mistake to report, not a crash inside fnmatch
    pytest.param(
        {"sparsity_overrides": {3: [0.5, 0.5]}},
        None,
        {},
        TypeError,
        r"sparsity_overrides=\{3: \[0\.5, 0\.5\]\}\):.*(name|glob).*str",
        id="ov-int-key",
    ),
    pytest.param(
        {"sparsity_overrides": {"head.weight": [0.5, 0.5]}},
        None,
        {},
        ValueError,
        r"sparsity_overrides=\{'head\.weight': \[0\.5, 0\.5\]\}\): 'head\.weight' names no masked tensor\. Masked te"
        r"nsors: net\.2\.weight, net\.4\.weight",
        id="ov-unknown-name",
    ),
    pytest.param(
        {"sparsity_overrides": {"net.0.weight": [0.5, 0.5]}},
        None,
        {},
        ValueError,
        r"sparsity_overrides=\{'net\.0\.weight': \[0\.5, 0\.5\]\}\): 'net\.0\.weight' names no masked tensor\. Maske"
        r"d tensors: net\.2\.weight",
        id="ov-dense-name",
    ),
    pytest.param(
        {"sparsity_overrides": {"net.*.bias": [0.5, 0.5]}},
        None,
        {},
        ValueError,
        r"sparsity_overrides=\{'net\.\*\.bias': \[0\.5, 0\.5\]\}\): 'net\.\*\.bias' names no masked tensor\. Masked "
        r"tensors: net\.2\.weight",
        id="ov-glob-no-match",
    ),
    # a pinned tensor that would be cut off: the error must name the override, not forward_sparsity
    pytest.param(
        {"sparsity_overrides": {"net.4.weight": [0.99, 0.5]}},
        None,
        {},
        ValueError,
        r"TopKASTCallback\(sparsity_overrides=\{'net\.4\.weight': \[0\.99, 0\.5\]\}\).*48 weights.*<= 0\.9895",
        id="ov-cuts-layer-off",
    ),
    # budgets that cut a layer off: uniform, ERK, global
    pytest.param(
        {"forward_sparsity": 0.999, "backward_sparsity": 0.5},
        None,
        {},
        ValueError,
        r"forward_sparsity=0\.999\): net\.2\.weight \(256 weights\) would keep.*<= 0\.9895",
        id="uniform-cuts-layer-off",
    ),
    pytest.param(
        {"distribution": "erk", "forward_sparsity": 0.999, "backward_sparsity": 0.5},
        None,
        {},
        ValueError,
        r"forward_sparsity=0\.999\):.*net\.2\.weight \(256 weights\) would keep.*<= 0\.99[0-6]\d",
        id="erk-infeasible",
    ),
    pytest.param(
        {"distribution": "global", "forward_sparsity": 0.999, "backward_sparsity": 0.5},
        None,
        {},
        ValueError,
        r"forward_sparsity=0\.999, distribution='global'\): the 304 weights.*<= 0\.9983",
        id="global-keeps-nothing",
    ),
    # model and Trainer
    pytest.param(
        {"include": ["Embedding"], "dense_first_layer": False},
        SparseEmbedding,
        {},
        ValueError,
        r"nn\.Embedding has sparse=True; build it with sparse=False or exclude it with exclude=\['Embedding'\]",
        id="sparse-embedding",
    ),
    pytest.param(
        {},
        None,
        {"strategy": ShardedStrategy()},
        ValueError,
        r"does not support Trainer\(strategy=ShardedStrategy\): its shards are not the whole tensors.*"
        r"ModelParallelStrategy\(data_parallel_size=N, tensor_parallel_size=1\)\) with fully_shard in configure_model",
        id="strategy-fsdp-subclass",
    ),
]


@pytest.fixture
def _no_process_group_left() -> Iterator[None]:
    """The sharding strategies start a one-process gloo group and set MASTER_* variables; undo both."""
    environ = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def _fit_with(tmp_path: Path, kwargs: dict[str, Any], model: type[MLP] | None = None, **trainer_kwargs: Any) -> None:
    """The user's path: ``TopKASTCallback(**kwargs)``, then :func:`conftest.fit` for two steps."""
    callback = TopKASTCallback(**{"verbose": False, **kwargs})
    fit(tmp_path, (model or PlainMLP)(), [callback], max_steps=2, **trainer_kwargs)


@pytest.mark.usefixtures("_no_process_group_left")
@pytest.mark.parametrize(("kwargs", "model_type", "trainer_kwargs", "error", "message"), CASES)
def test_bad_configuration_raises_before_the_first_step(
    tmp_path: Path,
    kwargs: dict[str, Any],
    model_type: type[MLP] | None,
    trainer_kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
    optimizer_steps: list[object],
) -> None:
    with pytest.raises(error, match=message):
        _fit_with(tmp_path, kwargs, model_type, **trainer_kwargs)
    assert len(optimizer_steps) == 0


def test_the_step_counter_counts_a_valid_fit(tmp_path: Path, optimizer_steps: list[object]) -> None:
    """The control for ``len(optimizer_steps) == 0`` above: the same path with a valid configuration takes two steps."""
    _fit_with(tmp_path, {}, None)
    assert len(optimizer_steps) == 2


def _suggested_bound(tmp_path: Path, kwargs: dict[str, Any]) -> tuple[float, float]:
    with pytest.raises(ValueError, match=r"forward_sparsity <= ") as error:
        _fit_with(tmp_path / "bad", kwargs, None)
    found = re.search(r"forward_sparsity <= (\d\.(\d+))", str(error.value))
    assert found is not None, str(error.value)
    return float(found[1]), 10.0 ** -len(found[2])


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"forward_sparsity": 0.995}, id="uniform"),  # net.4.weight (48 weights) keeps 0
        pytest.param({"forward_sparsity": 0.999, "distribution": "erk"}, id="erk"),
        pytest.param({"forward_sparsity": 0.999, "distribution": "global"}, id="global"),
    ],
)
def test_suggested_forward_sparsity_is_the_largest_feasible_value(
    tmp_path: Path, kwargs: dict[str, Any], optimizer_steps: list[object]
) -> None:
    """Following the error's advice must work, and the next value at the printed precision must not."""
    bound, step = _suggested_bound(tmp_path, {**kwargs, "backward_sparsity": 0.5})
    _fit_with(tmp_path / "at", {**kwargs, "forward_sparsity": bound, "backward_sparsity": 0.5}, None)
    assert len(optimizer_steps) == 2
    above = round(bound + step, 12)
    with pytest.raises(ValueError, match=r"would keep|keeps"):
        _fit_with(tmp_path / "above", {**kwargs, "forward_sparsity": above, "backward_sparsity": 0.5}, None)


# --- resuming from a checkpoint of another model (strict_resume=True) ---------------------------------------------


class Wider(PlainMLP):
    """Same parameter names, other shapes."""

    def __init__(self) -> None:
        super().__init__(hidden=12)


class WithHead(PlainMLP):
    """One more layer; loads the MLP's weights non-strictly, so only the callback can notice."""

    strict_loading = False

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class Renamed(PlainMLP):
    """The same layers under another name, loaded non-strictly."""

    strict_loading = False

    def __init__(self) -> None:
        super().__init__()
        self.body = self.net
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


RESUME_CASES = [
    pytest.param(
        Wider,
        RuntimeError,
        r"size mismatch for net\.2\.weight: copying a param with shape torch\.Size\(\[16, 16\]\) from checkpoint, th"
        r"e shape in current model is torch\.Size\(\[12, 12\]\)",
        id="other-shapes",
    ),
    pytest.param(
        WithHead,
        ValueError,
        r"cannot resume Top-KAST from this checkpoint: head\.weight: masked now, not in the checkpoint\. Pass TopKAS"
        r"TCallback\(strict_resume=False\)",
        id="extra-layer",
    ),
    pytest.param(
        Renamed,
        ValueError,
        r"cannot resume Top-KAST from this checkpoint: body\.2\.weight: masked now.*net\.2\.weight: in the checkpoin"
        r"t, not masked now.*strict_resume=False",
        id="renamed-layers",
    ),
]


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the MLP trained two steps with the callback."""
    root = tmp_path_factory.mktemp("mlp")
    trainer = make_trainer(root, [TopKASTCallback(verbose=False)], max_steps=2)
    trainer.fit(PlainMLP(), make_loader())
    trainer.save_checkpoint(root / "mlp.ckpt")
    return root / "mlp.ckpt"


@pytest.mark.parametrize(("model_type", "error", "message"), RESUME_CASES)
def test_checkpoint_of_another_model_raises_before_the_first_step(
    tmp_path: Path,
    mlp_checkpoint: Path,
    model_type: type[MLP],
    error: type[Exception],
    message: str,
    optimizer_steps: list[object],
) -> None:
    trainer = make_trainer(tmp_path, [TopKASTCallback(strict_resume=True, verbose=False)], max_steps=4)
    with pytest.raises(error, match=message):
        trainer.fit(model_type(), make_loader(), ckpt_path=mlp_checkpoint)
    assert len(optimizer_steps) == 0


# --- LightningCLI: a YAML with a misspelled or mistyped callback argument -------------------------------------------


class CLIModel(PlainMLP):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return make_loader()


CLI_CASES = [
    # jsonargparse names the misspelled key and the class, in words that changed in 4.41 ("Option ... is not accepted"
    # with a pointer to --help before, "Key ... is not expected" since): either wording names both
    pytest.param(
        "forward_sparsty: 0.9",
        r"(?=[\s\S]*class_path'?:? 'lightning_topkast\.TopKASTCallback')"
        r"(?=[\s\S]*(Option 'forward_sparsty' is not accepted|Key 'forward_sparsty' is not expected))",
        id="misspelled",
    ),
    pytest.param(
        "update_interval: ten",
        r"TopKASTCallback'[\s\S]*Parser key \"update_interval\":\s+Expected a <class 'int'>\. Got value: ten",
        id="interval-not-int",
    ),
    pytest.param(
        "distribution: erdos",
        r"TopKASTCallback'[\s\S]*Parser key \"distribution\":\s+Expected a typing\.Literal\['uniform', 'erk', 'globa"
        r"l'\]\. Got value: erdos",
        id="distribution-literal",
    ),
    pytest.param(
        "include: net.*",
        r"TopKASTCallback'[\s\S]*Parser key \"include\":[\s\S]*Expected a <class 'list'>[\s\S]*Given value: net\.\*",
        id="include-not-list",
    ),
    pytest.param(
        "forward_sparsity: 1.5",
        r"TopKASTCallback\(forward_sparsity=1\.5\): must be in \[0, 1\.0\)",
        id="fs-out-of-range",
    ),
]


def _cli(tmp_path: Path, init_arg: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  max_steps: 2\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  callbacks:\n    - class_path: lightning_topkast.TopKASTCallback\n"
        f"      init_args:\n        verbose: false\n        {init_arg}\n"
    )
    args = ["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    LightningCLI(CLIModel, args=args, save_config_callback=None)


@pytest.mark.parametrize(("init_arg", "message"), CLI_CASES)
def test_yaml_with_a_bad_callback_argument_fails_before_the_first_step(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    init_arg: str,
    message: str,
    optimizer_steps: list[object],
) -> None:
    with pytest.raises((SystemExit, ValueError)) as error:
        _cli(tmp_path, init_arg)
    assert re.search(message, str(error.value) + capsys.readouterr().err)
    assert len(optimizer_steps) == 0


def test_the_cli_control_yaml_trains(tmp_path: Path, optimizer_steps: list[object]) -> None:
    """The control for the CLI rows: the same YAML with a valid argument takes two steps."""
    _cli(tmp_path, "update_interval: 5")
    assert len(optimizer_steps) == 2


# --- direct checks ----------------------------------------------------------------------------------------------


REFUSED = (FSDPStrategy, DeepSpeedStrategy)


REFUSED_CASES = [FSDPStrategy(), ShardedStrategy()]


@pytest.mark.parametrize("strategy", REFUSED_CASES)
def test_strategies_whose_shards_are_not_whole_tensors_are_refused(strategy: object) -> None:
    name = type(strategy).__name__
    with pytest.raises(ValueError, match=rf"does not support Trainer\(strategy={name}\).*fully_shard.*strategy='ddp'"):
        check_strategy(strategy, REFUSED, ModelParallelStrategy)


def test_model_parallelism_is_judged_once_its_mesh_exists() -> None:
    """Before setup the strategy has no mesh to say its tensor-parallel size: the check waits for fit's setup (the
    two-rank refusal is in test_fsdp.py)."""
    check_strategy(ModelParallelStrategy(), REFUSED, ModelParallelStrategy)


class FSDPStrategyLookalike(SingleDeviceStrategy):
    """A user's strategy that shards nothing: only its class name says "FSDPStrategy"."""


FSDPStrategyLookalike.__name__ = FSDPStrategyLookalike.__qualname__ = "FSDPStrategy"


def test_a_strategy_is_judged_by_its_type_not_its_name(tmp_path: Path, optimizer_steps: list[object]) -> None:
    """Matching by class name rejected this strategy (and would miss a renamed sharded one)."""
    _fit_with(tmp_path, {}, None, strategy=FSDPStrategyLookalike(device=torch.device("cpu")))
    assert len(optimizer_steps) == 2


def test_metrics_before_fit_say_when_masks_exist() -> None:
    with pytest.raises(RuntimeError, match=r"built at the start of Trainer\.fit"):
        TopKASTCallback().summary()


def test_the_battery_holds_as_many_bad_configurations_as_the_readme_says() -> None:
    distinct = {p.id for p in CASES} | {p.id for p in RESUME_CASES} | {f"cli-{p.id}" for p in CLI_CASES}
    assert len(distinct) == len(CASES) + len(RESUME_CASES) + len(CLI_CASES)
    # + the sharded strategies checked directly
    assert len(distinct) + len(REFUSED_CASES) == guaranteed_count("bad configurations")
