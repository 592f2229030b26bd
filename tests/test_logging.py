"""What reaches the loggers (CSV, W&B offline, TensorBoard), checked against values computed here independently.

An ``Expected`` callback recomputes, after every optimizer step, every ``topkast/...`` metric from the model's
parameters and the engine's sets, with no help from ``reporting.py``. Lightning logs the callback's metrics at
``on_train_batch_end`` of batch ``k`` under step ``k`` = optimizer steps done - 1, whenever
``(k + 1) % log_every_n_steps == 0``. ``pl_module.log`` stores floats as float32 tensors, so exact values are compared
after rounding to float32.
"""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import MLP, MLP_SET_SIZES, make_loader, make_trainer, wandb_history
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_topkast import TopKASTCallback
from lightning_topkast.reporting import density_metrics

FORWARD_SPARSITY, BACKWARD_SPARSITY, PENALTY = 0.8, 0.5, 1e-3
MASKED_NUMEL = 16 * 16 + 3 * 16
LINEAR_LAYERS = [("net.0.weight", 8, 16), ("net.2.weight", 16, 16), ("net.4.weight", 16, 3)]  # (weight, in, out)
SAMPLES, BATCH_SIZE, EPOCHS = 64, 8, 2  # 16 optimizer steps: the last step is logged for log_every_n_steps 1, 2, 4
STEPS = EPOCHS * SAMPLES // BATCH_SIZE

P = "topkast/"
EXACT_KEYS = [
    "forward_density",
    "forward_density_target",
    "backward_density",
    "backward_density_target",
    "exploration",
    "train_flops_fraction",
    "inference_flops_fraction",
    "refreshes",
    "early_refreshes",
    "skipped_steps",
]
PER_TENSOR_KEYS = ["forward_density", "forward_density_target", "backward_density", "backward_density_target"]


def f32(x: float | Fraction) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


class Expected(L.Callback):
    """Recomputes every metric the callback should log after each optimizer step, independently of reporting.py."""

    def __init__(self, topkast: TopKASTCallback) -> None:
        self.topkast = topkast
        self.rows: dict[int, dict[str, Any]] = {}  # logged step -> expected metrics
        self.sizes: list[dict[str, tuple[int, int, int]]] = []  # every step: name -> (|A|, |B|, non-zeros)
        self._previous: dict[str, torch.Tensor] = {}
        self._ever: dict[str, torch.Tensor] = {}
        self._left = self._size = self._refreshes_since_log = self._initial_refreshes = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.topkast.engine
        assert engine is not None
        self._previous = {name: t.forward_set.clone() for name, t in engine.tensors.items()}
        self._ever = {name: t.forward_set.clone() for name, t in engine.tensors.items()}
        self._initial_refreshes = engine.refreshes

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = self.topkast.engine
        assert engine is not None
        steps = trainer.global_step
        if steps % self.topkast.update_interval == 0:
            self._refreshes_since_log += 1
            for name, t in engine.tensors.items():
                self._left += int((self._previous[name] & ~t.forward_set).sum())
                self._size += int(self._previous[name].sum())
        for name, t in engine.tensors.items():
            self._previous[name] = t.forward_set.clone()
            self._ever[name] |= t.forward_set
        self.sizes.append(
            {
                name: (
                    int(t.forward_set.sum()),
                    int(t.backward_set.sum()),
                    int(pl_module.get_parameter(name).ne(0).sum()),
                )
                for name, t in engine.tensors.items()
            }
        )
        if steps % trainer.log_every_n_steps == 0:
            self.rows[steps - 1] = self._metrics(pl_module, steps)

    def _metrics(self, pl_module: L.LightningModule, steps: int) -> dict[str, Any]:
        engine = self.topkast.engine
        assert engine is not None
        tensors = engine.tensors
        numel = sum(t.numel for t in tensors.values())
        nonzero = {name: int(torch.count_nonzero(pl_module.get_parameter(name))) for name in tensors}
        a = {name: Fraction(int(t.forward_set.sum()), t.numel) for name, t in tensors.items()}
        b = {name: Fraction(int(t.backward_set.sum()), t.numel) for name, t in tensors.items()}
        row: dict[str, Any] = {
            "forward_density": Fraction(sum(nonzero.values()), numel),
            "forward_density_target": 1 - FORWARD_SPARSITY,
            "backward_density": Fraction(sum(int(t.backward_set.sum()) for t in tensors.values()), numel),
            "backward_density_target": 1 - BACKWARD_SPARSITY,
            "exploration": Fraction(sum(int(e.sum()) for e in self._ever.values()), numel),
            "refreshes": self._initial_refreshes + steps // self.topkast.update_interval,
            "early_refreshes": 0,
            "skipped_steps": 0,
            "penalty": sum(
                _penalty(t.theta, t.forward_set, t.backward_set, t.forward_density) for t in tensors.values()
            ),
            "turnover": Fraction(self._left, self._size) if self._refreshes_since_log else None,
        }
        # Forward FLOPs of a Linear call are 2 * in * out per row; the dense first layer costs 1, a masked one
        # (2D + (D + M)) / 3 of dense in training and D in inference (the batch size cancels out).
        flops = {weight: 2 * fan_in * fan_out for weight, fan_in, fan_out in LINEAR_LAYERS}
        train = {w: (2 * a[w] + b[w]) / 3 if w in tensors else Fraction(1) for w in flops}
        inference = {w: a[w] if w in tensors else Fraction(1) for w in flops}
        row["train_flops_fraction"] = Fraction(sum(flops[w] * train[w] for w in flops), sum(flops.values()))
        row["inference_flops_fraction"] = Fraction(sum(flops[w] * inference[w] for w in flops), sum(flops.values()))
        for name, t in tensors.items():
            row[f"forward_density/{name}"] = Fraction(nonzero[name], t.numel)
            row[f"forward_density_target/{name}"] = 1 - FORWARD_SPARSITY
            row[f"backward_density/{name}"] = b[name]
            row[f"backward_density_target/{name}"] = 1 - BACKWARD_SPARSITY
        self._left = self._size = self._refreshes_since_log = 0
        return row


