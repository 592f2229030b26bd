"""Sparse export: a trained model's masked weights as CSR components in one ``safetensors`` file, the rest dense.

A tensor stored sparse is kept as three arrays under its name: ``{name}.values`` (its dtype),
``{name}.crow_indices`` and ``{name}.col_indices`` (the smallest integer type that holds them), the CSR form of the
tensor viewed as 2-D (first dimension by the rest). The file's metadata records each one's shape, dtype and density,
so :func:`load_sparse` rebuilds the dense state_dict, zeros included, with nothing but the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import safetensors.torch
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_topkast.callback import TopKASTCallback
    from lightning_topkast.state import TopKAST

FORMAT = "lightning_topkast.csr"
FORMAT_VERSION = "1"
_COMPONENTS = ("values", "crow_indices", "col_indices")

Masks = Union["TopKASTCallback", "TopKAST", Mapping[str, Tensor], None]


@dataclass(frozen=True)
class SparseExport:
    """What :func:`save_sparse` wrote: the sparse tensors' names and the file's size against a dense file."""

    path: str
    sparse: tuple[str, ...]
    file_bytes: int
    dense_bytes: int

    @property
    def size_ratio(self) -> float:
        """File size as a fraction of the same state_dict saved dense with ``safetensors``."""
        return self.file_bytes / self.dense_bytes


def save_sparse(
    model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike[str], masks: Masks = None
) -> SparseExport:
    """Write ``model``'s state_dict to ``path`` (safetensors) with the masked tensors in CSR form.

    Args:
        model: a module (its ``state_dict()``) or a state_dict.
        path: the file to write.
        masks: which entries each sparse tensor keeps: a ``TopKASTCallback`` or ``TopKAST`` after training (its
            forward sets A), or ``{name: bool mask}``. With ``None``, every floating-point tensor whose CSR form is
            smaller than its dense form is stored sparse, keeping its nonzero entries.

    Returns:
        The names stored sparse and the file's size next to the dense file's.
    """
    state = _state_dict(model)
    patterns = _patterns(masks, state)
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict[str, object]] = {}
    for name, value in state.items():
        pattern = patterns.get(name) if masks is not None else _worth_storing_sparse(value)
        if pattern is None:
            tensors[name] = value.detach().cpu().contiguous().clone()
            continue
        components = csr_components(value, pattern)
        for component, array in zip(_COMPONENTS, components, strict=True):
            tensors[f"{name}.{component}"] = array
        layout[name] = {
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "density": components[0].numel() / max(value.numel(), 1),
        }
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "sparse": json.dumps(layout)}
    safetensors.torch.save_file(tensors, os.fspath(path), metadata=metadata)
    dense = {name: value.detach().cpu().contiguous().clone() for name, value in state.items()}
    return SparseExport(
        path=os.fspath(path),
        sparse=tuple(layout),
        file_bytes=os.path.getsize(path),
        dense_bytes=len(safetensors.torch.save(dense)),
    )


def load_sparse(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The dense state_dict that :func:`save_sparse` wrote to ``path``: every stored entry in place, zeros elsewhere.

    Raises:
        ValueError: if ``path`` is not a file written by :func:`save_sparse`.
    """
    with safetensors.safe_open(os.fspath(path), framework="pt", device=str(device)) as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"path={os.fspath(path)!r} is not a lightning_topkast sparse export (its metadata format is "
                f"{metadata.get('format')!r}, expected {FORMAT!r}); load a plain safetensors file with "
                "safetensors.torch.load_file"
            )
        layout: dict[str, dict[str, object]] = json.loads(metadata["sparse"])
        stored = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    state: dict[str, Tensor] = {}
    for key, value in stored.items():
        name, _, component = key.rpartition(".")
        if name in layout and component in _COMPONENTS:
            if component == "values":
                shape = [int(size) for size in layout[name]["shape"]]  # type: ignore[attr-defined]
                state[name] = dense_from_csr(*(stored[f"{name}.{part}"] for part in _COMPONENTS), shape)
            continue
        state[key] = value
    return state


