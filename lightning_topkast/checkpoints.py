"""The engine's state in Lightning's checkpoints: α in the model's weights, sharded θ beside the model's shards.

Lightning calls the hooks; what they do to a checkpoint is here, with no Lightning import:
:func:`prepare_to_save` before a checkpoint is written, :func:`load_saved_apart` before the engine's state is
restored, :func:`holds_forward_weights` to tell whether weights were loaded into the model since the engine saw it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_topkast import sharded

if TYPE_CHECKING:
    from lightning_topkast.state import TopKAST


def prepare_to_save(checkpoint: dict[str, Any], engine: TopKAST, state_key: str) -> None:
    """Make ``checkpoint`` hold α in the model's weights, and the sharded θ and sets where sharded state goes.

    ``state_key``: the callback's, under which ``checkpoint["callbacks"]`` holds the engine's state. Under
    sharding a collective: every rank saves.
    """
    checkpoint["state_dict"] = with_forward_weights(checkpoint.get("state_dict", {}), engine)
    if engine.sharded:
        move_into_checkpoint(checkpoint, state_key)


@torch.no_grad()
def holds_forward_weights(engine: TopKAST) -> bool:
    """Whether every masked parameter still holds the engine's α (nothing loaded into the model since)."""
    for t in engine.tensors.values():
        alpha, param = torch.where(t.forward_set, t.theta, 0), t.local_param
        if not torch.equal(param, alpha) and not bool(((param == alpha) | (param.isnan() & alpha.isnan())).all()):
            return False
    return True


def with_forward_weights(state_dict: dict[str, Any], engine: TopKAST) -> dict[str, Any]:
    """``state_dict`` with α for parameters saved mid-step (holding θ on B), under every name that shares them."""
    pending = engine.pending_forward_weights()
    if not pending:
        return state_dict
    storage = {engine.tensors[name].local_param.data_ptr(): name for name in pending}

    def alpha_for(value: Tensor) -> Tensor:
        name = storage.get(sharded.local(value).data_ptr())
        if name is None:
            return value
        placement = engine.tensors[name].placement
        return pending[name] if placement is None else placement.wrap(pending[name])

    # entries are views of the live parameters: replace them, never write into them
    return {key: alpha_for(value) if isinstance(value, Tensor) else value for key, value in state_dict.items()}


# --- sharded θ and sets --------------------------------------------------------------------------------------------

SAVED_APART = "saved with the model's sharded state"  # in the callback state, where θ or the set bytes would be
_KEY = "_topkast"  # the prefix of their entries in the model's state


def move_into_checkpoint(checkpoint: dict[str, Any], state_key: str) -> None:
    """Put the callback state's sharded θ and set bytes where the strategy saves sharded state.

    Lightning writes the callback states of rank 0 alone, so a ``DTensor`` there would keep one shard. In a
    distributed checkpoint (the model's state holds ``DTensor``s) they join the model's state, which torch's
    distributed checkpoint writes from every rank, and the callback state says where they went; in a consolidated
    one (whole tensors) they are gathered whole. A collective: every rank saves.
    """
    from torch.distributed.tensor import DTensor

    state, model = checkpoint.get("callbacks", {}).get(state_key), checkpoint.get("state_dict", {})
    if not state or "tensors" not in state:
        return
    distributed = any(isinstance(value, DTensor) for value in model.values())
    for name, saved in state["tensors"].items():
        for key in ("theta", "code"):
            value = saved[key]
            if not isinstance(value, DTensor):
                continue
            if distributed:
                model[_entry(state_key, name, key)] = value
                saved[key] = SAVED_APART
            else:
                saved[key] = value.full_tensor().cpu()


def load_saved_apart(state: dict[str, Any], tensors: dict[str, Any], path: Any, state_key: str) -> dict[str, Any]:
    """``state`` with the θ and set bytes that :func:`move_into_checkpoint` saved apart, read from ``path``.

    ``tensors``: the engine's, which say each entry's shape and shard. A collective: every rank loads.
    """
    wanted: dict[tuple[str, str], Tensor] = {}  # (tensor, "theta" or "code"): where to load it
    for name, saved in state.get("tensors", {}).items():
        tensor = tensors.get(name)
        for key in ("theta", "code"):
            if saved.get(key) != SAVED_APART or tensor is None:
                continue  # a tensor not masked now: the engine reports the difference
            held = getattr(tensor, key)
            place = tensor.placement
            wanted[name, key] = place.wrap(torch.empty_like(held)) if place else held.new_empty(tensor.shape)
    if not wanted:
        return state
    if path is None:
        raise ValueError(
            "this Top-KAST state keeps the sharded θ and sets in a distributed checkpoint's model state: restore it "
            "with Trainer.fit(ckpt_path=...), which says where to read them"
        )
    import torch.distributed.checkpoint as dcp

    dcp.load({"state_dict": {_entry(state_key, *where): t for where, t in wanted.items()}}, checkpoint_id=path)
    loaded = {**state, "tensors": {name: dict(saved) for name, saved in state["tensors"].items()}}
    for (name, key), value in wanted.items():
        loaded["tensors"][name][key] = value
    return loaded


def _entry(state_key: str, name: str, key: str) -> str:
    return f"{_KEY}/{state_key}/{name}/{key}"