def _penalty(theta: torch.Tensor, forward_set: torch.Tensor, backward_set: torch.Tensor, density: float) -> float:
    """λ/2 · Σ c·θ² with c = 1 on A, 1/D on B \\ A, 0 outside B (METHOD.md, rule 3), in float64."""
    theta = theta.double()
    exploration = backward_set & ~forward_set
    return PENALTY / 2 * float((theta[forward_set] ** 2).sum() + (theta[exploration] ** 2).sum() / density)


def fit(tmp_path: Path, logger: Any, update_interval: int, log_every_n_steps: int, log_per_tensor: bool):
    topkast = TopKASTCallback(
        forward_sparsity=FORWARD_SPARSITY,
        backward_sparsity=BACKWARD_SPARSITY,
        update_interval=update_interval,
        early_refresh=None,  # the fixed schedule the expectations count on
        exploration_penalty=PENALTY,
        log_per_tensor=log_per_tensor,
        verbose=False,
    )
    expected = Expected(topkast)
    trainer = make_trainer(
        tmp_path, [topkast, expected], logger=logger, max_epochs=EPOCHS, log_every_n_steps=log_every_n_steps
    )
    trainer.fit(MLP(), make_loader(n=SAMPLES, batch_size=BATCH_SIZE))
    assert trainer.global_step == STEPS
    return topkast, expected


