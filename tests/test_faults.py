"""Non-finite gradients in real ``Trainer.fit`` runs: under a GradScaler (fp16), under bf16-mixed, and outside B.

A ``Probe`` callback, listed after ``TopKASTCallback``, writes NaN or inf into chosen gradient entries in
``on_after_backward`` (after backward, before AMP unscaling and before the callback masks the gradient) on chosen
batches, and snapshots the whole training state (every module parameter, θ, A, B, every optimizer state tensor) at
the start and the end of every batch. Faulty steps injected by this file: 8 by the GradScaler test (2 x 4 runs), 3 by
the bf16 tests (1 x 3 runs), 6 by the outside-B test (3 x 2 runs, each writing all 152 entries outside B of both
masked tensors) and 1 by the GradScaler outside-B test: 18 in all.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import pytest
import torch
from conftest import MLP, bit_exact, engine_of, fit, make_loader
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor

from lightning_topkast import TopKASTCallback
from lightning_topkast.state import MaskedTensor

MASKED = ["net.2.weight", "net.4.weight"]  # the MLP's first Linear stays dense (dense_first_layer=True)
BATCHES = 8  # make_loader(n=64, batch_size=8), one epoch
NON_FINITE = (math.nan, math.inf, -math.inf)

Region = Literal["A", "B\\A", "outside B"]
State = dict[str, dict[str, Tensor]]


@dataclass(frozen=True)
class Fault:
    """Values written into a masked gradient: into its first entry of ``region``, or every entry when ``fill``."""

    region: Region
    values: tuple[float, ...]
    fill: bool = False
    tensors: tuple[str, ...] = ("net.2.weight",)


@dataclass
class Snapshot:
    """The full training state at one point: what a skipped step must leave untouched."""

    params: dict[str, Tensor]
    theta: dict[str, Tensor]
    forward_set: dict[str, Tensor]
    backward_set: dict[str, Tensor]
    state: State  # optimizer state per parameter name, every tensor (Adam's ``step`` included)
    steps: list[int]
    refreshes: int
    skipped: int


def _region(tensor: MaskedTensor, region: Region) -> Tensor:
    return {
        "A": tensor.forward_set,
        "B\\A": tensor.backward_set & ~tensor.forward_set,
        "outside B": ~tensor.backward_set,
    }[region]


def _alpha(tensor: MaskedTensor) -> Tensor:
    return torch.where(tensor.forward_set, tensor.theta, 0)


class Probe(Callback):
    """Injects ``faults`` (by batch index) after backward and snapshots the state around every batch."""

    def __init__(self, topkast: TopKASTCallback, faults: dict[int, Fault]) -> None:
        self.topkast, self.faults = topkast, faults
        self.batch_idx = -1
        self.start: list[Snapshot] = []
        self.end: list[Snapshot] = []
        self.losses: list[float] = []
        self.alpha_at_start: list[bool] = []  # each masked parameter held exactly α = θ on A, 0 elsewhere
        self.prepared_differs: dict[int, bool] = {}  # at a faulty step, the update was prepared with θ on B \ A
        self.hit: dict[int, dict[str, Tensor]] = {}  # the entries each fault wrote, per tensor
        self.injected = 0  # gradient entries written

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Snapshot:
        engine = engine_of(self.topkast)
        names = {id(p): name for name, p in pl_module.named_parameters()}
        state = {
            names[id(p)]: {k: v.clone() for k, v in s.items() if isinstance(v, Tensor)}
            for opt in trainer.optimizers
            for p, s in opt.state.items()
        }
        return Snapshot(
            params={name: p.detach().clone() for name, p in pl_module.named_parameters()},
            theta={name: t.theta.clone() for name, t in engine.tensors.items()},
            forward_set={name: t.forward_set.clone() for name, t in engine.tensors.items()},
            backward_set={name: t.backward_set.clone() for name, t in engine.tensors.items()},
            state=state,
            steps=list(engine.steps),
            refreshes=engine.refreshes,
            skipped=engine.skipped_steps,
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch_idx = batch_idx
        engine = engine_of(self.topkast)
        self.alpha_at_start.append(all(torch.equal(t.param, _alpha(t)) for t in engine.tensors.values()))
        self.start.append(self._snapshot(trainer, pl_module))

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fault = self.faults.get(self.batch_idx)
        if fault is None:
            return
        self.hit[self.batch_idx] = {}
        for name in fault.tensors:
            tensor = engine_of(self.topkast).tensors[name]
            assert tensor.param.grad is not None
            where = _region(tensor, fault.region).flatten().nonzero().flatten()
            where = where if fault.fill else where[:1]
            assert where.numel() > 0, (self.batch_idx, name, fault.region)
            values = torch.tensor(fault.values, dtype=tensor.param.grad.dtype).repeat(where.numel())
            tensor.param.grad.view(-1)[where] = values[: where.numel()]
            self.hit[self.batch_idx][name] = torch.zeros(tensor.numel, dtype=torch.bool).index_fill_(0, where, True)
            self.injected += where.numel()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.batch_idx in self.faults:
            self.prepared_differs[self.batch_idx] = any(
                not torch.equal(t.param, _alpha(t)) for t in engine_of(self.topkast).tensors.values()
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        self.end.append(self._snapshot(trainer, pl_module))


def _fit_probed(
    tmp_path: Path, faults: dict[int, Fault], optimizer: str = "sgd", update_interval: int = 1, **kwargs: Any
) -> tuple[Probe, TopKASTCallback]:
    """:func:`conftest.fit` of the MLP with a :class:`Probe` injecting ``faults`` after the callback."""
    L.seed_everything(0, verbose=False)
    topkast = TopKASTCallback(update_interval=update_interval, exploration_penalty=1e-3, verbose=False)
    probe = Probe(topkast, faults)
    fit(tmp_path, MLP(optimizer=optimizer), [topkast, probe], make_loader(n=64, batch_size=8), **kwargs)
    return probe, topkast


def _assert_equal_states(a: Snapshot, b: Snapshot, context: object) -> None:
    """Bit-exact: every parameter, θ, A, B and every optimizer state tensor (NaN == NaN where both hold one)."""
    for field in ("params", "theta", "forward_set", "backward_set"):
        left, right = getattr(a, field), getattr(b, field)
        assert left.keys() == right.keys(), (context, field)
        for name in left:
            assert bit_exact(left[name], right[name]), (context, field, name)
    assert a.state.keys() == b.state.keys(), context
    for name in a.state:
        assert a.state[name].keys() == b.state[name].keys(), (context, name)
        for key in a.state[name]:
            assert bit_exact(a.state[name][key], b.state[name][key]), (context, name, key)


def _all_finite(snapshot: Snapshot) -> bool:
    tensors = [*snapshot.params.values(), *snapshot.theta.values()]
    tensors += [v for s in snapshot.state.values() for v in s.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _logged(tmp_path: Path, key: str) -> dict[int, float]:
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


# --- 4. fp16 with a GradScaler: a non-finite gradient inside B skips the step and leaves no trace ----------------


@pytest.mark.parametrize("value", [math.inf, math.nan])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_grad_scaler_skips_faulty_steps_and_leaves_no_trace(tmp_path: Path, optimizer: str, value: float) -> None:
    faulty = {2: Fault("A", (value,)), 5: Fault("B\\A", (value,))}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    probe, topkast = _fit_probed(
        tmp_path,
        faulty,
        optimizer=optimizer,
        plugins=[precision],
        logger=CSVLogger(tmp_path, name="csv", version=0),
        log_every_n_steps=1,
    )
    engine = engine_of(topkast)

    assert probe.injected == 2
    assert scaler.get_scale() == 1024.0 / 4  # the scaler found both faults and halved its scale for each
    assert engine.steps == [BATCHES - 2]  # updates that ran; Lightning's global_step counts all 8 batches
    assert engine.skipped_steps == 2
    # each faulty step was prepared (θ on B \ A in the parameter) and never ran, so α had to be restored
    assert probe.prepared_differs == {2: True, 5: True}
    # the callback's metric, as logged at the end of each batch: it counts the skipped steps as they happen
    assert _logged(tmp_path, "topkast/skipped_steps") == {k: float((k >= 2) + (k >= 5)) for k in range(BATCHES)}
    for batch in range(BATCHES):
        start, end = probe.start[batch], probe.end[batch]
        if batch in faulty:
            # the update was skipped: every parameter (dense ones too), θ, A, B and the optimizer state (AdamW's
            # step count included) are as the batch found them, and with update_interval=1 no refresh ran
            _assert_equal_states(start, end, batch)
            assert end.refreshes == start.refreshes, batch
            assert end.steps == start.steps, batch
        else:
            assert end.steps == [start.steps[0] + 1], batch
            assert end.refreshes == start.refreshes + 1, batch
            assert any(not torch.equal(end.theta[n], start.theta[n]) for n in MASKED), batch
        assert end.skipped == start.skipped + (batch in faulty), batch
    # before every forward pass, the skipped batches' successors included, each parameter held α = θ on A
    assert probe.alpha_at_start == [True] * BATCHES
    # training went on: finite losses after the faults, and a finite state at the end
    assert all(math.isfinite(loss) for loss in probe.losses)
    assert all(_all_finite(s) for s in probe.end)


# --- 4. bf16-mixed has no GradScaler: the engine does not skip, it runs the update it is given ------------------
#
# state.py skips nothing by itself: a skipped step is one that `before_step` prepared and no optimizer post-hook
# followed (GradScaler or the module chose not to step). `_finite` only picks `where` over a float-mask multiply so
# that NaN/inf outside B never leak; it is no guard on B. Without a scaler the optimizer steps, so a non-finite
# gradient inside B reaches θ there exactly as it reaches a dense weight without Top-KAST, and the step counts.
# What happens next follows from selection.magnitude_scores: |±inf| ranks first, NaN ranks below every magnitude.


def test_bf16_inf_gradient_in_forward_set_reaches_the_weight(tmp_path: Path) -> None:
    faulty = 2
    probe, topkast = _fit_probed(tmp_path, {faulty: Fault("A", (math.inf,))}, precision="bf16-mixed", max_steps=4)
    engine = engine_of(topkast)

    assert probe.injected == 1
    assert engine.steps == [4]
    assert engine.skipped_steps == 0
    end, hit = probe.end[faulty], probe.hit[faulty]["net.2.weight"].view(16, 16)
    # SGD with momentum: the buffer becomes +inf there, θ - lr·inf = -inf; every other entry of θ stays finite
    assert end.theta["net.2.weight"][hit].tolist() == [-math.inf]
    assert bool(torch.isfinite(end.theta["net.2.weight"][~hit]).all())
    # the refresh after the step keeps the entry in A (|-inf| is the largest magnitude), so α holds it ...
    assert bool(end.forward_set["net.2.weight"][hit].all())
    assert end.params["net.2.weight"][hit].tolist() == [-math.inf]
    assert probe.alpha_at_start[faulty + 1]
    # ... and the next forward pass is not finite, as a dense run's would be
    assert all(math.isfinite(loss) for loss in probe.losses[: faulty + 1])
    assert not math.isfinite(probe.losses[faulty + 1])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_bf16_nan_gradient_at_a_refresh_drops_the_weight_and_training_goes_on(tmp_path: Path, optimizer: str) -> None:
    """A NaN written into θ by an update that ends in a refresh leaves A and B at once (NaN ranks last), so α never
    holds it and training goes on finite; from then on nothing outside B may change, the NaN weight included, and
    the optimizer state outside B stays zero at every step, refresh or not (the NaN in θ must not leak into it)."""
    faulty, update_interval = 1, 2  # the second update (batch 1) ends in a refresh; batches 2 and 4 do not
    probe, topkast = _fit_probed(
        tmp_path,
        {faulty: Fault("A", (math.nan,))},
        optimizer=optimizer,
        update_interval=update_interval,
        precision="bf16-mixed",
        max_steps=6,
    )
    engine = engine_of(topkast)

    assert probe.injected == 1
    assert engine.steps == [6]
    assert engine.skipped_steps == 0
    hit = probe.hit[faulty]["net.2.weight"].view(16, 16)
    for batch in range(faulty, 6):
        start, end = probe.start[batch], probe.end[batch]
        theta, outside = end.theta["net.2.weight"], ~end.backward_set["net.2.weight"]
        assert theta[hit].isnan().all(), batch
        assert bool(torch.isfinite(theta[~hit]).all()), batch
        assert bool(outside[hit].all()), batch  # out of B, so out of A: never selected again
        assert end.params["net.2.weight"][hit].tolist() == [0.0], batch
        for name in MASKED:
            kept_out = ~start.backward_set[name]
            assert bit_exact(end.theta[name][kept_out], start.theta[name][kept_out]), (batch, name)
            new_outside = ~end.backward_set[name]
            for key, value in end.state[name].items():
                if value.shape == end.theta[name].shape:
                    assert not value[new_outside].any(), (batch, name, key)
    assert probe.alpha_at_start == [True] * 6
    assert all(math.isfinite(loss) for loss in probe.losses)
    assert all(bool(torch.isfinite(p).all()) for p in probe.end[-1].params.values())


# --- 5. a non-finite gradient outside B ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_non_finite_gradient_outside_b_is_dropped_without_skipping_the_step(tmp_path: Path, optimizer: str) -> None:
    """At full precision nobody checks finiteness before the update: the step runs, and `before_step` selects the
    gradient on B with a `where` (never a multiply, 0·inf = NaN), so the run is the clean run bit for bit and the
    step is not counted as skipped."""
    fill = Fault("outside B", NON_FINITE, fill=True, tensors=tuple(MASKED))
    faulty = {1: fill, 2: fill, 4: fill}  # update_interval=2: the faults hit steps that end in a refresh and not
    clean, _ = _fit_probed(tmp_path / "clean", {}, optimizer=optimizer, update_interval=2, max_steps=6)
    probe, topkast = _fit_probed(tmp_path / "faulty", faulty, optimizer=optimizer, update_interval=2, max_steps=6)
    engine = engine_of(topkast)

    outside = {name: int((~probe.start[1].backward_set[name]).sum()) for name in MASKED}
    assert probe.injected == 3 * sum(outside.values()) == 3 * ((256 - 128) + (48 - 24))
    assert engine.steps == [6]
    assert engine.skipped_steps == 0
    for batch in range(6):
        _assert_equal_states(probe.end[batch], clean.end[batch], batch)
        start, end = probe.start[batch], probe.end[batch]
        for name in MASKED:
            kept_out = ~start.backward_set[name]
            # θ outside this step's B did not move, bit for bit ...
            assert torch.equal(end.theta[name][kept_out], start.theta[name][kept_out]), (batch, name)
            # ... and the momentum / Adam moments are exactly zero outside the (refreshed) B
            for key in ("momentum_buffer",) if optimizer == "sgd" else ("exp_avg", "exp_avg_sq"):
                assert not end.state[name][key][~end.backward_set[name]].any(), (batch, name, key)
                assert end.state[name][key][end.backward_set[name]].count_nonzero() > 0, (batch, name, key)
        assert _all_finite(end), batch
    assert probe.alpha_at_start == [True] * 6


def test_grad_scaler_skips_a_step_whose_only_non_finite_gradient_is_outside_b(tmp_path: Path) -> None:
    """Lightning unscales, and so checks finiteness, before `on_before_optimizer_step`, where Top-KAST masks the
    gradient to B (DESIGN.md, hook order): the scaler sees the inf outside B and skips the whole step. Safe (nothing
    moves) but a lost step; the step counts as skipped."""
    faulty = 2
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    probe, topkast = _fit_probed(tmp_path, {faulty: Fault("outside B", (math.inf,))}, plugins=[precision], max_steps=4)
    engine = engine_of(topkast)

    assert probe.injected == 1
    assert scaler.get_scale() == 512.0
    assert engine.steps == [3]
    assert engine.skipped_steps == 1
    _assert_equal_states(probe.start[faulty], probe.end[faulty], faulty)
    assert probe.alpha_at_start == [True] * 4
    assert all(_all_finite(s) for s in probe.end)
