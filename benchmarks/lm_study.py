r"""Why Top-KAST trails static sparsity on the KJV character LM under AdamW, and what helps (issue 17).

    python benchmarks/lm_study.py --list                                     # the named configurations
    python benchmarks/lm_study.py --runs tk90 static90 --steps 1500 --seeds 0   # train, merge into the JSON
    python benchmarks/lm_study.py --runs tk90 --steps 1500 --diagnose        # with H1/H2 churn diagnostics
    python benchmarks/lm_study.py --report                                   # docs/language-models.md tables

The task, model, data, batch, precision and schedule are the accuracy benchmark's text task (benchmarks/accuracy.py:
KJV characters, a 2-layer d = 128 character Transformer, batch 16 x 64, bf16-mixed, warm-up then cosine, gradient
clipping 1.0), with **fused** AdamW (0.9, 0.95, weight decay 0.01) for every method. Every number is **validation**
bits/char (the full validation split, non-overlapping 65-char windows, fp32); the test split is never read.

Each configuration of :data:`CONFIGS` names a method (dense, static or Top-KAST), its sparsities, learning rate,
exploration penalty (λ and whether it is coupled through the gradient or decoupled), refresh schedule and which of
the token embedding and output head are masked (``layers``). Static and Top-KAST mask the same tensors at the same
per-tensor density in every ``layers`` setting. Runs are written one by one into ``results/lm_study.json``: a run of
the same configuration, seed and step budget replaces the earlier one, every other run is kept, and each run
carries its own provenance (commit, versions, machine, command).

``--diagnose`` (Top-KAST) measures the mask's churn per tensor in windows of 11 steps every ``--diagnose-every``
steps (hypotheses 1 and 2 of the issue): the gap between A's and B's magnitude thresholds over the median |Δθ| of
B \ A in one step, the turnover of A per step, the fraction of the weights that enter A and leave it again within
10 steps, and the |Δθ| of a weight in its first step after entering B over the median |Δθ| of B \ A.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import common
import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_topkast import TopKASTCallback, targets

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lm_study.json"
PAGE = ROOT / "docs" / "language-models.md"
TASK = "text"
WINDOW = 10  # steps an entrant to A is followed for (issue 17, hypothesis 1)


@dataclass(frozen=True)
class Config:
    """One configuration of the study: a method and every setting that differs between the ablations."""

    method: str  # dense, static or topkast
    lr: float
    sparsity: float = 0.0
    backward_sparsity: float | None = None  # Top-KAST; None: common.TOPKAST_BACKWARD
    penalty: float = 1e-4
    decoupled: bool = False
    update_interval: int = 1
    early_refresh: float | None = 0.01
    layers: str = "emb-dense"  # emb-dense (the benchmark's), head-dense, both-dense, all-masked, head-only-dense
    # AdamW's moments of a weight that enters B (hypothesis 2's fixes, screened here, not in the library):
    # zero (the library's), mean-v (v from the mean v of the rest of its tensor's B), kept (those it left B with)
    entrant_moments: str = "zero"
    note: str = ""


def _tk(lr: float = 1e-2, sparsity: float = 0.9, **kw: Any) -> Config:
    return Config("topkast", lr, sparsity, **kw)


CONFIGS: dict[str, Config] = {
    "dense": Config("dense", 3e-3, note="dense at its tuned rate"),
    "dense-lr1e-2": Config("dense", 1e-2),
    "static90": Config("static", 1e-2, 0.9),
    "static90-lr2e-2": Config("static", 2e-2, 0.9),
    "static90-lr4e-2": Config("static", 4e-2, 0.9),
    "static90-lr8e-2": Config("static", 8e-2, 0.9),
    "static90-head-dense": Config("static", 1e-2, 0.9, layers="head-dense"),
    "static90-all-masked": Config("static", 1e-2, 0.9, layers="all-masked"),
    "tk90": _tk(note="the library's defaults: λ 1e-4 coupled, every-step refresh, early refresh 0.01"),
    "tk90-lr5e-3": _tk(5e-3),
    "tk90-lr2e-2": _tk(2e-2),
    "tk90-lr4e-2": _tk(4e-2),
    "tk90-cpl1e-3": _tk(penalty=1e-3),
    "tk90-cpl1e-2": _tk(penalty=1e-2),
    "tk90-dec1e-4": _tk(penalty=1e-4, decoupled=True),
    "tk90-dec1e-3": _tk(penalty=1e-3, decoupled=True),
    "tk90-dec1e-2": _tk(penalty=1e-2, decoupled=True),
    "tk90-dec3e-2": _tk(penalty=3e-2, decoupled=True),
    "tk90-dec1e-1": _tk(penalty=1e-1, decoupled=True),
    "tk90-pen0": _tk(penalty=0.0, note="no exploration penalty"),
    "tk90-dec3e-2-lr5e-3": _tk(5e-3, penalty=3e-2, decoupled=True),
    "tk90-dec3e-2-lr2e-2": _tk(2e-2, penalty=3e-2, decoupled=True),
    "tk90-dec3e-2-lr4e-2": _tk(4e-2, penalty=3e-2, decoupled=True),
    "tk90-dec3e-2-head-dense": _tk(penalty=3e-2, decoupled=True, layers="head-dense"),
    "tk90-dec3e-2-all-masked": _tk(penalty=3e-2, decoupled=True, layers="all-masked"),
    "tk90-dec3e-2-lr2e-2-head-dense": _tk(2e-2, penalty=3e-2, decoupled=True, layers="head-dense"),
    "tk90-dec3e-2-lr2e-2-all-masked": _tk(2e-2, penalty=3e-2, decoupled=True, layers="all-masked"),
    "tk90-dec3e-2-lr2e-2-head-only-dense": _tk(2e-2, penalty=3e-2, decoupled=True, layers="head-only-dense"),
    "tk90-dec3e-2-i100": _tk(penalty=3e-2, decoupled=True, update_interval=100),
    "tk90-dec3e-2-lr2e-2-i100": _tk(2e-2, penalty=3e-2, decoupled=True, update_interval=100),
    "tk90-dec3e-2-lr2e-2-i100-e5": _tk(2e-2, penalty=3e-2, decoupled=True, update_interval=100, early_refresh=0.05),
    "tk90-dec3e-2-lr2e-2-meanv": _tk(2e-2, penalty=3e-2, decoupled=True, entrant_moments="mean-v"),
    "tk90-dec3e-2-lr2e-2-kept": _tk(2e-2, penalty=3e-2, decoupled=True, entrant_moments="kept"),
    "tk90-dec3e-2-lr2e-2-i100-meanv": _tk(
        2e-2, penalty=3e-2, decoupled=True, update_interval=100, entrant_moments="mean-v"
    ),
    "tk90-dec3e-2-lr2e-2-i100-kept": _tk(
        2e-2, penalty=3e-2, decoupled=True, update_interval=100, entrant_moments="kept"
    ),
    "tk80-dec3e-2-lr2e-2": _tk(2e-2, sparsity=0.8, penalty=3e-2, decoupled=True),
    "tk80-dec3e-2-lr5e-3": _tk(5e-3, sparsity=0.8, penalty=3e-2, decoupled=True),
    "tk80-dec3e-2-lr4e-2": _tk(4e-2, sparsity=0.8, penalty=3e-2, decoupled=True),
    "tk80-dec3e-2-lr4e-2-i10-noearly": _tk(
        4e-2, sparsity=0.8, penalty=3e-2, decoupled=True, update_interval=10, early_refresh=None
    ),
    "tk80-dec3e-2-i10-noearly": _tk(sparsity=0.8, penalty=3e-2, decoupled=True, update_interval=10, early_refresh=None),
    "tk90-dec1e-2-lr2e-2": _tk(2e-2, penalty=1e-2, decoupled=True),
    "tk90-dec1e-1-lr2e-2": _tk(2e-2, penalty=1e-1, decoupled=True),
    "tk90-dec1e-2-i100": _tk(penalty=1e-2, decoupled=True, update_interval=100),
    "tk90-i100-noearly": _tk(update_interval=100, early_refresh=None),
    "tk90-head-dense": _tk(layers="head-dense"),
    "tk90-all-masked": _tk(layers="all-masked"),
    "tk90-dec1e-2-head-dense": _tk(penalty=1e-2, decoupled=True, layers="head-dense"),
    "tk80": _tk(sparsity=0.8),
    "tk80-dec1e-2": _tk(sparsity=0.8, penalty=1e-2, decoupled=True),
    "tk80-dec1e-1": _tk(sparsity=0.8, penalty=1e-1, decoupled=True),
    "tk80-dec3e-2": _tk(sparsity=0.8, penalty=3e-2, decoupled=True),
}


# --- which tensors are masked -------------------------------------------------------------------------------------


def study_targets(pl_module: nn.Module, layers: str) -> tuple[list[str], dict[str, str]]:
    """The masked weights and the ones kept dense (with why) for a ``layers`` setting of the char LM.

    ``emb-dense`` is the benchmark's selection (:func:`common.masked_weights`: the token embedding, registered first,
    dense; the head masked). ``head-dense`` keeps the output head dense too, ``both-dense`` is an alias of it kept for
    clarity, ``all-masked`` masks the embedding and the head, ``head-only-dense`` masks the embedding and keeps the
    head dense: what registration order chose on LitGPT's ``GPT``, which registers its head first.
    """
    first, names = common.masked_weights(pl_module)
    dense = {first: "first layer (token embedding)"}
    if layers == "emb-dense":
        return names, dense
    if layers in ("head-dense", "both-dense"):
        return [n for n in names if n != "model.head.weight"], {**dense, "model.head.weight": "output head"}
    if layers == "all-masked":
        return [first, *names], {}
    if layers == "head-only-dense":
        return [first, *(n for n in names if n != "model.head.weight")], {"model.head.weight": "output head"}
    raise ValueError(f"layers={layers!r}: use emb-dense, head-dense, both-dense, all-masked or head-only-dense")


class StudyTopKAST(TopKASTCallback):
    """``TopKASTCallback`` masking exactly :func:`study_targets`."""

    def __init__(self, layers: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers = layers

    @override
    def select_targets(self, pl_module: nn.Module) -> targets.Selection:
        return targets.Selection(*study_targets(pl_module, self.layers))


class StudyStatic(common.StaticSparsity):
    """A fixed random mask over exactly :func:`study_targets`."""

    def __init__(self, sparsity: float, layers: str) -> None:
        super().__init__(sparsity)
        self.layers = layers

    @override
    def targets(self, pl_module: L.LightningModule) -> list[str]:
        return study_targets(pl_module, self.layers)[0]


def callbacks_for(config: Config) -> list[L.Callback]:
    if config.method == "dense":
        return []
    if config.method == "static":
        return [StudyStatic(config.sparsity, config.layers)]
    backward = config.backward_sparsity
    if backward is None:
        backward = common.TOPKAST_BACKWARD[config.sparsity]
    return [
        StudyTopKAST(
            config.layers,
            forward_sparsity=config.sparsity,
            backward_sparsity=backward,
            update_interval=config.update_interval,
            early_refresh=config.early_refresh,
            exploration_penalty=config.penalty,
            decoupled_penalty=config.decoupled,
            verbose=False,
        )
    ]


# --- churn diagnostics (hypotheses 1 and 2) ---------------------------------------------------------------------


@dataclass
class _Window:
    step: int
    theta: dict[str, Tensor] = field(default_factory=dict)
    a: dict[str, Tensor] = field(default_factory=dict)
    b: dict[str, Tensor] = field(default_factory=dict)
    entrants: dict[str, Tensor] = field(default_factory=dict)  # entered A at the window's first step
    left: dict[str, Tensor] = field(default_factory=dict)  # ... and were out of A at some later step
    since_b: dict[str, Tensor] = field(default_factory=dict)  # steps since entering B (-1: in B at the start)
    kick: dict[str, list[float]] = field(default_factory=dict)  # median |Δθ| of first steps in B / of B \ A
    record: dict[str, dict[str, float]] = field(default_factory=dict)


class Churn(L.Callback):
    """Per-tensor churn of Top-KAST's sets, measured over windows of ``WINDOW + 1`` steps every ``every`` steps."""

    def __init__(self, topkast: TopKASTCallback, every: int) -> None:
        self.topkast, self.every = topkast, every
        self.points: list[dict[str, Any]] = []
        self.window: _Window | None = None

    @torch.no_grad()
    @override
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step, engine = trainer.global_step, self.topkast.engine
        assert engine is not None
        w = self.window
        if w is None:
            if step % self.every == 0 and step + WINDOW + 1 <= trainer.max_steps:
                self.window = w = _Window(step)
                for name, t in engine.tensors.items():
                    w.theta[name], w.a[name], w.b[name] = t.theta.clone(), t.forward_set, t.backward_set
                    w.since_b[name] = torch.full_like(t.theta, -1, dtype=torch.int16)
            return
        age = step - w.step
        for name, t in engine.tensors.items():
            theta, a, b = t.theta, t.forward_set, t.backward_set
            prev_theta, prev_a, prev_b = w.theta[name], w.a[name], w.b[name]
            moved = (theta - prev_theta).abs()
            explorers = prev_b & ~prev_a
            base = moved[explorers & (w.since_b[name] < 0)]
            median_explorer = float(base.median()) if base.numel() else math.nan
            fresh = w.since_b[name] == 1  # one step after entering B: its first update was this step's
            if fresh.any() and median_explorer > 0:
                w.kick.setdefault(name, []).append(float(moved[fresh].median()) / median_explorer)
            since = w.since_b[name]
            since[(since >= 0)] += 1
            since[b & ~prev_b] = 0
            since[~b] = -2  # left B: no longer followed
            if age == 1:
                scores = prev_theta.abs().flatten()
                k_a, k_b = int(prev_a.sum()), int(prev_b.sum())
                top = scores.topk(k_b).values
                gap = float(top[k_a - 1] - top[k_b - 1]) if k_b > k_a else math.nan
                w.entrants[name] = a & ~prev_a
                w.left[name] = torch.zeros_like(a)
                w.record[name] = {
                    "gap": gap,
                    "median_step_explorers": float(moved[explorers].median()) if explorers.any() else math.nan,
                    "gap_over_step": gap / float(moved[explorers].median()) if explorers.any() else math.nan,
                    "turnover": float((prev_a & ~a).sum()) / max(1, k_a),
                    "entrants": int(w.entrants[name].sum()),
                }
            else:
                w.left[name] |= w.entrants[name] & ~a
            w.theta[name], w.a[name], w.b[name] = theta.clone(), a, b
        if age == WINDOW + 1:
            for name, rec in w.record.items():
                n = rec["entrants"]
                rec["left_within_10"] = float(w.left[name].sum()) / n if n else math.nan
                kicks = w.kick.get(name, [])
                rec["first_step_kick"] = statistics.median(kicks) if kicks else math.nan
            self.points.append({"step": w.step, "tensors": w.record})
            self.window = None


