"""Models, LightningModules and sparse-training methods shared by the benchmarks.

Every method is a list of Lightning callbacks (:func:`method_callbacks`), so all of them train the same
LightningModule in the same ``Trainer`` and differ only in what the callbacks do:

- ``dense``: nothing.
- ``topkast``: :class:`lightning_topkast.TopKASTCallback`.
- ``static``: a fixed random mask at the forward density; gradients are masked so pruned weights stay zero.
- ``pruning``: Lightning's ``ModelPruning`` (per-tensor magnitude pruning, L1) on Zhu & Gupta's cubic schedule,
  dense at the start and at the target sparsity from 75% of training on.
- ``rigl``: rigl-torch's ``RigLScheduler`` (Evci et al. 2020): random mask, drop by magnitude and regrow by
  gradient every 100 steps until 75% of training.

All methods mask the same tensors at the same per-tensor density: the ones ``TopKASTCallback`` masks by default
(weights of Linear, Conv and Embedding layers, the first of them kept dense), chosen by :func:`masked_weights`.
"""

from __future__ import annotations

import math
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_topkast import TopKASTCallback, targets

METHODS = ("dense", "topkast", "static", "pruning", "rigl")
# Top-KAST's forward/backward sparsity pairs of issue 3 (90/80 is the paper's ImageNet setting)
TOPKAST_BACKWARD = {0.8: 0.5, 0.9: 0.8, 0.95: 0.9}
# where the methods that change their masks stop: RigL's T_end and the end of ModelPruning's schedule
SCHEDULE_END = 0.75


# --- models -----------------------------------------------------------------------------------------------------


