"""``dense_first_layer`` / ``dense_last_layer`` follow the forward pass, not registration order (issue 17, H6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import assert_alpha, bit_exact, engine_of, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import TopKASTCallback
from lightning_topkast.selection import count
from lightning_topkast.targets import ForwardOrder, candidates, select

VOCAB, WIDTH = 11, 16
FIRST = "first layer in the forward pass (dense_first_layer=True)"
LAST = "last layer in the forward pass (dense_last_layer=True)"


class HeadFirstLM(L.LightningModule):
    """Registers its output head before its token embedding, as LitGPT's ``GPT`` does (``lm_head``, then
    ``transformer.wte``): by registration the "first layer" is the head."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.block(self.wte(ids)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, targets = batch
        return F.cross_entropy(self(ids), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def tokens(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (n,), generator=g)
    return DataLoader(TensorDataset(ids, (3 * ids + 1) % VOCAB), batch_size=16)


def forward_order(model: nn.Module, *inputs: torch.Tensor) -> list[str]:
    tracer = ForwardOrder(model)
    tracer.start()
    try:
        model(*inputs)
    finally:
        tracer.stop()
    return tracer.order


def test_records_first_use_not_registration() -> None:
    model = HeadFirstLM()
    assert [c.name for c in candidates(model)] == ["lm_head.weight", "wte.weight", "block.0.weight", "block.2.weight"]
    assert forward_order(model, torch.arange(4)) == ["wte.weight", "block.0.weight", "block.2.weight", "lm_head.weight"]


class RawAndTied(nn.Module):
    """A raw parameter used through ``F.linear`` after a child that its module owns, and a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(WIDTH, WIDTH))  # registered first, used second
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.lstm = nn.LSTM(WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor under its first name

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.embed(ids), self.proj)
        return self.head(self.lstm(h)[0])


def test_raw_parameters_lstm_weights_and_tied_heads_count_at_first_use() -> None:
    order = forward_order(RawAndTied(), torch.arange(6).view(2, 3))
    assert order == ["embed.weight", "proj", "lstm.weight_ih_l0", "lstm.weight_hh_l0"]


def test_select_keeps_first_and_last_of_the_forward_order_dense() -> None:
    model = HeadFirstLM()
    order = forward_order(model, torch.arange(4))
    selection = select(model, dense_last_layer=True, order=order)
    assert selection.masked == ["block.0.weight", "block.2.weight"]
    assert selection.kept_dense == {"lm_head.weight": LAST, "wte.weight": FIRST}
    by_registration = select(model, dense_last_layer=True)
    assert by_registration.kept_dense == {
        "lm_head.weight": "first layer (dense_first_layer=True)",
        "block.2.weight": "last layer (dense_last_layer=True)",
    }
    # an order that names none of the candidates (the forward pass used none of them) falls back to registration
    assert select(model, order=["nothing"]).kept_dense == {"lm_head.weight": "first layer (dense_first_layer=True)"}
    # a candidate the forward pass never used is neither first nor last
    assert select(model, dense_last_layer=True, order=order[1:3]).kept_dense == {
        "block.0.weight": FIRST,
        "block.2.weight": LAST,
    }


class Snapshots(L.Callback):
    """What the model held right after each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize("last", [False, True])
def test_a_fit_moves_the_masks_before_the_first_step(tmp_path: Path, last: bool) -> None:
    torch.manual_seed(0)
    model = HeadFirstLM()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback, snapshots = TopKASTCallback(dense_last_layer=last), Snapshots()
    make_trainer(tmp_path, [callback, snapshots], max_steps=3).fit(model, tokens())
    engine = engine_of(callback)
    masked = ([] if last else ["lm_head.weight"]) + ["block.0.weight", "block.2.weight"]  # registration order
    assert list(engine.tensors) == masked
    assert callback.kept_dense == {"wte.weight": FIRST, **({"lm_head.weight": LAST} if last else {})}
    assert callback.forward_order == ["wte.weight", "block.0.weight", "block.2.weight", "lm_head.weight"]
    assert_alpha(engine)
    for name, tensor in engine.tensors.items():
        assert int(tensor.forward_set.sum()) == count(0.2, tensor.numel), name
    first = snapshots.steps[0]
    # the embedding trained dense from the first step on: every row the batch used moved, the others kept θ
    used = torch.zeros(VOCAB, dtype=torch.bool)
    used[next(iter(tokens()))[0]] = True
    assert bool((first["wte.weight"] != 0).all())
    assert bool((first["wte.weight"][~used] == start["wte.weight"][~used]).all())
    assert bool((first["wte.weight"][used] != start["wte.weight"][used]).any())
    # the head, masked from the first step on: outside B nothing moved, A holds exact counts
    if not last:
        head = engine.tensors["lm_head.weight"]
        assert int((first["lm_head.weight"] != 0).sum()) == count(0.2, head.numel)
        assert callback.hyperparameters()["masked_tensors"] == 3


def test_resume_keeps_the_forward_order_and_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole, saver = (
        TopKASTCallback(update_interval=3),
        ModelCheckpoint(tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1),
    )
    model = HeadFirstLM()
    make_trainer(tmp_path, [whole, saver], max_epochs=2, enable_checkpointing=True).fit(model, tokens())
    torch.manual_seed(123)  # a different initialisation: everything comes from the checkpoint
    resumed, again = TopKASTCallback(update_interval=3), HeadFirstLM()
    trainer = make_trainer(tmp_path / "resumed", [resumed], max_epochs=2)
    trainer.fit(again, tokens(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert (
        resumed.forward_order
        == whole.forward_order
        == ["wte.weight", "block.0.weight", "block.2.weight", "lm_head.weight"]
    )
    assert resumed.kept_dense == whole.kept_dense == {"wte.weight": FIRST}
    assert engine_of(resumed).steps == engine_of(whole).steps == [8]
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert bit_exact(a, b), name
    for name, tensor in engine_of(whole).tensors.items():
        assert bit_exact(tensor.theta, engine_of(resumed).tensors[name].theta), name
        assert bit_exact(tensor.code, engine_of(resumed).tensors[name].code), name


def test_the_same_order_keeps_the_engine(tmp_path: Path) -> None:
    from conftest import MLP, make_loader

    callback = TopKASTCallback()
    make_trainer(tmp_path, [callback], max_steps=2).fit(MLP(), make_loader())
    assert callback.kept_dense == {"net.0.weight": FIRST}
    assert engine_of(callback).steps == [2]


class ReadsWeights(L.Callback):
    """A callback that touches the weights, last layer first, before the forward pass: not a use by the forward."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for param in reversed(list(pl_module.parameters())):
            param.detach().norm()


def test_weights_read_outside_a_forward_do_not_count(tmp_path: Path) -> None:
    callback = TopKASTCallback()
    make_trainer(tmp_path, [callback, ReadsWeights()], max_steps=1).fit(HeadFirstLM(), tokens())
    assert callback.forward_order == ["wte.weight", "block.0.weight", "block.2.weight", "lm_head.weight"]