def csr_components(value: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CSR ``(values, crow_indices, col_indices)`` of the entries of ``value`` where ``keep``, as a 2-D matrix.

    The entries kept are exactly those in ``keep`` (a kept zero stays stored), in row-major order.

    Examples:
        >>> v, crow, col = csr_components(torch.tensor([[0.0, 2.0], [3.0, 4.0]]), torch.tensor([[1, 1], [0, 1]]) > 0)
        >>> v.tolist(), crow.tolist(), col.tolist()
        ([0.0, 2.0, 4.0], [0, 2, 3], [0, 1, 1])
    """
    if keep.shape != value.shape:
        raise ValueError(f"keep has shape {list(keep.shape)}, expected the tensor's shape {list(value.shape)}")
    rows, columns = _as_matrix(value.shape)
    matrix = value.detach().cpu().reshape(rows, columns)
    kept = keep.detach().cpu().reshape(rows, columns).to(torch.bool)
    row, column = kept.nonzero(as_tuple=True)  # row-major order, as CSR wants
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(kept.sum(dim=1), dim=0)
    return (
        matrix[row, column].contiguous(),
        crow.to(_index_dtype(int(crow[-1]))),
        column.to(_index_dtype(columns - 1)),
    )


def dense_from_csr(values: Tensor, crow_indices: Tensor, col_indices: Tensor, shape: list[int]) -> Tensor:
    """The dense tensor of ``shape`` whose 2-D view has these CSR components (zeros elsewhere)."""
    rows, columns = _as_matrix(shape)
    counts = crow_indices.to(torch.int64).diff()
    row = torch.repeat_interleave(torch.arange(rows, device=values.device), counts)
    dense = torch.zeros(rows, columns, dtype=values.dtype, device=values.device)
    dense[row, col_indices.to(torch.int64)] = values
    return dense.reshape(shape)


def _state_dict(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = dict(model.state_dict() if isinstance(model, nn.Module) else model)
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}; only tensors can be exported")
    return state


def _patterns(masks: Masks, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if masks is None:
        return {}
    if hasattr(masks, "engine"):  # a TopKASTCallback
        if masks.engine is None:
            raise ValueError("masks: the TopKASTCallback has no masks yet; export after Trainer.fit")
        masks = masks.engine
    if hasattr(masks, "tensors"):  # a TopKAST engine: export its forward sets
        patterns = {name: tensor.forward_set for name, tensor in masks.tensors.items()}
    elif isinstance(masks, Mapping):
        patterns = dict(masks)
    else:
        raise TypeError(
            "masks must be a TopKASTCallback, a TopKAST, a mapping of names to bool masks or None, "
            f"got {type(masks).__name__}"
        )
    unknown = sorted(set(patterns) - set(state))
    if unknown:
        raise ValueError(f"masks names tensors the state_dict does not have: {unknown}; it has {sorted(state)}")
    wrong = [
        f"{name} {list(p.shape)} vs {list(state[name].shape)}"
        for name, p in patterns.items()
        if p.shape != state[name].shape
    ]
    if wrong:
        raise ValueError(f"masks have shapes other than their tensors': {wrong}")
    return patterns


def _worth_storing_sparse(value: Tensor) -> Tensor | None:
    if not value.is_floating_point() or value.dim() == 0:
        return None
    keep = value != 0
    nonzero = int(keep.sum())
    rows, columns = _as_matrix(value.shape)
    csr_bytes = (
        nonzero * (value.element_size() + _index_dtype(columns - 1).itemsize)
        + (rows + 1) * _index_dtype(nonzero).itemsize
    )
    return keep if csr_bytes < value.numel() * value.element_size() else None


def _as_matrix(shape: torch.Size | list[int]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), math.prod(int(size) for size in shape[1:])


def _index_dtype(largest: int) -> torch.dtype:
    for dtype in (torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64
