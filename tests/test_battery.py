"""Ten LightningModules written as people write them, each trained with ``TopKASTCallback()`` and no arguments.

Lightning's own ``BoringModel`` and ``DemoModel`` and its demo Transformer and LSTM language models run unchanged
(the demos on a small text file in WikiText2's format, with their own dataloaders); the others follow styles found
in the wild: raw parameters through ``F.linear``, a tied embedding, a GAN with two optimizers and manual
optimization, a CNN with BatchNorm and a step-wise LR schedule, hand-written attention with a raw qkv matrix and a
hand-written RMSNorm, and GPT-2's ``Conv1D``. Each fits for two epochs with exact set sizes on every masked tensor,
then resumes from the checkpoint of the first epoch and must end bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import GAN, RNGState, assert_alpha, bit_exact, fit, guaranteed_count, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import LightningLSTM, LightningTransformer, WikiText2
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, RandomDataset
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.aggregation import MeanMetric

from lightning_topkast import TopKASTCallback
from lightning_topkast.targets import candidates

# --- modules in the styles found in the wild ----------------------------------------------------------------------


class RawMLP(L.LightningModule):
    """Research-code style: raw matrices through ``F.linear``, a 1-D gain, no nn.Linear anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 16) / 4)
        self.b1 = nn.Parameter(torch.zeros(32))
        self.w2 = nn.Parameter(torch.randn(32, 32) / 6)
        self.gain = nn.Parameter(torch.ones(32))
        self.w3 = nn.Parameter(torch.randn(4, 32) / 6)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(F.linear(x, self.w1, self.b1))
        return F.linear(F.gelu(F.linear(h, self.w2)) * self.gain, self.w3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-4)


class TiedLM(L.LightningModule):
    """Output head tied to the token embedding; a learned positional table registered first, used second (so the
    token embedding, which the forward pass uses first, stays dense)."""

    def __init__(self, vocab: int = 24, width: int = 16, context: int = 8) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, context, width))
        self.tok_emb = nn.Embedding(vocab, width)
        self.block = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok_emb.weight

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        x = self.tok_emb(tokens[:, :-1]) + self.pos_emb
        logits = self.head(x + self.block(x))
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, fused=True)


class ConvNet(L.LightningModule):
    """The MNIST tutorial shape: conv-BN-ReLU blocks, pooling, dropout, AdamW and a per-step LR schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        )
        self.classifier = nn.Linear(16 * 4 * 4, 10)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.classifier(self.features(x).flatten(1)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, fused=True)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RMSNorm(nn.Module):
    """Hand-written, as in LLaMA-style code: a 1-D scale (and never masked, whatever its shape)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class HandAttention(L.LightningModule):
    """Attention written by hand: one raw qkv matrix, an output Linear, a custom norm, a torchmetrics attribute."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(6, width)
        self.norm = RMSNorm(width)
        self.qkv = nn.Parameter(torch.randn(3 * width, width) / width**0.5)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        self.mean_loss = MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        q, k, v = F.linear(self.norm(h), self.qkv).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (self.hparams.heads, -1)).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=0.1 if self.training else 0.0)
        h = h + self.proj(attended.transpose(1, 2).flatten(2))
        return self.head(h.mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.mean_loss(loss)
        self.log("mean_loss", self.mean_loss, on_step=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01, fused=True)


class Conv1D(nn.Module):
    """GPT-2's Conv1D from Hugging Face transformers: a Linear with its weight stored transposed, used by addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2MLP(L.LightningModule):
    """GPT-2's MLP block on Conv1D layers, with a LayerNorm and GELU."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.c_fc = Conv1D(4 * width, width)
        self.c_proj = Conv1D(width, 4 * width)
        self.score = Conv1D(1, width)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        h = x + self.c_proj(F.gelu(self.c_fc(self.ln(x))))
        return F.mse_loss(self.score(h).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True)


# --- data ---------------------------------------------------------------------------------------------------------


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _classification(features: tuple[int, ...], classes: int, n: int = 16, batch_size: int = 8) -> DataLoader:
    x = torch.randn(n, *features, generator=_generator())
    y = torch.randint(0, classes, (n,), generator=_generator(1))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _boring_data() -> DataLoader:
    with torch.random.fork_rng():  # RandomDataset draws from the global generator: make it a fixed set
        torch.manual_seed(0)
        return DataLoader(RandomDataset(32, 16), batch_size=8)


def _text(path: Path, lines: int) -> None:
    """A WikiText2-format file: lines of words from a small vocabulary (tokenised with an <eos> per line)."""
    words = [f"w{i}" for i in range(20)]
    g = _generator(2)
    text = "\n".join(" ".join(words[int(i)] for i in torch.randint(0, 20, (10,), generator=g)) for _ in range(lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@dataclass
class Case:
    """A module factory, its data (None: the module's own dataloader) and Trainer arguments."""

    make: Callable[[], L.LightningModule]
    data: Callable[[], DataLoader] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    text_lines: int = 0  # > 0: write ./data/wikitext-2.txt for Lightning's demos
    masked: list[str] | None = None  # the expected targets, when written out


def _vocab() -> int:
    return WikiText2(Path("data"), download=False).vocab_size


CASES = {
    "BoringModel": Case(BoringModel, _boring_data, masked=["layer.weight"]),
    "DemoModel": Case(
        DemoModel, lambda: DataLoader(torch.randn(16, 32, generator=_generator()), batch_size=8), masked=["l1.weight"]
    ),
    "LightningTransformer": Case(lambda: LightningTransformer(vocab_size=_vocab()), text_lines=14),
    # the demo's SGD(lr=20) runs with gradient clipping, as its word-language-model origin does
    "LightningLSTM": Case(
        lambda: LightningLSTM(vocab_size=_vocab()), trainer={"gradient_clip_val": 0.25}, text_lines=70
    ),
    "RawMLP": Case(RawMLP, lambda: _classification((16,), 4), masked=["w2", "w3"]),
    "TiedLM": Case(
        TiedLM,
        lambda: DataLoader(TensorDataset(torch.randint(0, 24, (16, 9), generator=_generator())), batch_size=8),
        masked=["pos_emb", "block.1.weight", "block.3.weight"],
    ),
    "GAN": Case(
        lambda: GAN(  # two optimizers of different kinds, dropout in the discriminator
            discriminator=lambda: nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Linear(16, 1)),
            optimizers=lambda g, d: [
                torch.optim.Adam(g, lr=1e-3, betas=(0.5, 0.999)),
                torch.optim.SGD(d, lr=0.05, momentum=0.9),
            ],
        ),
        lambda: DataLoader(TensorDataset(torch.randn(16, 8, generator=_generator()) + 2), batch_size=8),
        masked=["generator.2.weight", "discriminator.0.weight", "discriminator.3.weight"],
    ),
    "ConvNet": Case(ConvNet, lambda: _classification((1, 8, 8), 10), masked=["features.3.weight", "classifier.weight"]),
    "HandAttention": Case(
        # the module's own parameters come first in registration order (as in named_parameters), but the forward
        # pass uses the input Linear first: it stays dense and qkv is masked
        HandAttention,
        lambda: _classification((5, 6), 3),
        masked=["qkv", "proj.weight", "head.weight"],
    ),
    "GPT2MLP": Case(
        GPT2MLP,
        lambda: DataLoader(
            TensorDataset(torch.randn(16, 4, 16, generator=_generator()), torch.randn(16, 4, generator=_generator(1))),
            batch_size=8,
        ),
        masked=["c_proj.weight", "score.weight"],
    ),
}