def check_logged(logged: dict[int, dict[str, float]], topkast: TopKASTCallback, expected: Expected) -> None:
    """Every logged row against the independent computation, plus the invariants across rows."""
    assert expected.sizes, "no optimizer step ran"
    for sizes in expected.sizes:
        assert {name: s[:2] for name, s in sizes.items()} == MLP_SET_SIZES
        assert all(nonzero == a for a, _, nonzero in sizes.values())

    assert sorted(logged) == sorted(expected.rows)
    per_tensor = (
        [f"{key}/{name}" for key in PER_TENSOR_KEYS for name in MLP_SET_SIZES] if topkast.log_per_tensor else []
    )
    for step, row in logged.items():
        want = expected.rows[step]
        keys = {key.removeprefix(P) for key in row if key.startswith(P)}
        assert keys - {"turnover"} == {*EXACT_KEYS, "penalty", *per_tensor}, step
        for key in [*EXACT_KEYS, *per_tensor]:
            assert row[P + key] == f32(want[key]), (step, key)
        assert row[P + "penalty"] == pytest.approx(want["penalty"], rel=1e-5), step
        # each tensor's |A| is D * n rounded, so the actual density is within half a weight per tensor of the target
        gap = abs(row[P + "forward_density"] - row[P + "forward_density_target"])
        assert gap <= 0.5 * len(MLP_SET_SIZES) / MASKED_NUMEL, step
        if want["turnover"] is None:
            # No refresh since the previous log: the mask did not move. Absent by design; 0.0 would also be truthful,
            # but a value carried over from an earlier log is not.
            assert row.get(P + "turnover", 0.0) == 0.0, f"step {step}: stale turnover {row.get(P + 'turnover')}"
        else:
            assert 0.0 <= row[P + "turnover"] <= 1.0
            assert row[P + "turnover"] == pytest.approx(float(want["turnover"]), rel=1e-6, abs=1e-9), step

    steps = sorted(logged)
    exploration = [logged[s][P + "exploration"] for s in steps]
    assert exploration == sorted(exploration)
    assert all(logged[s][P + "exploration"] >= logged[s][P + "forward_density"] for s in steps)

    # The last logged step is the final step: its values are those of the state the fit ended in.
    last = logged[STEPS - 1]
    engine = topkast.engine
    assert engine is not None
    final = density_metrics(engine.tensors, PENALTY)
    assert last[P + "penalty"] == f32(final[P + "penalty"])
    nonzero = sum(int(torch.count_nonzero(t.param)) for t in engine.tensors.values())
    assert last[P + "forward_density"] == f32(Fraction(nonzero, sum(t.numel for t in engine.tensors.values())))


def read_csv(path: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            assert step not in rows, f"two rows for step {step}"
            rows[step] = {key: float(value) for key, value in row.items() if value != ""}
    return rows


@pytest.mark.parametrize(
    ("update_interval", "log_every_n_steps"),
    [
        (1, 1),  # the method as written, every step logged
        (3, 2),  # some logs fall between refreshes (steps 2, 8, 14), some follow one (4, 6, 10, 12, 16)
        (2, 4),  # two refreshes between logs: turnover is their |A|-weighted mean
    ],
)
def test_csv_logger_gets_exact_metrics_at_every_log_step(
    tmp_path: Path, update_interval: int, log_every_n_steps: int
) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    topkast, expected = fit(tmp_path, logger, update_interval, log_every_n_steps, log_per_tensor=True)
    logged = read_csv(Path(logger.log_dir) / "metrics.csv")
    assert sorted(logged) == list(range(log_every_n_steps - 1, STEPS, log_every_n_steps))
    check_logged(logged, topkast, expected)


def test_wandb_offline_run_gets_exact_metrics(tmp_path: Path) -> None:
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="topkast-tests")
    run = logger.experiment
    try:
        topkast, expected = fit(tmp_path, logger, update_interval=3, log_every_n_steps=2, log_per_tensor=False)
        summary = dict(run.summary)
        run_file = Path(run.dir).parent / f"run-{run.id}.wandb"
    finally:
        run.finish()

    logged = {int(row["trainer/global_step"]): row for row in wandb_history(run_file)}
    assert sorted(logged) == list(range(1, STEPS, 2))
    check_logged(logged, topkast, expected)
    # The run's summary (W&B's documented in-process view) holds the last logged value of every metric.
    last = logged[STEPS - 1]
    assert summary["trainer/global_step"] == STEPS - 1
    for key, value in last.items():
        if key.startswith(P):
            assert summary[key] == value, key
    assert not any(key.startswith(P + "forward_density/") for key in summary)


def test_tensorboard_gets_topkast_scalars(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    topkast, expected = fit(tmp_path, logger, update_interval=2, log_every_n_steps=1, log_per_tensor=False)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = {tag for tag in events.Tags()["scalars"] if tag.startswith(P)}
    assert tags == {P + key for key in [*EXACT_KEYS, "penalty", "turnover"]}
    logged: dict[int, dict[str, float]] = {}
    for tag in tags:
        for event in events.Scalars(tag):
            logged.setdefault(event.step, {})[tag] = event.value
    assert sorted(logged) == list(range(STEPS))
    check_logged(logged, topkast, expected)
