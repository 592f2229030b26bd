"""Sparse export: trained masked weights to safetensors as CSR and back to the exact dense state_dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import MLP, make_loader, make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import TopKASTCallback, load_sparse, save_sparse
from lightning_topkast.export import csr_components, dense_from_csr
from lightning_topkast.selection import count


def _assert_same_state(loaded: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype, name
        assert torch.equal(loaded[name], value), name


def _trained(tmp_path: Path, model: nn.Module, loader: DataLoader, **kwargs: object) -> TopKASTCallback:
    callback = TopKASTCallback(update_interval=2, verbose=False, **kwargs)  # type: ignore[arg-type]
    make_trainer(tmp_path, [callback], max_steps=6).fit(model, loader)  # type: ignore[arg-type]
    return callback


def test_round_trip_after_training_stores_exactly_the_forward_sets(tmp_path: Path) -> None:
    model = MLP(features=16, hidden=64)
    callback = _trained(tmp_path, model, make_loader(n=96, features=16), forward_sparsity=0.9, backward_sparsity=0.8)
    assert callback.engine is not None

    export = save_sparse(model, tmp_path / "model.safetensors", masks=callback)

    masked = callback.engine.tensors
    assert set(export.sparse) == set(masked) == {"net.2.weight", "net.4.weight"}
    _assert_same_state(load_sparse(export.path), model.state_dict())
    with safetensors.safe_open(export.path, framework="pt") as file:
        layout = json.loads(file.metadata()["sparse"])
        for name, tensor in masked.items():
            kept = count(tensor.forward_density, tensor.numel)
            assert file.get_tensor(f"{name}.values").numel() == kept
            assert layout[name] == {
                "shape": list(tensor.theta.shape),
                "dtype": "float32",
                "density": kept / tensor.numel,
            }
        assert file.get_tensor("net.2.weight.col_indices").dtype == torch.int16  # 64 columns
        assert "net.0.weight" in file.keys()  # noqa: SIM118 (kept dense, as trained)
    # 10% of the masked weights at 6 bytes each (fp32 value, int16 column) instead of 4 bytes each
    assert export.file_bytes < export.dense_bytes
    assert export.size_ratio == export.file_bytes / export.dense_bytes


def test_the_export_loads_into_a_fresh_model_that_predicts_the_same(tmp_path: Path) -> None:
    model = MLP(features=16, hidden=64)
    callback = _trained(tmp_path, model, make_loader(n=96, features=16))
    path = save_sparse(model, tmp_path / "model.safetensors", masks=callback).path

    fresh = MLP(features=16, hidden=64)
    fresh.load_state_dict(load_sparse(path))
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))


class ConvNet(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(32, 3))


def test_conv_weights_round_trip_as_two_dimensional_csr(tmp_path: Path) -> None:
    model = ConvNet()
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(48, 1, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)))
    callback = _trained(tmp_path, model, loader)
    export = save_sparse(model, tmp_path / "conv.safetensors", masks=callback)

    assert "net.2.weight" in export.sparse
    with safetensors.safe_open(export.path, framework="pt") as file:
        assert file.get_tensor("net.2.weight.crow_indices").numel() == 8 + 1  # rows: output channels
    _assert_same_state(load_sparse(export.path), model.state_dict())


def test_without_masks_tensors_worth_compressing_are_stored_sparse(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(40, 50, generator=g) * (torch.rand(40, 50, generator=g) < 0.1)
    state = {
        "sparse": sparse,
        "dense": torch.randn(40, 50, generator=g),
        "bf16": sparse.bfloat16(),
        "steps": torch.tensor([3, 0, 0, 0]),  # integers stay as they are
        "scalar": torch.tensor(0.0),
    }
    export = save_sparse(state, tmp_path / "state.safetensors")

    assert export.sparse == ("sparse", "bf16")
    _assert_same_state(load_sparse(export.path), state)


def test_a_kept_zero_stays_stored() -> None:
    value = torch.tensor([[0.0, -0.0, 5.0], [1.0, 0.0, 0.0]])
    keep = torch.tensor([[True, True, False], [False, False, True]])
    values, crow, col = csr_components(value, keep)
    assert values.tolist() == [0.0, -0.0, 0.0]
    assert torch.signbit(values).tolist() == [False, True, False]  # the sign of a stored zero survives
    assert crow.tolist() == [0, 2, 3]
    assert col.tolist() == [0, 1, 2]
    assert torch.equal(dense_from_csr(values, crow, col, [2, 3]), torch.where(keep, value, 0.0))


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    model = MLP()
    with pytest.raises(ValueError, match=r"masks names tensors the state_dict does not have: \['nope'\]"):
        save_sparse(model, tmp_path / "a.safetensors", masks={"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"net.2.weight \[2, 2\] vs \[16, 16\]"):
        save_sparse(model, tmp_path / "a.safetensors", masks={"net.2.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"has no masks yet; export after Trainer\.fit"):
        save_sparse(model, tmp_path / "a.safetensors", masks=TopKASTCallback())
    with pytest.raises(TypeError, match=r"masks must be a TopKASTCallback.*got list"):
        save_sparse(model, tmp_path / "a.safetensors", masks=["net.2.weight"])  # type: ignore[arg-type]

    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="is not a lightning_topkast sparse export"):
        load_sparse(plain)
