"""``TopKASTCallback``: Top-KAST sparse training for any LightningModule, wired into Lightning's hooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_topkast import distributions, reporting, targets, validation
from lightning_topkast.selection import count
from lightning_topkast.state import TopKAST

Distribution = Literal["uniform", "erk", "global"]


class TopKASTCallback(Callback):
    r"""Train any LightningModule with Top-KAST (Jayakumar et al., 2020): always-sparse forward and backward passes.

    Each masked tensor runs forward on its top ``1 - forward_sparsity`` weights by magnitude (the forward set A) and
    updates its top ``1 - backward_sparsity`` (the backward set B ⊇ A); an exploration penalty keeps A from
    entrenching itself; A and B are re-selected from the dense weights at least every ``update_interval`` optimizer
    steps, and sooner when the exploring weights have outgrown A (``early_refresh``).
    The module's parameters always hold the sparse forward weights, so validation, ``state_dict`` and export see
    the sparse model with no change to the module.

    Args:
        forward_sparsity: fraction of each masked tensor that is zero in the forward pass (D = 1 - it), in [0, 1).
        backward_sparsity: fraction that receives no gradient, in [0, forward_sparsity]; equal means B = A.
        update_interval: the most optimizer steps between refreshes of A and B; 1 is the method as written.
        early_refresh: refresh a tensor before ``update_interval`` is up once the weights of B \ A that have grown
            past A's threshold of the last refresh number this fraction of |A| (at least one weight). Without it,
            long intervals let B \ A drift with no say in the loss, then enter A all at once (docs/results.md).
            None turns it off.
        exploration_penalty: λ of the penalty λ/2·Σ c·θ² (c = 1 on A, 1/D on B \ A); 0 turns it off.
        decoupled_penalty: apply the penalty to the weights after each update, scaled by the learning rate and
            outside momentum (as SparseML does), instead of through the gradient.
        distribution: how the density is spread: ``"uniform"`` (same per tensor), ``"erk"`` (Erdős–Rényi-Kernel,
            as RigL) or ``"global"`` (one top-k over all masked weights).
        sparsity_overrides: ``{name or glob: [forward_sparsity, backward_sparsity]}`` pinning chosen tensors;
            the distribution spreads the budget over the others.
        include: masked tensors are those matching any of these parameter-name globs or module class names
            (default: the weights of Linear, Conv, Embedding, MultiheadAttention and RNN layers).
        exclude: parameter-name globs or module class names never masked.
        dense_first_layer: keep the first masked tensor (registration order) dense, as RigL's setup does.
        dense_last_layer: keep the last masked tensor dense.
        log_per_tensor: also log target and actual densities of every tensor.
        strict_resume: resuming from a checkpoint without this callback's state, or with state for other tensors,
            raises; ``False`` computes fresh masks from the checkpoint's weights instead, with a warning.
        verbose: print the summary table at fit start (rank zero).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[TopKASTCallback(forward_sparsity=0.9, backward_sparsity=0.8)])
    """

    def __init__(
        self,
        forward_sparsity: float = 0.8,
        backward_sparsity: float = 0.5,
        update_interval: int = 1,
        early_refresh: float | None = 0.01,
        exploration_penalty: float = 1e-4,
        decoupled_penalty: bool = False,
        distribution: Distribution = "uniform",
        sparsity_overrides: dict[str, tuple[float, float]] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dense_first_layer: bool = True,
        dense_last_layer: bool = False,
        log_per_tensor: bool = False,
        strict_resume: bool = True,
        verbose: bool = True,
    ) -> None:
        self.forward_sparsity = validation.fraction("forward_sparsity", forward_sparsity, upper=1.0, closed=False)
        self.backward_sparsity = validation.fraction(
            "backward_sparsity", backward_sparsity, upper=self.forward_sparsity
        )
        self.update_interval = validation.positive_int("update_interval", update_interval)
        self.early_refresh = validation.optional_fraction("early_refresh", early_refresh)
        self.exploration_penalty = validation.non_negative("exploration_penalty", exploration_penalty)
        self.distribution = validation.choice("distribution", distribution, distributions.DISTRIBUTIONS)
        self.sparsity_overrides = validation.overrides(sparsity_overrides)
        self.include = validation.patterns("include", include)
        self.exclude = validation.patterns("exclude", exclude)
        self.decoupled_penalty = validation.flag("decoupled_penalty", decoupled_penalty)
        self.dense_first_layer = validation.flag("dense_first_layer", dense_first_layer)
        self.dense_last_layer = validation.flag("dense_last_layer", dense_last_layer)
        self.log_per_tensor = validation.flag("log_per_tensor", log_per_tensor)
        self.strict_resume = validation.flag("strict_resume", strict_resume)
        self.verbose = validation.flag("verbose", verbose)

        self.engine: TopKAST | None = None
        self.kept_dense: dict[str, str] = {}
        self._loaded_state: dict[str, Any] | None = None
        self._resuming = False
        # members that left A and the sizes of A at the refreshes since the last log: their ratio is the |A|-weighted
        # mean turnover (plain sums: a metric's update costs more than a small model's whole refresh)
        self._moved: list[Any] = [0, 0]
        self._layer_flops: dict[nn.Module, float] = {}
        self._flops_handles: list[RemovableHandle] = []
        self._flops_counted = False

    # --- hooks --------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            validation.check_strategy(trainer.strategy)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.engine is None or not self._owns(pl_module):
            self.engine = self._build_engine(pl_module)
            self._layer_flops, self._flops_counted = {}, False
        self._restore_loaded_state()
        self.engine.attach(trainer.optimizers)
        masked = [t.param for t in self.engine.tensors.values()]
        for hint in validation.slow_optimizers(trainer.optimizers, masked):
            rank_zero_warn(hint, category=PossibleUserWarning)
        if self.verbose:
            rank_zero_info(self.summary_table())

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._flops_counted:
            self._flops_counted = True
            self._count_flops(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._require_engine().before_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._require_engine().restore_forward_weights()
        self._stop_counting_flops()
        if trainer._logger_connector.should_update_logs:  # as LearningRateMonitor does, to skip unlogged work
            pl_module.log_dict(self.metrics(), on_step=True, on_epoch=False)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return {"config": self._config(), **self.engine.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = state_dict
        if self.engine is not None and self.engine.attached:
            self._restore_loaded_state()  # strategies that restore after setup (none supported yet) land here

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.engine is not None:
            checkpoint["state_dict"] = _with_forward_weights(checkpoint.get("state_dict", {}), self.engine)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resuming = True

    # --- public helpers -----------------------------------------------------------------------------------------

    def select_targets(self, pl_module: nn.Module) -> targets.Selection:
        """Choose the tensors to mask; override for custom filtering (return a ``targets.Selection``)."""
        return targets.select(pl_module, self.include, self.exclude, self.dense_first_layer, self.dense_last_layer)

    def summary(self) -> list[dict[str, object]]:
        """One row per masked tensor: name, shape, numel, forward/backward density and the sizes of A and B."""
        return reporting.summary_rows(self._require_engine().tensors)

    def summary_table(self) -> str:
        """The summary as the text table printed at fit start."""
        engine = self._require_engine()
        return reporting.format_table(self.summary(), self.kept_dense, engine.memory_bytes())

    def metrics(self) -> dict[str, float]:
        """The flat ``topkast/...`` metrics the callback logs; turnover covers the refreshes since the last call."""
        engine = self._require_engine()
        metrics = reporting.density_metrics(engine.tensors, self.exploration_penalty, self.log_per_tensor)
        # always logged: Lightning repeats a step metric's last value at later log steps, so an absent key would
        # show the previous refresh's turnover again; with no refresh since the last log, nothing moved.
        metrics[f"{reporting.PREFIX}/turnover"] = (
            float(self._moved[0]) / float(self._moved[1]) if float(self._moved[1]) else 0.0
        )
        self._moved = [0, 0]
        train, inference = reporting.flops_fractions(self._layer_costs())
        metrics[f"{reporting.PREFIX}/train_flops_fraction"] = train
        metrics[f"{reporting.PREFIX}/inference_flops_fraction"] = inference
        metrics[f"{reporting.PREFIX}/refreshes"] = float(engine.refreshes)
        metrics[f"{reporting.PREFIX}/early_refreshes"] = float(engine.early_refreshes)
        metrics[f"{reporting.PREFIX}/skipped_steps"] = float(engine.skipped_steps)
        return metrics

    # --- internals ----------------------------------------------------------------------------------------------

    def _build_engine(self, pl_module: LightningModule) -> TopKAST:
        selection = self.select_targets(pl_module)
        params = dict(pl_module.named_parameters())
        masked = {name: params[name] for name in selection.masked}
        pinned = self._pinned(masked)
        free = {name: tuple(p.shape) for name, p in masked.items() if name not in pinned}
        densities = distributions.forward_backward_densities(
            self.distribution,
            free,
            validation.density(self.forward_sparsity),
            validation.density(self.backward_sparsity),
        )
        densities.update({name: (validation.density(f), validation.density(b)) for name, (f, b) in pinned.items()})
        global_pool = list(free) if self.distribution == "global" else []
        self._check_model(pl_module, masked, densities, global_pool, pinned)
        self.kept_dense = selection.kept_dense
        engine = TopKAST(
            {name: masked[name] for name in selection.masked},
            densities,
            update_interval=self.update_interval,
            early_refresh=self.early_refresh,
            penalty=self.exploration_penalty,
            decoupled_penalty=self.decoupled_penalty,
            global_pool=global_pool,
        )
        engine.refresh_listeners.append(self._record_turnover)
        return engine

    def _pinned(self, masked: Mapping[str, nn.Parameter]) -> dict[str, tuple[float, float]]:
        pinned: dict[str, tuple[float, float]] = {}
        for pattern, pair in self.sparsity_overrides.items():
            hits = [name for name in masked if name == pattern or fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise ValueError(
                    f"TopKASTCallback(sparsity_overrides={{{pattern!r}: {list(pair)}}}): {pattern!r} names no masked "
                    f"tensor. Masked tensors: {', '.join(list(masked)[:8])}{', ...' if len(masked) > 8 else ''}"
                )
            pinned.update(dict.fromkeys(hits, pair))
        return pinned

    def _check_model(
        self,
        pl_module: LightningModule,
        masked: Mapping[str, nn.Parameter],
        densities: Mapping[str, tuple[float, float]],
        global_pool: list[str],
        pinned: Mapping[str, tuple[float, float]],
    ) -> None:
        modules, masked_ids = pl_module.modules(), {id(p) for p in masked.values()}
        for module in modules:
            if isinstance(module, nn.Embedding) and module.sparse and id(module.weight) in masked_ids:
                raise ValueError(
                    "TopKASTCallback masks dense gradients, but an nn.Embedding has sparse=True; build it with "
                    "sparse=False or exclude it with exclude=['Embedding']"
                )
        free = {name: tuple(p.shape) for name, p in masked.items() if name not in pinned}
        suggestion = f"Use forward_sparsity <= {distributions.max_sparsity(self.distribution, free):.4f}"
        if global_pool:
            total = sum(masked[name].numel() for name in global_pool)
            forward_density = densities[global_pool[0]][0]
            if count(forward_density, total) == 0:
                raise ValueError(
                    f"TopKASTCallback(forward_sparsity={self.forward_sparsity}, distribution='global'): the {total} "
                    f"weights ranked together would keep round({forward_density:.4g} * {total}) = 0 in the forward "
                    f"set, cutting the network off. {suggestion}."
                )
        for name, param in masked.items():
            forward_density = densities[name][0]
            if name in global_pool or count(forward_density, param.numel()) > 0:
                continue
            if name in pinned:
                pattern = next(
                    p for p in reversed(self.sparsity_overrides) if p == name or fnmatch.fnmatchcase(name, p)
                )
                argument = f"sparsity_overrides={{{pattern!r}: {list(pinned[name])}}}"
                alone = distributions.max_sparsity("uniform", {name: tuple(param.shape)})
                fix = f"Pin it at a forward sparsity <= {alone:.4f}"
            else:
                argument = f"forward_sparsity={self.forward_sparsity}"
                fix = f"{suggestion}, pin it with sparsity_overrides"
            raise ValueError(
                f"TopKASTCallback({argument}): {name} ({param.numel()} weights) would keep "
                f"round({forward_density:.4g} * {param.numel()}) = 0 weights in its forward set, cutting the layer "
                f"off. {fix}, or exclude it."
            )

    def _restore_loaded_state(self) -> None:
        engine = self._require_engine()
        state, resuming = self._loaded_state, self._resuming
        self._loaded_state, self._resuming = None, False
        if state is None:
            if resuming:
                self._resume_problem(["the checkpoint holds no TopKASTCallback state (saved without the callback?)"])
            return
        problems = engine.differences(state)
        if problems:
            self._resume_problem(problems)
            return
        engine.load_state_dict(state)

    def _resume_problem(self, problems: list[str]) -> None:
        message = "cannot resume Top-KAST from this checkpoint: " + "; ".join(problems)
        if self.strict_resume:
            raise ValueError(
                f"{message}. Pass TopKASTCallback(strict_resume=False) to compute fresh masks from the checkpoint's "
                "weights instead."
            )
        rank_zero_warn(f"{message}. strict_resume=False: masks computed afresh from the checkpoint's weights.")

    def _owns(self, pl_module: LightningModule) -> bool:
        params = dict(pl_module.named_parameters())
        return all(params.get(name) is t.param for name, t in self._require_engine().tensors.items())

    def _record_turnover(self, moved: dict[str, tuple[Any, Any]]) -> None:
        # counts are 0-dim tensors when the engine reads nothing back from the device (sync_free): they add up there
        for left, size in moved.values():
            self._moved[0] += left
            self._moved[1] += size

    def _count_flops(self, pl_module: LightningModule) -> None:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                batched = output.ndim == module.weight.ndim
                channels = module.out_features if isinstance(module, nn.Linear) else output.shape[int(batched)]
                positions = output.numel() / channels
                self._layer_flops[module] = self._layer_flops.get(module, 0.0) + 2.0 * module.weight.numel() * positions

        for module in pl_module.modules():
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                self._flops_handles.append(module.register_forward_hook(record))

    def _stop_counting_flops(self) -> None:
        for handle in self._flops_handles:
            handle.remove()
        self._flops_handles = []

    def _layer_costs(self) -> list[reporting.LayerCost]:
        by_param = {id(t.param): t for t in self._require_engine().tensors.values()}
        costs = []
        for module, flops in self._layer_flops.items():
            tensor = by_param.get(id(module.weight))
            if tensor is None:
                costs.append(reporting.LayerCost(flops, 1.0, 1.0))
            else:
                a, b = int(tensor.forward_set.sum()), int(tensor.backward_set.sum())
                costs.append(reporting.LayerCost(flops, a / tensor.numel, b / tensor.numel))
        return costs

    def _config(self) -> dict[str, Any]:
        return {
            "forward_sparsity": self.forward_sparsity,
            "backward_sparsity": self.backward_sparsity,
            "update_interval": self.update_interval,
            "early_refresh": self.early_refresh,
            "exploration_penalty": self.exploration_penalty,
            "decoupled_penalty": self.decoupled_penalty,
            "distribution": self.distribution,
            "sparsity_overrides": {k: list(v) for k, v in self.sparsity_overrides.items()},
        }

    def _release(self) -> None:
        self._stop_counting_flops()
        if self.engine is not None:
            self.engine.detach()

    def _require_engine(self) -> TopKAST:
        if self.engine is None:
            raise RuntimeError("TopKASTCallback has no masks yet: they are built at the start of Trainer.fit")
        return self.engine


def _with_forward_weights(state_dict: dict[str, Any], engine: TopKAST) -> dict[str, Any]:
    """``state_dict`` with α for parameters saved mid-step (holding θ on B), under every name that shares them."""
    pending = engine.pending_forward_weights()
    if not pending:
        return state_dict
    storage = {engine.tensors[name].param.data_ptr(): alpha for name, alpha in pending.items()}
    # entries are views of the live parameters: replace them, never write into them
    return {
        key: storage.get(value.data_ptr(), value) if isinstance(value, Tensor) else value
        for key, value in state_dict.items()
    }