class EntrantMoments(L.Callback):
    """Hypothesis 2's fixes, screened: AdamW's moments of the weights that entered B in this step's refresh.

    The engine leaves them zero (it keeps every optimizer state zero outside B), so an entrant's first update is a
    kick of a few steady steps. ``mean-v`` starts its v at the mean v of the rest of its tensor's B; ``kept`` gives
    back the moments it had at the start of its last step in B (zero if it was never in B). Weights outside B keep
    zero state either way: nothing outside B moves.
    """

    def __init__(self, topkast: TopKASTCallback, how: str) -> None:
        self.topkast, self.how = topkast, how
        self.before: dict[str, Tensor] = {}  # B at the start of the step
        self.shadow: dict[str, dict[str, Tensor]] = {}
        self.given = 0  # entrants whose moments were set (kept: of those that had been in B before)

    def _states(self, trainer: L.Trainer) -> Any:
        engine = self.topkast.engine
        assert engine is not None
        for name, t in engine.tensors.items():
            states = t.optimizer_states(trainer.optimizers[0])
            if {"exp_avg", "exp_avg_sq"} <= states.keys():
                yield name, t, states

    @torch.no_grad()
    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        assert self.topkast.engine is not None
        self.before = {name: t.backward_set for name, t in self.topkast.engine.tensors.items()}
        for name, _, states in self._states(trainer):  # none before the first step creates them
            b = self.before[name]
            if self.how == "kept":
                shadow = self.shadow.setdefault(
                    name, {k: torch.zeros_like(states[k]) for k in ("exp_avg", "exp_avg_sq")}
                )
                for key, value in shadow.items():
                    value.copy_(torch.where(b, states[key], value))

    @torch.no_grad()
    @override
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        for name, t, states in self._states(trainer):
            b = t.backward_set
            entrants = b & ~self.before[name]
            if not entrants.any():
                continue
            if self.how == "mean-v":
                rest = states["exp_avg_sq"][b & ~entrants]
                if rest.numel():
                    states["exp_avg_sq"][entrants] = rest.mean()
                    self.given += int(entrants.sum())
            elif name in self.shadow:
                for key, value in self.shadow[name].items():
                    states[key][entrants] = value[entrants]
                self.given += int((entrants & (self.shadow[name]["exp_avg_sq"] > 0)).sum())


