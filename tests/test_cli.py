"""LightningCLI: the callback named in a YAML trains an unchanged module sparse."""

from __future__ import annotations

import importlib.util
import inspect
import io
import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import assert_alpha

from lightning_topkast import TopKASTCallback
from lightning_topkast.selection import count

ROOT = Path(__file__).resolve().parents[1]


def _digits_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["digits_example"] = module
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *extra: str) -> object:
    args = [
        "fit",
        "--config",
        str(ROOT / "examples" / "digits_topkast.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.max_steps=7",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        *extra,
    ]
    return _digits_example().main(args)


def test_yaml_callback_trains_the_module_sparse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)
    lightning_logger = logging.getLogger("lightning.pytorch")  # where Lightning's own summaries go
    lightning_logger.addHandler(handler)
    try:
        cli = _run(tmp_path)
    finally:
        lightning_logger.removeHandler(handler)
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, TopKASTCallback)]  # type: ignore[attr-defined]
    assert len(callbacks) == 1
    callback = callbacks[0]
    default_interval = inspect.signature(TopKASTCallback).parameters["update_interval"].default
    assert (callback.forward_sparsity, callback.backward_sparsity, callback.update_interval) == (
        0.8,
        0.5,
        default_interval,
    )
    assert callback.distribution == "erk"
    assert callback.engine is not None
    assert callback.engine.steps == [7]
    assert sorted(callback.engine.tensors) == ["net.2.weight", "net.4.weight"]
    assert_alpha(callback.engine)
    total_forward = sum(int(t.forward_set.sum()) for t in callback.engine.tensors.values())
    numel = sum(t.numel for t in callback.engine.tensors.values())
    assert abs(total_forward / numel - 0.2) < 1e-3  # ERK keeps the overall budget
    assert "1 | net.2.weight | (256, 256) | 65536" in printed.getvalue()  # the summary table at fit start
    assert "validation accuracy of the sparse model" in capsys.readouterr().out


def test_yaml_with_a_misspelled_argument_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_topkast.TopKASTCallback\n"
        "      init_args:\n        forward_sparsty: 0.9\n"
    )
    with pytest.raises(SystemExit):
        _digits_example().main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert "forward_sparsty" in capsys.readouterr().err


def test_yaml_with_an_invalid_value_names_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((SystemExit, ValueError)) as error:
        _run(tmp_path, "--trainer.callbacks.init_args.backward_sparsity=0.95")
    message = str(error.value) + capsys.readouterr().err
    assert "backward_sparsity=0.95" in message


def test_yaml_overrides_and_patterns_reach_the_callback(tmp_path: Path) -> None:
    config = tmp_path / "overrides.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_topkast.TopKASTCallback\n      init_args:\n"
        "        distribution: global\n        include: [Linear]\n        exclude: ['net.0.*']\n"
        "        dense_first_layer: false\n"
        "        sparsity_overrides:\n          net.4.weight: [0.5, 0.25]\n"
    )
    cli = _run(tmp_path, "--config", str(config))
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, TopKASTCallback)]  # type: ignore[attr-defined]
    assert callback.sparsity_overrides == {"net.4.weight": (0.5, 0.25)}
    assert (callback.distribution, callback.include, callback.exclude) == ("global", ["Linear"], ["net.0.*"])
    assert callback.engine is not None
    pinned = callback.engine.tensors["net.4.weight"]
    assert int(pinned.forward_set.sum()) == count(0.5, 2560)
    assert int(pinned.backward_set.sum()) == count(0.75, 2560)
    assert list(callback.engine.tensors) == ["net.2.weight", "net.4.weight"]