# --- the runs -----------------------------------------------------------------------------------------------------


def _fit_case(root: Path, case: Case, ckpt: Path | None = None) -> tuple[L.LightningModule, TopKASTCallback]:
    """:func:`conftest.fit` of one module of the battery for two epochs, saving (or resuming from) epoch 1."""
    model = case.make()
    topkast = TopKASTCallback()
    callbacks: list[L.Callback] = [topkast, RNGState()]
    if ckpt is None:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TopKASTCallback\\(dense_first_layer=True\\) would keep")  # one-layer models
        data = case.data() if case.data is not None else None
        fit(
            root,
            model,
            callbacks,
            data,
            max_epochs=2,
            enable_checkpointing=ckpt is None,
            ckpt_path=ckpt,
            **case.trainer,
        )
    return model, topkast


@pytest.mark.parametrize("name", list(CASES))
def test_default_callback_trains_with_exact_sets_and_resumes_bit_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    case = CASES[name]
    if case.text_lines:
        monkeypatch.chdir(tmp_path)  # the demos read ./data/wikitext-2.txt and download nothing when it exists
        _text(tmp_path / "data" / "wikitext-2.txt", case.text_lines)
    model, topkast = _fit_case(tmp_path, case)
    engine = topkast.engine
    assert engine is not None
    steps = engine.steps
    assert all(s > 0 for s in steps), steps

    # the default targets: every trainable floating 2+-D parameter outside norms but the first the forward pass uses
    names = [c.name for c in candidates(model)]
    assert topkast.forward_order, name  # uses inside a module's forward only: TiedLM adds pos_emb in training_step
    assert set(topkast.forward_order) <= set(names), name
    expected = [n for n in names if n != topkast.forward_order[0]] if len(names) > 1 else names
    assert list(engine.tensors) == (case.masked if case.masked is not None else expected)
    assert list(engine.tensors) == expected
    for t in engine.tensors.values():
        assert (t.forward_density, t.backward_density) == (0.2, 0.5)
    assert_alpha(engine)
    metrics = topkast.metrics()
    assert 0 < metrics["topkast/inference_flops_fraction"] < 1, name  # measured, and the masked tensors count

    # resume from the end of epoch 1 into a differently initialised module: everything comes from the checkpoint
    torch.manual_seed(123)
    resumed, resumed_topkast = _fit_case(tmp_path / "resumed", case, ckpt=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert resumed_topkast.engine is not None
    assert resumed_topkast.engine.steps == steps
    assert resumed_topkast.engine.refreshes == engine.refreshes
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert bit_exact(a, b), key
    for key, t in engine.tensors.items():
        got = resumed_topkast.engine.tensors[key]
        for attribute in ("theta", "forward_set", "backward_set", "ever_active"):
            assert bit_exact(getattr(got, attribute), getattr(t, attribute)), f"{key}.{attribute}"


def test_the_battery_holds_as_many_modules_as_the_readme_says() -> None:
    assert len(CASES) == guaranteed_count("modules in the styles found in the wild")


def test_a_one_layer_model_warns_once_then_trains(tmp_path: Path) -> None:
    topkast = TopKASTCallback(verbose=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            make_trainer(tmp_path, [topkast], max_steps=2).fit(BoringModel(), _boring_data())
    notes = [str(w.message) for w in seen if "would keep layer.weight dense" in str(w.message)]
    assert notes == [
        "TopKASTCallback(dense_first_layer=True) would keep layer.weight dense, and it is all there is to mask: "
        "masking it anyway. Pass dense_first_layer=False to silence this, or exclude=['layer.weight'] to train it "
        "dense."
    ]
    assert topkast.summary()[0]["why"] == "masked anyway: dense_first_layer=True would leave nothing to mask"
    assert topkast.engine is not None
    assert topkast.engine.steps == [2]  # the second model got its own masks