class UnitRefreshes(L.Callback):
    """How many steps refreshed each masked tensor (a unit's counter is zero right after its refresh)."""

    def __init__(self, topkast: TopKASTCallback) -> None:
        self.topkast = topkast
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        engine = self.topkast.engine
        assert engine is not None
        for name, t in engine.tensors.items():
            self.sizes[name] = t.numel
            self.counts[name] = self.counts.get(name, 0) + (t.unit.since_refresh == 0)


# --- one run ----------------------------------------------------------------------------------------------------


def train(name: str, seed: int, steps: int, diagnose: int, data_dir: str | None) -> dict[str, Any]:
    """Train configuration ``name`` on ``seed`` for ``steps``; its validation bits/char and what it measured."""
    config = CONFIGS[name]
    torch.set_num_threads(1)
    for pattern in (".*does not have many workers.*", ".*GPU available.*", ".*LeafSpec.*", ".*fused=True.*"):
        warnings.filterwarnings("ignore", pattern)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    task = accuracy.TASKS[TASK]
    run = accuracy.Run(TASK, config.method, config.sparsity, seed, config.lr, split="val")
    splits = accuracy._load(TASK, data_dir)
    L.seed_everything(seed, verbose=False)
    module = common.CharLM(len(splits.vocab), total_steps=steps, lr=config.lr, fused=True, **task.model)
    train_set = accuracy._train_set(run, splits, module)
    callbacks = callbacks_for(config)
    topkast = callbacks[0] if config.method == "topkast" else None
    curve = accuracy.Curve(max(steps // 5, 1), accuracy._evaluation(run, splits, "val", task.curve_windows))
    extra: list[L.Callback] = [common.ClipGradients(task.gradient_clip_val), curve]
    churn = Churn(topkast, diagnose) if topkast is not None and diagnose else None
    units = UnitRefreshes(topkast) if topkast is not None else None
    moments = EntrantMoments(topkast, config.entrant_moments) if topkast and config.entrant_moments != "zero" else None
    extra += [c for c in (churn, units, moments) if c is not None]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, *extra],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    start = time.perf_counter()
    trainer.fit(module, accuracy._train_loader(train_set, task.batch_size))
    seconds = time.perf_counter() - start - curve.eval_seconds
    engine = getattr(topkast, "engine", None)
    return {
        "name": name,
        "config": asdict(config),
        "seed": seed,
        "steps": trainer.global_step,
        "val_bits": module.evaluate(*accuracy._evaluation(run, splits, "val")),
        "density": common.masked_density(module) if config.method != "dense" else 1.0,
        "train_seconds": seconds,
        "curve": curve.points,
        "refreshes": None if engine is None else engine.refreshes,
        "early_refreshes": None if engine is None else engine.early_refreshes,
        "churn": churn.points if churn is not None else [],
        **({} if units is None else {"unit_refreshes": units.counts, "unit_sizes": units.sizes}),
        **({} if moments is None else {"entrants_given_moments": moments.given}),
    }


def merge(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` into the study's JSON, replacing a run of the same name, seed and steps."""
    saved = json.loads(path.read_text()) if path.exists() else {"runs": []}
    key = (record["name"], record["seed"], record["steps"])
    runs = [r for r in saved["runs"] if (r["name"], r["seed"], r["steps"]) != key] + [record]
    saved["runs"] = sorted(runs, key=lambda r: (r["steps"], r["name"], r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1, allow_nan=True))


# --- the page ---------------------------------------------------------------------------------------------------


def groups(runs: list[dict[str, Any]]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    found: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: (r["steps"], r["name"], r["seed"])):
        found.setdefault((r["steps"], r["name"]), []).append(r)
    return found


def describe(c: dict[str, Any]) -> str:
    if c["method"] == "dense":
        return "dense"
    if c["method"] == "static":
        what = f"static {c['sparsity']:.0%}"
    else:
        backward = c["backward_sparsity"] or common.TOPKAST_BACKWARD[c["sparsity"]]
        what = f"Top-KAST {c['sparsity']:.0%}/{backward:.0%}, "
        if c["penalty"]:
            what += f"λ {c['penalty']:g} " + ("decoupled" if c["decoupled"] else "coupled")
        else:
            what += "no penalty"
        if c["update_interval"] != 1 or c["early_refresh"] != 0.01:
            early = f"early {c['early_refresh']:g}" if c["early_refresh"] is not None else "no early"
            what += f", interval {c['update_interval']} ({early})"
    what += "" if c.get("entrant_moments", "zero") == "zero" else f", entrants to B: {c['entrant_moments']} moments"
    return what + ("" if c["layers"] == "emb-dense" else f", {c['layers']}")


def table(runs: list[dict[str, Any]], steps: int) -> str:
    """Every configuration run at ``steps``: validation bits/char per seed, mean ± std, and each seed's difference
    to the best static configuration at that budget (static at its best learning rate)."""
    found = {name: rs for (s, name), rs in groups(runs).items() if s == steps}
    statics = [name for name, rs in found.items() if rs[0]["config"]["method"] == "static"]
    reference = min(statics, key=lambda n: statistics.fmean(r["val_bits"] for r in found[n]), default="")
    ref = {r["seed"]: r["val_bits"] for r in found.get(reference, [])}
    lines = [
        f"| run | configuration | lr | seeds | validation bits/char "
        f"| per seed, to {f'`{reference}`' if reference else 'static (none here)'} | refreshes (early) "
        "| minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in sorted(found.items(), key=lambda kv: statistics.fmean(r["val_bits"] for r in kv[1])):
        values = [r["val_bits"] for r in rs]
        mean = statistics.fmean(values)
        value = f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"
        diffs = ", ".join(f"{r['val_bits'] - ref[r['seed']]:+.3f}" for r in rs if r["seed"] in ref) or "–"
        refreshes = "–"
        if rs[0]["refreshes"] is not None:
            early = statistics.fmean(r["early_refreshes"] for r in rs)
            refreshes = f"{statistics.fmean(r['refreshes'] for r in rs):.0f} ({early:.0f})"
        minutes = statistics.fmean(r["train_seconds"] for r in rs) / 60
        seeds = ", ".join(str(r["seed"]) for r in rs)
        lines.append(
            f"| `{name}` | {describe(rs[0]['config'])} | {rs[0]['config']['lr']:g} | {seeds} | {value} | {diffs} "
            f"| {refreshes} | {minutes:.1f} |"
        )
    return "\n".join(lines)


def churn_table(runs: list[dict[str, Any]]) -> str:
    """Hypotheses 1 and 2: per window, the median over tensors of each churn measure, for every diagnosed run."""
    lines = [
        "| run | steps | seed | window at step | threshold gap | gap / median \\|Δθ\\| of B \\ A "
        "| turnover of A per step | entrants leaving A within 10 steps | first step in B: \\|Δθ\\| / B \\ A's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for point in r["churn"]:
            per = point["tensors"].values()

            def med(key: str, per: Any = per) -> float:
                values = [v[key] for v in per if not math.isnan(v[key])]
                return statistics.median(values) if values else math.nan

            lines.append(
                f"| `{r['name']}` | {r['steps']} | {r['seed']} | {point['step']} | {med('gap'):.3f} "
                f"| {med('gap_over_step'):.2f} "
                f"| {med('turnover'):.2e} | {med('left_within_10'):.2f} | {med('first_step_kick'):.2f} |"
            )
    return "\n".join(lines)


def refresh_table(runs: list[dict[str, Any]]) -> str:
    """Per run with refresh counts per tensor and a long interval: how often the sets were refreshed, three ways."""
    lines = [
        "| run | steps | seed | steps with a refresh (early) | per tensor: least, median, most | weighted by size "
        "| validation bits/char |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        steps, counts, sizes = r["steps"], r["unit_refreshes"], r["unit_sizes"]
        per = sorted(counts[n] / steps for n in counts)
        weighted = sum(counts[n] * sizes[n] for n in counts) / (steps * sum(sizes.values()))
        lines.append(
            f"| `{r['name']}` | {steps} | {r['seed']} "
            f"| {r['refreshes'] / steps:.1%} ({r['early_refreshes'] / steps:.1%}) "
            f"| {per[0]:.1%}, {statistics.median(per):.1%}, {per[-1]:.1%} | {weighted:.1%} | {r['val_bits']:.3f} |"
        )
    return "\n".join(lines)


def commits(runs: list[dict[str, Any]]) -> str:
    found = sorted({(r["provenance"]["commit"][:7], r["provenance"]["dirty"]) for r in runs})
    return ", ".join(f"`{c}`" + (" (uncommitted changes)" if d else "") for c, d in found)


def render(path: Path = RESULTS) -> dict[str, str]:
    """The page's generated tables, by name: one per step budget, the churn diagnostics and the refresh counts per
    tensor. Names start with the JSON's stem (``lm_study_moments.json``: ``lm-study-moments-3000``, ...)."""
    runs = json.loads(path.read_text())["runs"]
    prefix = path.stem.replace("_", "-")
    tables = {f"{prefix}-{s}": table(runs, s) for s in sorted({r["steps"] for r in runs})}
    diagnosed = [r for r in runs if r["churn"]]
    if diagnosed:
        tables[f"{prefix}-churn"] = churn_table(diagnosed)
    counted = [r for r in runs if r.get("unit_refreshes") and r["config"]["update_interval"] != 1]
    if counted:
        tables[f"{prefix}-refresh-work"] = refresh_table(counted)
    source = f"Source: [`{path.name}`](../benchmarks/results/{path.name}) (commits {commits(runs)})."
    return {name: f"{body}\n\n{source}\n" for name, body in tables.items()}


def write_page(page: Path = PAGE, path: Path = RESULTS) -> None:
    """Replace each ``<!-- table:NAME -->`` block of the page with its rendering; print the ones it lacks."""
    import re

    text = page.read_text()
    for name, body in render(path).items():
        block = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table -->)", re.DOTALL)
        if block.search(text):
            text = block.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
        else:
            print(f"--- {name} (no block in {page.name}) ---\n{body}")
    page.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=[], help="configuration names (see --list)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--diagnose", type=int, default=0, help="churn windows every this many steps (0: none)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report", action="store_true", help="render the tables into docs/language-models.md")
    args = parser.parse_args(argv)
    if args.list:
        for name, config in CONFIGS.items():
            print(f"{name:28s} {describe(asdict(config))}, lr {config.lr:g}")
        return
    unknown = [n for n in args.runs if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; see --list")
    for name in args.runs:
        for seed in args.seeds:
            started = common.provenance()
            record = train(name, seed, args.steps, args.diagnose, args.data_dir)
            merge(args.json, {**record, "provenance": started})
            print(
                f"{name} seed {seed} {record['steps']} steps: val {record['val_bits']:.4f} bits/char, "
                f"refreshes {record['refreshes']} (early {record['early_refreshes']}), "
                f"{record['train_seconds']:.0f} s",
                flush=True,
            )
    if args.report:
        write_page(path=args.json)


if __name__ == "__main__":
    main()
