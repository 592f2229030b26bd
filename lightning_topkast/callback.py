"""``TopKASTCallback``: Top-KAST sparse training for any LightningModule, wired into Lightning's hooks.

The hooks delegate: :mod:`~lightning_topkast.planning` decides what is masked and how densely, ``TopKAST``
(:mod:`~lightning_topkast.state`) does each step, :mod:`~lightning_topkast.checkpoints` fits its state into
Lightning's checkpoints, :mod:`~lightning_topkast.reporting` measures FLOPs and turnover and formats metrics,
:mod:`~lightning_topkast.figures` draws the masks. This is the only module that imports Lightning.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from typing_extensions import override

from lightning_topkast import checkpoints, distributions, figures, planning, regularizer, reporting, targets, validation
from lightning_topkast.planning import Plan
from lightning_topkast.state import TopKAST

Distribution = Literal["uniform", "erk", "global"]

# strategies that shard parameters in ways the whole tensor's top-k does not follow (isinstance: subclasses too);
# ModelParallelStrategy with FSDP2's fully_shard is supported
_REFUSED = (FSDPStrategy, DeepSpeedStrategy)
_MEDIA_LOGGERS = (WandbLogger, TensorBoardLogger)


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
        exploration_penalty: λ of the penalty λ/2·Σ c·θ² (c = 1 on A, 1/D on B \ A); 0 turns it off. None (the
            default) chooses from the optimizer: 3e-2 when decoupled under Adam/AdamW, else 1e-4.
        decoupled_penalty: apply the penalty to the weights after each update, scaled by the learning rate and
            outside momentum (as SparseML does), instead of through the gradient. None (the default) decouples it
            under Adam and AdamW, whose normalised step makes a penalty through the gradient churn the masks
            (docs/language-models.md), and keeps it in the gradient under SGD and every other optimizer.
        distribution: how the density is spread: ``"uniform"`` (same per tensor), ``"erk"`` (Erdős–Rényi-Kernel,
            as RigL) or ``"global"`` (one top-k over all masked weights).
        sparsity_overrides: ``{name or glob: [forward_sparsity, backward_sparsity]}`` pinning chosen tensors;
            the distribution spreads the budget over the others.
        include: mask exactly the parameters matching these parameter-name globs or module class names (default:
            every floating-point parameter of 2+ dimensions outside normalisation layers).
        exclude: parameter-name globs or module class names never masked.
        dense_first_layer: keep the first tensor of the default selection dense, as RigL's setup does: the first
            the forward pass uses (found on the first training batch; the masks move before the first optimizer
            step if registration order said otherwise). Ignored with ``include``, and overruled (with a warning)
            when nothing else is left.
        dense_last_layer: keep the last tensor of the default selection (in the forward pass) dense; same rules.
        log_per_tensor: also log target and actual densities of every tensor.
        log_masks_every_n_steps: every this many optimizer steps, send W&B and TensorBoard a bar chart of the
            densities and a |θ| histogram per tensor with the A and B thresholds marked (needs matplotlib: the
            ``figures`` extra); 0 (the default) turns it off. Other loggers are skipped.
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
        exploration_penalty: float | None = None,
        decoupled_penalty: bool | None = None,
        distribution: Distribution = "uniform",
        sparsity_overrides: dict[str, tuple[float, float]] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dense_first_layer: bool = True,
        dense_last_layer: bool = False,
        log_per_tensor: bool = False,
        log_masks_every_n_steps: int = 0,
        strict_resume: bool = True,
        verbose: bool = True,
    ) -> None:
        self.forward_sparsity = validation.fraction("forward_sparsity", forward_sparsity, upper=1.0, closed=False)
        self.backward_sparsity = validation.fraction(
            "backward_sparsity", backward_sparsity, upper=self.forward_sparsity
        )
        self.update_interval = validation.positive_int("update_interval", update_interval)
        self.early_refresh = validation.optional_fraction("early_refresh", early_refresh)
        self.exploration_penalty = (
            None if exploration_penalty is None else validation.non_negative("exploration_penalty", exploration_penalty)
        )
        self.distribution = validation.choice("distribution", distribution, distributions.DISTRIBUTIONS)
        self.sparsity_overrides = validation.overrides(sparsity_overrides)
        self.include = validation.patterns("include", include)
        self.exclude = validation.patterns("exclude", exclude)
        self.decoupled_penalty = (
            None if decoupled_penalty is None else validation.flag("decoupled_penalty", decoupled_penalty)
        )
        self.dense_first_layer = validation.flag("dense_first_layer", dense_first_layer)
        self.dense_last_layer = validation.flag("dense_last_layer", dense_last_layer)
        self.log_per_tensor = validation.flag("log_per_tensor", log_per_tensor)
        self.log_masks_every_n_steps = validation.non_negative_int(
            "log_masks_every_n_steps", log_masks_every_n_steps, "optimizer steps; 0 turns it off"
        )
        if self.log_masks_every_n_steps:
            figures.require_matplotlib(f"log_masks_every_n_steps={self.log_masks_every_n_steps}")
        self.strict_resume = validation.flag("strict_resume", strict_resume)
        self.verbose = validation.flag("verbose", verbose)

        self.engine: TopKAST | None = None
        self._plan: Plan | None = None
        self._penalty = regularizer.resolve_penalty(self.exploration_penalty, self.decoupled_penalty, [])
        self._flops: reporting.FlopCounter | None = None
        self._turnover = reporting.Turnover()
        self._loaded_state: dict[str, Any] | None = None
        self._resuming = False
        self._other_keys: list[str] = []
        self._stepped = False
        self._checkpoint_path: Any = None  # where a resumed checkpoint lies: a distributed one holds sharded θ
        self._prefix = reporting.PREFIX
        self._noted: set[str] = set()
        self.forward_order: list[str] | None = None  # candidates in the order the forward pass first used them
        self._tracer: targets.ForwardOrder | None = None
        self._state_key: tuple[tuple[Any, ...], str] | None = None

    @property
    @override
    def state_key(self) -> str:
        # the targets identify an instance: several callbacks with disjoint targets keep their own state. Lightning
        # reads the key at every hook call (its profiler's action names): built once per value of the targets
        targets_now = (self.include, self.exclude, self.dense_first_layer, self.dense_last_layer)
        if self._state_key is None or self._state_key[0] != targets_now:  # by value: a list edited in place counts
            key = self._generate_state_key(
                include=self.include,
                exclude=self.exclude,
                dense_first_layer=self.dense_first_layer,
                dense_last_layer=self.dense_last_layer,
            )
            copied = tuple(list(v) if isinstance(v, list) else v for v in targets_now)
            self._state_key = (copied, key)
        return self._state_key[1]

    # --- hooks --------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning restores a checkpoint after setup: what validate/test/predict loaded before is not a fit to resume
        self._loaded_state, self._resuming, self._other_keys = None, False, []
        if stage == "fit":
            validation.check_strategy(trainer.strategy, _REFUSED, ModelParallelStrategy)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the module's own setup/configure_model and the checkpoint's weights: plan on the model as it trains
        self._prefix = _prefix(trainer, self)
        if self._loaded_state is not None and self._loaded_state.get("forward_order") is not None:
            self.forward_order = list(self._loaded_state["forward_order"])  # as the checkpointed run found it
        plan = self.plan(pl_module)
        validation.check_sharded_plan(plan.parameters, self.distribution)
        engine = self._start(trainer, plan)
        for hint in validation.slow_optimizers(trainer.optimizers, [t.param for t in engine.tensors.values()]):
            rank_zero_warn(hint, category=PossibleUserWarning)
        self._log_hyperparameters(trainer, pl_module)
        self._tracer = self._forward_tracer(trainer, pl_module)
        if self.verbose:
            rank_zero_info(self.summary_table())

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._stepped = False
        if self._tracer is not None and not self._tracer.order:
            self._tracer.start()  # the first batch's forward pass says which layer is first and last
        if not self._require_engine().sharded:  # FSDP2 runs on unsharded copies: masked weights are not found
            self._require_flops().start()

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._stop_tracing()
        self._require_flops().pause()  # FLOPs of the forward only; a training step counts as three of them

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._tracer is not None:
            self._follow_forward_order(trainer, pl_module)  # the first point after the forward pass and its backward
        self._require_flops().resume()  # manual optimization may run more forward passes in the batch

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._stepped = True
        if self._tracer is not None:
            self._follow_forward_order(trainer, pl_module)
        self._require_engine().before_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_tracing()
        self._require_engine().restore_forward_weights()
        self._require_flops().finish()
        if self._should_log(trainer):
            pl_module.log_dict(self.metrics(), on_step=True, on_epoch=False)
            self._turnover.reset()
        if self._should_draw(trainer):
            self._log_mask_images(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop_tracing()
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return {"config": self._arguments(), "forward_order": self.forward_order, **self.engine.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = state_dict
        if self.engine is not None and self.engine.attached:
            self._restore_loaded_state()  # strategies that restore after setup (ModelParallelStrategy) land here

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.engine is not None:
            checkpoints.prepare_to_save(checkpoint, self.engine, self.state_key)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resuming, self._checkpoint_path = True, trainer.ckpt_path
        name = type(self).__qualname__
        self._other_keys = [
            k for k in checkpoint.get("callbacks", {}) if str(k).startswith(name) and k != self.state_key
        ]
        if self.engine is not None and self.engine.attached and self.state_key not in checkpoint.get("callbacks", {}):
            self._restore_loaded_state()  # restored after setup, and no state to restore: say so now

    # --- public helpers -----------------------------------------------------------------------------------------

    @property
    def config(self) -> planning.Config:
        """The arguments that decide targets and densities."""
        return planning.Config(
            forward_sparsity=self.forward_sparsity,
            backward_sparsity=self.backward_sparsity,
            distribution=self.distribution,
            sparsity_overrides=self.sparsity_overrides,
            include=self.include,
            exclude=self.exclude,
            dense_first_layer=self.dense_first_layer,
            dense_last_layer=self.dense_last_layer,
        )

    def select_targets(self, pl_module: nn.Module) -> targets.Selection:
        """Choose the tensors to mask; override for custom filtering (return a ``lightning_topkast.Selection``)."""
        return targets.select(
            pl_module, self.include, self.exclude, self.dense_first_layer, self.dense_last_layer, self.forward_order
        )

    def plan(self, pl_module: nn.Module) -> Plan:
        """What this callback would mask in ``pl_module`` and how densely, without training; raises on bad config."""
        return planning.plan(pl_module, self.config, self.select_targets(pl_module))

    @property
    def kept_dense(self) -> dict[str, str]:
        """The candidates the last plan kept dense, each with the reason."""
        return dict(self._plan.selection.kept_dense) if self._plan is not None else {}

    def summary(self) -> list[dict[str, object]]:
        """One row per candidate: name, shape, numel, whether masked, densities, |A|, |B| and why.

        Under sharding a collective, as :meth:`metrics`: the sets' sizes are summed over the ranks.
        """
        engine = self._require_engine()
        sizes = engine.summed_over_shards(reporting.set_sizes(engine.tensors, 0.0))
        return reporting.summary_rows(engine.tensors, self._require_plan(), sizes)

    def summary_table(self) -> str:
        """The summary as the text table printed at fit start."""
        engine, never_masked = self._require_engine(), self._require_plan().selection.never_masked
        return reporting.format_table(self.summary(), never_masked, engine.memory_bytes())

    def metrics(self) -> dict[str, float]:
        """The flat ``topkast/...`` metrics as they stand; turnover covers the refreshes since the last log.

        A query: calling it changes nothing (the callback starts a new turnover window after each log). Under sharding
        a collective: the counts are summed over the ranks, so every rank calls it (the callback does, when it logs).
        """
        engine, prefix = self._require_engine(), self._prefix
        sizes = engine.summed_over_shards(reporting.set_sizes(engine.tensors, engine.penalty))
        metrics = reporting.density_metrics(engine.tensors, engine.penalty, self.log_per_tensor, prefix, sizes)
        # always logged: Lightning repeats a step metric's last value at later log steps, so an absent key would
        # show the previous refresh's turnover again; with no refresh since the last log, nothing moved.
        metrics[f"{prefix}/turnover"] = self._turnover.compute()
        train, inference = self._flops_fractions()
        metrics[f"{prefix}/train_flops_fraction"] = train
        metrics[f"{prefix}/inference_flops_fraction"] = inference
        metrics[f"{prefix}/refreshes"] = float(engine.refreshes)
        metrics[f"{prefix}/early_refreshes"] = float(engine.early_refreshes)
        metrics[f"{prefix}/skipped_steps"] = float(engine.skipped_steps)
        return metrics

    def hyperparameters(self) -> dict[str, Any]:
        """The resolved configuration that goes to every logger's hyperparameters (W&B's run config, hparams.yaml)."""
        engine = self._require_engine()
        numel = sum(t.total for t in engine.tensors.values())
        return {
            **self._arguments(),
            # as resolved for this fit's optimizers (None in the arguments: chosen from the optimizer)
            "exploration_penalty": engine.penalty,
            "decoupled_penalty": engine.decoupled_penalty,
            "log_masks_every_n_steps": self.log_masks_every_n_steps,
            "masked_tensors": len(engine.tensors),
            "masked_weights": numel,
            "forward_density": sum(t.forward_density * t.total for t in engine.tensors.values()) / numel,
            "backward_density": sum(t.backward_density * t.total for t in engine.tensors.values()) / numel,
        }

    # --- internals ----------------------------------------------------------------------------------------------

    def _use(self, plan: Plan) -> None:
        """Build the engine for ``plan``, or keep the current one if it masks the same, untouched tensors."""
        for note in plan.selection.notes:
            if note not in self._noted:
                self._noted.add(note)
                rank_zero_warn(note)
        engine, self._plan = self.engine, plan
        if engine is not None and _same_tensors(engine, plan):
            engine.follow_parameters()  # a module the last fit left on the CPU is back on its GPU
            if checkpoints.holds_forward_weights(engine):
                return
            rank_zero_info(
                "TopKASTCallback: the masked weights changed since the last fit (a checkpoint loaded by "
                "validate/test/predict, or load_state_dict): masks computed afresh from them."
            )
        self.engine = self._build_engine(plan)
        self._flops = reporting.FlopCounter({name: t.param for name, t in self.engine.tensors.items()})
        self._turnover.reset()

    def _build_engine(self, plan: Plan) -> TopKAST:
        # the one place the engine is built
        engine = TopKAST(
            plan.parameters,
            plan.densities,
            update_interval=self.update_interval,
            early_refresh=self.early_refresh,
            penalty=self._penalty[0],
            decoupled_penalty=self._penalty[1],
            global_pool=plan.global_pool,
        )
        engine.refresh_listeners.append(self._turnover.update)
        return engine

    def _forward_tracer(self, trainer: Trainer, pl_module: LightningModule) -> targets.ForwardOrder | None:
        """A recorder of the first forward pass, when first and last are still to be found in it."""
        switches = self.dense_first_layer or self.dense_last_layer
        if self.forward_order is not None or self.include is not None or not switches:
            return None  # known (a checkpoint or an earlier fit), or the user's word
        if any(self._require_engine().steps):
            return None  # resumed from a run that stepped without an order: it trained with registration order
        if self._require_engine().sharded or isinstance(trainer.strategy, ModelParallelStrategy):
            return None  # the forward runs on gathered copies the recorder cannot name; restored after setup
        return targets.ForwardOrder(pl_module)

    def _stop_tracing(self) -> None:
        if self._tracer is not None:
            self._tracer.stop()

    def _follow_forward_order(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep dense the layers first and last in the forward pass, moving the masks if registration order differs.

        Once, after the first backward pass and before the first optimizer step; the order is checkpointed. Not
        earlier: writing the weights between the forward and the backward pass would invalidate what autograd saved.
        """
        tracer, self._tracer = self._tracer, None
        assert tracer is not None
        tracer.stop()
        self.forward_order = tracer.order
        before, plan = self._require_plan(), self.plan(pl_module)
        if list(plan.parameters) == list(before.parameters):
            self._plan = plan  # the same tensors; the reasons now name the forward pass
            return
        moved = sorted(set(before.parameters) ^ set(plan.parameters))
        rank_zero_info(
            f"TopKASTCallback: the forward pass orders the layers differently from their registration; masks "
            f"moved before the first step ({', '.join(moved)}): kept dense now {plan.selection.kept_dense}"
        )
        engine = self._require_engine()
        self._require_flops().pause()
        in_progress = engine.steps_in_progress()  # this hook runs inside optimizer.step(), in Lightning's closure
        engine.detach()
        with torch.no_grad():
            for tensor in engine.tensors.values():
                tensor.local_param.copy_(tensor.theta)  # the weights as they are, before the new plan masks them
        self.engine = None
        self._start(trainer, plan, in_progress)
        self._log_hyperparameters(trainer, pl_module)

    def _start(self, trainer: Trainer, plan: Plan, steps_in_progress: list[int] | None = None) -> TopKAST:
        """The engine for ``plan``, built or kept, restored from a loaded checkpoint, attached to the optimizers.

        The one path of the fit's start and of the forward-order re-plan.
        """
        self._check_disjoint(trainer, plan)
        self._penalty = self._resolve_penalty(trainer.optimizers, plan)
        self._use(plan)
        self._restore_loaded_state()  # nothing to restore once the fit's start has taken it
        engine = self._require_engine()
        engine.penalty, engine.decoupled_penalty = self._penalty  # a kept engine follows this fit's optimizers too
        engine.attach(trainer.optimizers, steps_in_progress)
        return engine

    def _check_disjoint(self, trainer: Trainer, plan: Plan) -> None:
        mine = {id(p): name for name, p in plan.parameters.items()}
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, TopKASTCallback) or other.engine is None:
                continue
            shared = [mine[id(t.param)] for t in other.engine.tensors.values() if id(t.param) in mine]
            if shared:
                raise ValueError(
                    f"{self._targets_repr()} and {other._targets_repr()} both mask {', '.join(shared)}: a tensor "
                    "has one forward set. Give each callback its own tensors with include=[...] / exclude=[...]."
                )

    def _targets_repr(self) -> str:
        return f"TopKASTCallback(include={self.include!r}, exclude={self.exclude!r})"

    def _restore_loaded_state(self) -> None:
        engine = self._require_engine()
        state, resuming = self._loaded_state, self._resuming
        self._loaded_state, self._resuming = None, False
        if state is None:
            if resuming:
                saved = "saved without the callback?"
                if self._other_keys:
                    saved = (
                        f"it holds {', '.join(self._other_keys)}, from a callback with other targets; pass the same "
                        "include, exclude, dense_first_layer and dense_last_layer"
                    )
                self._resume_problem([f"the checkpoint holds no state for {self.state_key} ({saved})"])
            return
        problems = engine.differences(state)
        if problems:
            self._resume_problem(problems)
            return
        path, self._checkpoint_path = self._checkpoint_path, None
        engine.load_state_dict(checkpoints.load_saved_apart(state, engine.tensors, path, self.state_key))

    def _resume_problem(self, problems: list[str]) -> None:
        message = "cannot resume Top-KAST from this checkpoint: " + "; ".join(problems)
        if self.strict_resume:
            raise ValueError(
                f"{message}. Pass TopKASTCallback(strict_resume=False) to compute fresh masks from the checkpoint's "
                "weights instead."
            )
        rank_zero_warn(f"{message}. strict_resume=False: masks computed afresh from the checkpoint's weights.")
        engine = self._require_engine()
        if engine.attached:  # restored after setup (ModelParallelStrategy): the engine saw the weights before the load
            engine.start_from_parameters()

    def _should_log(self, trainer: Trainer) -> bool:
        """At least wherever Lightning writes step metrics, judged from public Trainer attributes only.

        Lightning writes after batch k when (k + 1) % log_every_n_steps == 0, k counting the batches that stepped
        before this one: after an optimizer step that is ``global_step``, inside an accumulation window
        ``global_step + 1``. With several optimizers ``global_step`` runs faster, so this logs more often, never less.
        """
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        if every <= 0:
            return False
        return (trainer.global_step + (0 if self._stepped else 1)) % every == 0 or trainer.should_stop

    def _should_draw(self, trainer: Trainer) -> bool:
        every = self.log_masks_every_n_steps
        if not every or not self._stepped or trainer.global_step % every or not trainer.is_global_zero:
            return False
        return any(isinstance(logger, _MEDIA_LOGGERS) for logger in trainer.loggers)

    def _log_mask_images(self, trainer: Trainer) -> None:
        images = figures.mask_images(self._require_engine().tensors, trainer.global_step, self._prefix)
        step = trainer.global_step - 1  # where Lightning logs this batch's scalars
        for logger in trainer.loggers:
            for key, image in images.items():
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=key, images=[image], step=step)
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")

    def _log_hyperparameters(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before Lightning logs the module's hyperparameters and saves hparams.yaml, right after on_fit_start
        params = {self._prefix: self.hyperparameters()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # TensorBoard's HParams tab reads the first hparams summary of a run: send the module's with ours
                logger.log_hyperparams({**_lightning_hparams(trainer, pl_module), **params})
            else:
                logger.log_hyperparams(params)

    def _flops_fractions(self) -> tuple[float, float]:
        flops = self._require_flops()
        if not flops.finished:
            return float("nan"), float("nan")  # measured on the first training batch
        densities = reporting.set_densities(self._require_engine().tensors)
        return reporting.flops_fractions(flops.masked, flops.dense, densities)

    def _arguments(self) -> dict[str, Any]:
        return {
            "forward_sparsity": self.forward_sparsity,
            "backward_sparsity": self.backward_sparsity,
            "update_interval": self.update_interval,
            "early_refresh": self.early_refresh,
            "exploration_penalty": self.exploration_penalty,
            "decoupled_penalty": self.decoupled_penalty,
            "distribution": self.distribution,
            "sparsity_overrides": {k: list(v) for k, v in self.sparsity_overrides.items()},
            "include": self.include,
            "exclude": self.exclude,
            "dense_first_layer": self.dense_first_layer,
            "dense_last_layer": self.dense_last_layer,
        }

    def _resolve_penalty(self, optimizers: list[Any], plan: Plan) -> tuple[float, bool]:
        masked = {id(p) for p in plan.parameters.values()}
        stepping = [o for o in optimizers if any(id(p) in masked for g in o.param_groups for p in g["params"])]
        return regularizer.resolve_penalty(self.exploration_penalty, self.decoupled_penalty, stepping)

    def _release(self) -> None:
        if self._flops is not None:
            self._flops.pause()
        if self.engine is not None:
            self.engine.detach()
            self.engine.follow_parameters()  # Lightning's teardown moved the module to the CPU: free the GPU too

    def _require_engine(self) -> TopKAST:
        if self.engine is None:
            raise RuntimeError("TopKASTCallback has no masks yet: they are built at the start of Trainer.fit")
        return self.engine

    def _require_flops(self) -> reporting.FlopCounter:
        self._require_engine()
        assert self._flops is not None  # built with the engine
        return self._flops

    def _require_plan(self) -> Plan:
        self._require_engine()
        assert self._plan is not None  # set with the engine
        return self._plan


def _prefix(trainer: Trainer, callback: TopKASTCallback) -> str:
    """``topkast`` for the first TopKASTCallback of the Trainer, ``topkast_1``, ``topkast_2`` for the next ones."""
    instances = [cb for cb in trainer.callbacks if isinstance(cb, TopKASTCallback)]  # type: ignore[attr-defined]
    index = next(i for i, cb in enumerate(instances) if cb is callback)
    return reporting.PREFIX if index == 0 else f"{reporting.PREFIX}_{index}"


def _lightning_hparams(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """The hyperparameters Lightning logs after ``on_fit_start``: the module's, then the datamodule's."""
    hparams = dict(pl_module.hparams_initial)
    if trainer.datamodule is not None:  # type: ignore[attr-defined]
        hparams.update(trainer.datamodule.hparams_initial)  # type: ignore[attr-defined]
    hparams.pop("_class_path", None)  # LightningCLI's, which Lightning does not log either
    return hparams


def _same_tensors(engine: TopKAST, plan: Plan) -> bool:
    if list(engine.tensors) != list(plan.parameters):
        return False
    pool = set(plan.global_pool)
    return all(
        t.param is plan.parameters[name]
        and (t.forward_density, t.backward_density) == plan.densities[name]
        and t.in_global_pool == (name in pool)
        for name, t in engine.tensors.items()
    )
