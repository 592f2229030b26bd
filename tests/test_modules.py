"""The callback works unchanged on every kind of layer: the parameter itself holds α, so no module needs adapting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from conftest import assert_alpha, engine_of, fit, half_up
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_topkast import TopKASTCallback
from lightning_topkast.state import TopKAST

STEPS = 4


class Classifier(L.LightningModule):
    """Cross-entropy on whatever ``forward`` returns, SGD with momentum, losses recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ConvNet(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


class EmbeddingBag(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).mean(1))


class Attention(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class Recurrent(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TiedLM(Classifier):
    """The output head reuses the embedding matrix: one parameter, reached through two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def hidden(self, tokens: Tensor) -> Tensor:
        return F.relu(self.mid(self.emb(tokens).mean(1)))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.hidden(tokens))


class Functional(Classifier):
    """A raw ``nn.Parameter`` used through ``F.linear``: a candidate like any weight matrix (named here by include)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.w = nn.Parameter(torch.randn(3, 16) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(self.hidden(x)), self.w)


def _data(kind: str, classes: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    n = 8 * STEPS
    inputs = {
        "image": lambda: torch.randn(n, 1, 6, 6, generator=g),
        "tokens": lambda: torch.randint(0, 12, (n, 5), generator=g),
        "sequence": lambda: torch.randn(n, 5, 4, generator=g),
        "set": lambda: torch.randn(n, 4, 8, generator=g),
        "vector": lambda: torch.randn(n, 8, generator=g),
    }
    return inputs[kind](), torch.randint(0, classes, (n,), generator=g)


def _fit_and_check(tmp_path: Path, model: Classifier, data: tuple[Tensor, Tensor], **kwargs: Any) -> TopKAST:
    """:func:`conftest.fit` for ``STEPS`` steps with ``TopKASTCallback(**kwargs)``; then the model trained sparse."""
    callback = TopKASTCallback(update_interval=2, verbose=False, **kwargs)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    fit(tmp_path, model, [callback], DataLoader(TensorDataset(*data), batch_size=8), max_steps=STEPS)
    engine = engine_of(callback)

    assert engine.steps == [STEPS]
    assert len(model.losses) == STEPS
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert_alpha(engine)
    params = dict(model.named_parameters())
    for name, t in engine.tensors.items():
        assert params[name] is t.param, name
        assert int(t.param.count_nonzero()) == half_up(t.forward_density, t.numel), name
        assert not torch.equal(t.theta, initial[name]), name  # it trained
    return engine


def _assert_forward_is_sparse(model: nn.Module, engine: TopKAST, x: Tensor) -> None:
    """The module's own forward equals a forward on α rebuilt from the callback's θ and A, not on the dense θ."""
    model.eval()
    alpha = {name: torch.where(t.forward_set, t.theta, 0) for name, t in engine.tensors.items()}
    dense = {name: t.theta for name, t in engine.tensors.items()}
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, functional_call(model, alpha, (x,)))
        assert not torch.allclose(out, functional_call(model, dense, (x,)))


def test_conv2d(tmp_path: Path) -> None:
    model, data = ConvNet(), _data("image")
    engine = _fit_and_check(tmp_path, model, data)
    assert list(engine.tensors) == ["conv2.weight", "head.weight"]
    assert engine.tensors["conv2.weight"].numel == 144
    assert int(engine.tensors["conv2.weight"].forward_set.sum()) == 29  # round(0.2 * 144)
    _assert_forward_is_sparse(model, engine, data[0])


def test_embedding(tmp_path: Path) -> None:
    model, data = EmbeddingBag(), _data("tokens")
    engine = _fit_and_check(tmp_path, model, data, dense_first_layer=False)
    assert list(engine.tensors) == ["emb.weight", "head.weight"]
    _assert_forward_is_sparse(model, engine, data[0])


def test_multihead_attention(tmp_path: Path) -> None:
    model, data = Attention(), _data("set")
    engine = _fit_and_check(tmp_path, model, data, dense_first_layer=False)
    assert list(engine.tensors) == ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    _assert_forward_is_sparse(model, engine, data[0])


def _lstm_reference(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One LSTM layer written out (PyTorch's gate order i, f, g, o)."""
    h = c = torch.zeros(x.shape[0], w_hh.shape[1])
    outputs = []
    for step in range(x.shape[1]):
        i, f, g, o = (x[:, step] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, 1)


def test_lstm_runs_on_the_masked_flat_weights(tmp_path: Path) -> None:
    model, data = Recurrent(), _data("sequence")
    engine = _fit_and_check(tmp_path, model, data, dense_first_layer=False)
    assert list(engine.tensors) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight"]
    _assert_forward_is_sparse(model, engine, data[0])

    ih, hh = engine.tensors["lstm.weight_ih_l0"], engine.tensors["lstm.weight_hh_l0"]
    b_ih, b_hh = model.lstm.bias_ih_l0.detach(), model.lstm.bias_hh_l0.detach()
    x = data[0]
    with torch.no_grad():
        out, _ = model.lstm(x)
    alpha_ih, alpha_hh = torch.where(ih.forward_set, ih.theta, 0), torch.where(hh.forward_set, hh.theta, 0)
    torch.testing.assert_close(out, _lstm_reference(x, alpha_ih, alpha_hh, b_ih, b_hh), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, _lstm_reference(x, ih.theta, hh.theta, b_ih, b_hh), rtol=1e-3, atol=1e-4)


def test_tied_weight_has_one_mask_seen_by_both_modules(tmp_path: Path) -> None:
    model, data = TiedLM(), _data("tokens", classes=12)
    engine = _fit_and_check(tmp_path, model, data, dense_first_layer=False)
    assert list(engine.tensors) == ["emb.weight", "mid.weight"]
    tied = engine.tensors["emb.weight"]
    assert model.head.weight is model.emb.weight is tied.param
    _assert_forward_is_sparse(model, engine, data[0])

    alpha = torch.where(tied.forward_set, tied.theta, 0)
    tokens = data[0]
    with torch.no_grad():
        torch.testing.assert_close(model.emb(tokens), alpha[tokens], rtol=0, atol=0)
        hidden = model.hidden(tokens)
        torch.testing.assert_close(model.head(hidden), hidden @ alpha.T, rtol=1e-6, atol=1e-6)
    state = model.state_dict()  # both names are saved, both hold α
    assert torch.equal(state["emb.weight"], alpha)
    assert torch.equal(state["head.weight"], alpha)


def test_functional_linear_on_a_raw_parameter(tmp_path: Path) -> None:
    model, data = Functional(), _data("vector")
    engine = _fit_and_check(tmp_path, model, data, include=["w"], dense_first_layer=False)
    assert list(engine.tensors) == ["w"]
    assert int(model.w.count_nonzero()) == 10  # round(0.2 * 48)
    _assert_forward_is_sparse(model, engine, data[0])
