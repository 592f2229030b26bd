"""FLOPs: what FlopCounter attributes to each masked tensor, and the fractions the callback logs, against hand counts.

A matmul of an (n, k) input by a (m, k) weight costs 2·n·k·m FLOPs; attention scores and their product with V cost
2·batch·heads·L·S·E each; an embedding lookup costs nothing (FlopCounterMode's convention: matmul-like kernels only).
"""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import GAN, make_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import TopKASTCallback
from lightning_topkast.reporting import FlopCounter, flops_fractions

B, T, D, HEADS, FF, VOCAB = 4, 5, 8, 2, 16, 12
N = B * T  # tokens


def _count(tensors: dict[str, Tensor], run: Any) -> FlopCounter:
    counter = FlopCounter(tensors)
    assert counter.start()
    try:
        run()
    finally:
        counter.finish()
    assert counter.finished
    return counter


# --- the counter, on bare modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["flash-attention-cpu", "math-attention"])
def test_transformer_layer_flops_per_tensor(dropout: float) -> None:
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=dropout, batch_first=True)
    weights = {
        "in_proj": layer.self_attn.in_proj_weight,
        "out_proj": layer.self_attn.out_proj.weight,
        "linear1": layer.linear1.weight,
    }
    counter = _count(weights, lambda: layer(torch.randn(B, T, D)))
    assert counter.masked == {"in_proj": 2 * N * 3 * D * D, "out_proj": 2 * N * D * D, "linear1": 2 * N * D * FF}
    attention = 2 * (2 * B * HEADS * T * T * (D // HEADS))  # QKᵀ and (softmax)·V, whichever kernel runs
    assert counter.dense == 2 * N * FF * D + attention  # linear2 is not masked here


def test_attention_with_separate_projections_counts_each() -> None:
    attn = nn.MultiheadAttention(D, HEADS, kdim=6, vdim=4, batch_first=True)
    q, k, v = torch.randn(B, T, D), torch.randn(B, 3, 6), torch.randn(B, 3, 4)
    names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    counter = _count({name: getattr(attn, name) for name in names}, lambda: attn(q, k, v))
    assert counter.masked == {
        "q_proj_weight": 2 * N * D * D,
        "k_proj_weight": 2 * B * 3 * 6 * D,
        "v_proj_weight": 2 * B * 3 * 4 * D,
    }


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_count_every_weight(kind: type[nn.RNNBase]) -> None:
    rnn = kind(6, D, num_layers=2, batch_first=True)
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[kind] * D
    weights = {name: getattr(rnn, name) for name in ("weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1")}
    counter = _count(weights, lambda: rnn(torch.randn(B, T, 6)))
    # 2 FLOPs per weight per token (input to hidden) and per token (hidden to hidden), both layers
    assert counter.masked == {
        "weight_ih_l0": 2 * N * gates * 6,
        "weight_hh_l0": 2 * N * gates * D,
        "weight_ih_l1": 2 * N * gates * D,
        "weight_hh_l1": 2 * N * gates * D,
    }
    assert counter.dense == 0


def test_conv_embedding_and_raw_parameters() -> None:
    conv, embedding, raw = nn.Conv2d(2, 3, 3), nn.Embedding(VOCAB, D), nn.Parameter(torch.randn(5, D))

    def run() -> None:
        conv(torch.randn(B, 2, 6, 6))
        F.linear(embedding(torch.randint(0, VOCAB, (B, T))), raw)

    counter = _count({"conv": conv.weight, "embedding": embedding.weight, "raw": raw}, run)
    assert counter.masked == {"conv": 2 * B * 4 * 4 * 3 * 2 * 9, "embedding": 0, "raw": 2 * N * D * 5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_copies_under_autocast_count_for_their_weight(dtype: torch.dtype) -> None:
    """Under autocast a Linear multiplies a bf16/fp16 copy of its weight, at another address: it still counts."""
    first, second = nn.Linear(D, FF), nn.Linear(FF, 3)

    def run() -> None:
        with torch.autocast("cpu", dtype=dtype):
            second(first(torch.randn(N, D)))

    counter = _count({"first": first.weight, "second": second.weight}, run)
    assert counter.masked == {"first": 2 * N * D * FF, "second": 2 * N * FF * 3}
    assert counter.dense == 0


def test_forward_only_between_pause_and_resume() -> None:
    linear = nn.Linear(D, 3)
    counter = FlopCounter({"w": linear.weight})
    assert counter.start()
    out = linear(torch.randn(B, D))
    counter.pause()
    out.sum().backward()  # not counted
    counter.resume()
    linear(torch.randn(B, D))
    counter.finish()
    assert counter.masked == {"w": 2 * (2 * B * D * 3)}
    assert not counter.start()  # the totals are final


def test_one_counter_at_a_time() -> None:
    first, second = FlopCounter({"w": nn.Linear(2, 2).weight}), FlopCounter({"v": nn.Linear(2, 2).weight})
    assert first.start()
    assert not second.start()
    second.finish()
    assert not second.finished  # it counted nothing: it will try on the next batch
    first.finish()
    assert second.start()
    second.finish()
    assert second.finished


def test_flops_fractions_by_hand() -> None:
    # 100 FLOPs at D = 0.2, D + M = 0.5 and 300 dense: (300 + 100·(0.4 + 0.5)/3) / 400, (300 + 20) / 400
    assert flops_fractions({"w": 100.0}, 300.0, {"w": (0.2, 0.5)}) == (0.825, 0.8)
    assert flops_fractions({}, 0.0, {}) == (1.0, 1.0)


# --- the fractions the callback logs, on a Transformer and an LSTM ------------------------------------------------


class LanguageModel(L.LightningModule):
    """Next-token prediction over a fixed token set; ``body`` maps (B, T, D) to (B, T, D)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.body = body
        self.head = nn.Linear(D, VOCAB)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        hidden = self.body(self.embed(tokens[:, :-1]))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return F.cross_entropy(self.head(hidden).flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_and_read(tmp_path: Path, body: nn.Module) -> tuple[TopKASTCallback, dict[int, dict[str, float]]]:
    tokens = torch.randint(0, VOCAB, (3 * B, T + 1), generator=torch.Generator().manual_seed(0))
    topkast = TopKASTCallback(verbose=False)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [topkast], max_epochs=1, logger=logger, log_every_n_steps=1)
    trainer.fit(LanguageModel(body), DataLoader(TensorDataset(tokens), batch_size=B))
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        rows = {int(r["step"]): {k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)}
    return topkast, rows


def _hand_fractions(flops: dict[str, int], dense: int, topkast: TopKASTCallback) -> tuple[float, float]:
    assert topkast.engine is not None
    total, train, inference = Fraction(dense + sum(flops.values())), Fraction(dense), Fraction(dense)
    for name, f in flops.items():
        t = topkast.engine.tensors[name]
        a, b = Fraction(int(t.forward_set.sum()), t.numel), Fraction(int(t.backward_set.sum()), t.numel)
        train += f * (2 * a + b) / 3
        inference += f * a
    f32 = lambda x: float(torch.tensor(float(x), dtype=torch.float32))  # noqa: E731  # as Lightning logs it
    return f32(train / total), f32(inference / total)


def test_logged_fractions_on_a_transformer_match_a_hand_count(tmp_path: Path) -> None:
    body = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    topkast, rows = _fit_and_read(tmp_path, body)
    assert topkast.engine is not None
    assert list(topkast.engine.tensors) == [  # embed.weight, the first candidate, stays dense
        "body.self_attn.in_proj_weight",
        "body.self_attn.out_proj.weight",
        "body.linear1.weight",
        "body.linear2.weight",
        "head.weight",
    ]
    flops = {
        "body.self_attn.in_proj_weight": 2 * N * 3 * D * D,
        "body.self_attn.out_proj.weight": 2 * N * D * D,
        "body.linear1.weight": 2 * N * D * FF,
        "body.linear2.weight": 2 * N * FF * D,
        "head.weight": 2 * N * D * VOCAB,
    }
    dense = 2 * (2 * B * HEADS * T * T * (D // HEADS))  # attention scores and values; the embedding lookup is free
    train, inference = _hand_fractions(flops, dense, topkast)
    assert sorted(rows) == [0, 1, 2]
    for row in rows.values():  # same sets every step at these sizes (exact counts), so the same fractions
        assert row["topkast/train_flops_fraction"] == train
        assert row["topkast/inference_flops_fraction"] == inference
    # forward hooks on nn.Linear saw linear1, linear2 and head only: 51% of these FLOPs, all of them masked
    assert (
        sum(flops.values()) - flops["body.self_attn.in_proj_weight"] - flops["body.self_attn.out_proj.weight"] == 14080
    )


def test_logged_fractions_on_an_lstm_match_a_hand_count(tmp_path: Path) -> None:
    body = nn.LSTM(D, D, num_layers=2, batch_first=True)
    topkast, rows = _fit_and_read(tmp_path, body)
    assert topkast.engine is not None
    gates = 4 * D
    flops = {
        "body.weight_ih_l0": 2 * N * gates * D,
        "body.weight_hh_l0": 2 * N * gates * D,
        "body.weight_ih_l1": 2 * N * gates * D,
        "body.weight_hh_l1": 2 * N * gates * D,
        "head.weight": 2 * N * D * VOCAB,
    }
    assert list(topkast.engine.tensors) == list(flops)
    train, inference = _hand_fractions(flops, 0, topkast)
    for row in rows.values():
        assert row["topkast/train_flops_fraction"] == train
        assert row["topkast/inference_flops_fraction"] == inference


def test_manual_optimization_counts_every_forward_pass_and_no_backward(tmp_path: Path) -> None:
    topkast = TopKASTCallback(dense_first_layer=False, verbose=False)
    make_trainer(tmp_path, [topkast], max_steps=4).fit(
        GAN(), DataLoader(TensorDataset(torch.randn(16, 8)), batch_size=8)
    )
    flops = topkast._require_flops()
    batch = 8
    assert flops.masked == {
        "generator.0.weight": 2 * batch * 4 * 16,
        "generator.2.weight": 2 * batch * 16 * 8,
        "discriminator.0.weight": 3 * 2 * batch * 8 * 16,  # real, fake for D, fake for G
        "discriminator.2.weight": 3 * 2 * batch * 16 * 1,
    }
    assert flops.dense == 0