class ImageCNN(nn.Module):
    """A small CNN for 28x28 grey images: two 3x3 conv + max-pool stages, then a hidden fully connected layer.

    With the defaults (16, 32 channels, hidden 256) it has 408,720 weights, 98% of them in ``fc1``; the first conv
    (144 weights) is the layer kept dense.
    """

    def __init__(self, channels: Sequence[int] = (16, 32), hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al., 1998): a 784-300-100-10 MLP on flattened 28x28 images, 266,200 weights.

    The sparse-training literature's smallest benchmark; its first layer (235,200 weights) is the one kept dense.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class Block(nn.Module):
    """A pre-norm Transformer block: causal self-attention and a GELU MLP, each as plain ``nn.Linear`` layers."""

    def __init__(self, d_model: int, n_heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ff_mult * d_model)
        self.fc2 = nn.Linear(ff_mult * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """A GPT-style character language model (nanoGPT's layout, no dropout, untied output layer).

    Attention projections are ``nn.Linear`` rather than ``nn.MultiheadAttention`` so that every method, rigl-torch
    included, sees the same weight tensors. The position embedding is a bare parameter, which no method masks;
    the token embedding is the first layer, kept dense; the output layer is masked.
    """

    def __init__(self, vocab: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.apply(_gpt_init)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _gpt_init(module: nn.Module) -> None:
    # GPT-2's initialisation (as nanoGPT): N(0, 0.02) weights, zero biases
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# --- LightningModules ---------------------------------------------------------------------------------------------


def warmup_cosine(total_steps: int, warmup: float = 0.05) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    warm = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return factor


class ImageClassifier(L.LightningModule):
    """Fashion-MNIST classifier (``arch``: ``"cnn"`` or ``"lenet"``): SGD with Nesterov momentum and weight decay,
    warm-up then cosine learning rate."""

    def __init__(
        self,
        total_steps: int,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        channels: Sequence[int] = (16, 32),
        hidden: int = 256,
        arch: str = "cnn",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = LeNet300100() if arch == "lenet" else ImageCNN(channels, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(hp.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
        """Accuracy (fraction correct) of the model as it is, in fp32."""
        self.eval()
        correct = sum(
            int((self(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(y), batch_size)
        )
        return correct / len(y)


class CharLM(L.LightningModule):
    """Character language model: AdamW, warm-up then cosine learning rate; the metric is bits per character."""

    dense_parameters = ("model.pos_emb",)  # a bare parameter: no peer masks it, so neither does Top-KAST here

    def __init__(
        self,
        vocab: int,
        total_steps: int,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        context: int = 64,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = CharTransformer(vocab, d_model, n_layers, n_heads, context)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        ids = batch[0] if isinstance(batch, list | tuple) else batch  # windows of context + 1 ids, or a 1-tuple
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=hp.lr, betas=(0.9, 0.95), weight_decay=hp.weight_decay, fused=hp.fused
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(hp.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def evaluate(self, ids: Tensor, batch_size: int = 256) -> float:
        """Bits per character on consecutive non-overlapping windows of ``context + 1`` characters, in fp32."""
        self.eval()
        windows = sequence_windows(ids, self.hparams.context)
        total = 0.0
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            logits = self(batch[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        return total / (windows.shape[0] * (windows.shape[1] - 1)) / math.log(2)


def sequence_windows(ids: Tensor, context: int) -> Tensor:
    """Non-overlapping windows of ``context + 1`` ids (input and shifted target), ``(n, context + 1)``."""
    n = (len(ids) - 1) // context
    starts = torch.arange(n) * context
    return ids[starts[:, None] + torch.arange(context + 1)]


# --- methods ------------------------------------------------------------------------------------------------------


def masked_weights(pl_module: nn.Module) -> tuple[str, list[str]]:
    """The weight kept dense (the first layer) and the names of the weights every method masks.

    ``TopKASTCallback``'s default selection, less what the module lists in ``dense_parameters`` (the LM's position
    embedding, a bare parameter that only Top-KAST could mask), so that the methods differ only in how they choose
    masks.
    """
    exclude = list(getattr(pl_module, "dense_parameters", ())) or None
    selection = targets.select(pl_module, exclude=exclude, dense_first_layer=True)
    (first,) = [name for name, why in selection.kept_dense.items() if why.startswith("first layer")]
    return first, selection.masked


class BenchmarkTopKAST(TopKASTCallback):
    """``TopKASTCallback`` masking exactly :func:`masked_weights`, through its one method for custom selection."""

    @override
    def select_targets(self, pl_module: nn.Module) -> targets.Selection:
        first, names = masked_weights(pl_module)
        return targets.Selection(names, {first: "first layer, as every benchmark method keeps it"})


def _owner(pl_module: nn.Module, name: str) -> nn.Module:
    module_name, attribute = name.rsplit(".", 1)
    if attribute != "weight":
        raise ValueError(f"benchmark methods mask only `.weight` tensors, got {name}")
    return pl_module.get_submodule(module_name)


class StaticSparsity(Callback):
    """A fixed random mask with ``round(density * n)`` ones per masked tensor, drawn at fit start.

    Pruned weights are zeroed once and their gradients masked before each optimizer step; the weights are masked
    again after each step so that nothing (weight decay, momentum) can move them off zero.
    """

    def __init__(self, sparsity: float) -> None:
        self.sparsity = sparsity
        self.masks: dict[str, Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}

    def targets(self, pl_module: L.LightningModule) -> list[str]:
        """The tensors masked: those every benchmark method masks."""
        return masked_weights(pl_module)[1]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        for name in self.targets(pl_module):
            param = params[name]
            keep = round((1 - self.sparsity) * param.numel())
            flat = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
            flat[torch.randperm(param.numel(), device=param.device)[:keep]] = 1
            self.masks[name], self.params[name] = flat.view_as(param), param
        self._apply()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.mul_(self.masks[name])

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        for name, param in self.params.items():
            param.mul_(self.masks[name])


def cubic_sparsity(step: float, final: float) -> float:
    """Zhu & Gupta (2017)'s gradual pruning schedule: sparsity after a fraction ``step`` in [0, 1] of the schedule."""
    return final * (1 - (1 - min(max(step, 0.0), 1.0)) ** 3)


class GradualPruning(ModelPruning):
    """Lightning's ``ModelPruning``, per-tensor L1, on a cubic schedule reaching ``sparsity`` after ``prune_epochs``.

    It prunes at the end of each training epoch (make the epochs short with ``limit_train_batches``); ModelPruning's
    ``amount`` is the fraction of the *remaining* weights to prune, so the cubic schedule's cumulative sparsity is
    converted into that fraction epoch by epoch.
    """

    def __init__(self, sparsity: float, prune_epochs: int) -> None:
        self.sparsity, self.prune_epochs = sparsity, prune_epochs
        super().__init__(
            pruning_fn="l1_unstructured",
            amount=self.amount_at,
            use_global_unstructured=False,  # per tensor, as the other methods' uniform distribution
            make_pruning_permanent=True,
            verbose=0,
        )

    def amount_at(self, epoch: int) -> float:
        """Fraction of the remaining weights to prune at the end of ``epoch`` (0-based)."""
        if epoch >= self.prune_epochs:
            return 0.0
        before = cubic_sparsity(epoch / self.prune_epochs, self.sparsity)
        after = cubic_sparsity((epoch + 1) / self.prune_epochs, self.sparsity)
        return 1 - (1 - after) / (1 - before)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _, names = masked_weights(pl_module)
        self._parameters_to_prune = [(_owner(pl_module, name), "weight") for name in names]
        super().setup(trainer, pl_module, stage)


def _import_rigl() -> Any:
    # rigl-torch imports torchvision only for an isinstance check against two ResNet block classes; torchvision's
    # PyPI wheels do not load against this CPU torch build, so give it empty stand-ins (no model here is a ResNet).
    if "torchvision" not in sys.modules:
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.Bottleneck = type("Bottleneck", (), {})
        resnet.BasicBlock = type("BasicBlock", (), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        torchvision = types.ModuleType("torchvision")
        torchvision.models = models
        sys.modules.update(
            {"torchvision": torchvision, "torchvision.models": models, "torchvision.models.resnet": resnet}
        )
    from rigl_torch.RigL import RigLScheduler

    return RigLScheduler


class RigL(Callback):
    """rigl-torch's ``RigLScheduler`` driven from a Lightning ``Trainer``, following rigl-torch's training loop.

    rigl-torch finds its layers by walking ``model._modules`` and would also mask LayerNorm weights and miss
    fused attention weights, so it is handed a ``ModuleList`` of exactly the owners of :func:`masked_weights`,
    the dense first layer first (its uniform distribution keeps the first layer dense).

    The scheduler replaces ``optimizer.step`` with a function of no arguments, while Lightning calls
    ``optimizer.step(closure=...)``; the step is wrapped once more so the closure (forward and backward) runs first,
    then ``if scheduler(): step()``, exactly rigl-torch's documented loop. On a mask-update step the scheduler
    returns False and the optimizer step is skipped, as in rigl-torch.
    """

    def __init__(self, sparsity: float, total_steps: int, delta: int = 100, alpha: float = 0.3) -> None:
        self.sparsity, self.total_steps, self.delta, self.alpha = sparsity, total_steps, delta, alpha
        self.scheduler: Any = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        first, names = masked_weights(pl_module)
        layers = nn.ModuleList(_owner(pl_module, name) for name in [first, *names])
        (optimizer,) = trainer.optimizers
        self.scheduler = _import_rigl()(
            layers,
            optimizer,
            dense_allocation=1 - self.sparsity,
            T_end=int(SCHEDULE_END * self.total_steps),
            ignore_linear_layers=False,  # else every Linear layer stays dense
            delta=self.delta,
            alpha=self.alpha,
        )
        rigl_step, scheduler = optimizer.step, self.scheduler

        def step(closure: Callable[[], Any] | None = None) -> Any:
            loss = closure() if closure is not None else None
            if scheduler():
                rigl_step()
            return loss

        optimizer.step = step


def method_callbacks(
    name: str,
    sparsity: float = 0.0,
    *,
    total_steps: int,
    prune_epochs: int = 1,
    backward_sparsity: float | None = None,
    update_interval: int = 1,
    early_refresh: float | None = None,
    exploration_penalty: float | None = None,
    rigl_delta: int = 100,
) -> list[Callback]:
    """The callbacks that make a ``Trainer`` train with method ``name`` at forward ``sparsity``.

    Args:
        name: one of :data:`METHODS`.
        sparsity: fraction of each masked tensor that is zero (in the forward pass, for Top-KAST); ignored by dense.
        total_steps: the run's optimizer steps (RigL stops updating its mask at 75% of them).
        prune_epochs: training epochs over which ``pruning`` reaches ``sparsity`` (it prunes at epoch ends).
        backward_sparsity: Top-KAST's backward sparsity; by default the pair in :data:`TOPKAST_BACKWARD` (80/50,
            90/80, 95/90), else ``sparsity`` (B = A).
        update_interval: Top-KAST's most optimizer steps between refreshes.
        early_refresh: Top-KAST's early-refresh fraction (None: refresh at the interval only).
        exploration_penalty: Top-KAST's λ (None: the callback's optimizer-aware default).
        rigl_delta: RigL's steps between mask updates.
    """
    if name == "dense":
        return []
    if name == "topkast":
        backward = TOPKAST_BACKWARD.get(sparsity, sparsity) if backward_sparsity is None else backward_sparsity
        return [
            BenchmarkTopKAST(
                forward_sparsity=sparsity,
                backward_sparsity=backward,
                update_interval=update_interval,
                early_refresh=early_refresh,
                exploration_penalty=exploration_penalty,
                verbose=False,
            )
        ]
    if name == "static":
        return [StaticSparsity(sparsity)]
    if name == "pruning":
        return [GradualPruning(sparsity, prune_epochs)]
    if name == "rigl":
        return [RigL(sparsity, total_steps, delta=rigl_delta)]
    raise ValueError(f"method_callbacks(name={name!r}): unknown method; use one of {', '.join(METHODS)}")


class ClipGradients(Callback):
    """Gradient clipping by global norm before the optimizer step, after the sparse methods have masked the gradient.

    Lightning refuses ``gradient_clip_val`` with a fused optimizer under mixed precision (it cannot know that
    bf16 needs no unscaling), so the study clips here: listed after the method's callbacks, this runs where
    Lightning's own clipping would, after their ``on_before_optimizer_step``.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), self.max_norm)


def masked_density(pl_module: nn.Module) -> float:
    """Fraction of non-zero entries over all masked tensors, read from the model's parameters as they are."""
    _, names = masked_weights(pl_module)
    params = dict(pl_module.named_parameters())
    nonzero = sum(int(params[n].count_nonzero()) for n in names)
    return nonzero / sum(params[n].numel() for n in names)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Wall time of ``repeats`` calls of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def provenance() -> dict[str, Any]:
    """What produced a result: versions, machine, threads, the git commit (and whether the tree was dirty), the
    command line, the time. Every JSON the benchmarks write carries it."""
    import datetime
    import os
    import platform
    import subprocess
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    return {
        # a copy of the tree without its .git (a GPU machine's) names the commit it was copied from
        "commit": commit or os.environ.get("BENCHMARK_COMMIT", ""),
        # the results folder is what the benchmarks write: one script's output must not mark the next one's code dirty
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"))
        if commit
        else None,
        "argv": sys.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {
            name: version(name)
            for name in ("torch", "lightning", "lightning-topkast", "rigl-torch", "numpy", "torchmetrics")
        },
    }


def write_json(path: Path, record: dict[str, Any], started: dict[str, Any]) -> None:
    """``record`` with the :func:`provenance` taken when the run ``started``, as indented JSON at ``path``."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "provenance": started}, indent=1))
    print(f"json: {path}")


def new_figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure and its axes (a list when ``columns`` > 1) on the file-only backend (runs are headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=(width, height), dpi=110)
    return fig, list(axes) if columns > 1 else axes


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path`` (folders made as needed), close it and say where it went."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"plot: {path}")
