"""benchmarks/lm_study.py: its page holds what its JSON says, and its screens of hypothesis 2 do what the page says."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import MLP, make_loader, make_trainer

from lightning_topkast import TopKASTCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm_study  # noqa: E402


@pytest.mark.parametrize("path", sorted(lm_study.RESULTS.parent.glob("lm_study*.json")), ids=lambda p: p.name)
def test_the_study_page_holds_what_its_json_says(path: Path) -> None:
    page = lm_study.PAGE.read_text()
    for name, body in lm_study.render(path).items():
        block = re.search(rf"<!-- table:{name} -->\n(.*?)<!-- /table -->", page, re.DOTALL)
        assert block is not None, f"docs/language-models.md has no table {name}"
        assert block.group(1) == body, (
            f"table {name} differs from {path.name}: python benchmarks/lm_study.py --json {path} --report"
        )


class _Check(L.Callback):
    """After the screen's hook: every state is zero outside B, and the entrants to B hold what ``how`` gives them."""

    def __init__(self, topkast: TopKASTCallback, how: str) -> None:
        self.topkast, self.how = topkast, how
        self.before: dict[str, torch.Tensor] = {}
        self.entrants = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        self.before = {name: t.backward_set for name, t in self.topkast.engine.tensors.items()}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        for name, t in self.topkast.engine.tensors.items():
            states, b = t.optimizer_states(trainer.optimizers[0]), t.backward_set
            assert set(states) == {"exp_avg", "exp_avg_sq"}
            assert all(int(s[~b].count_nonzero()) == 0 for s in states.values()), name  # nothing outside B moves
            entrants = b & ~self.before[name]
            self.entrants += int(entrants.sum())
            v = states["exp_avg_sq"]
            if self.how == "mean-v" and entrants.any():
                assert torch.equal(v[entrants], v[b & ~entrants].mean().expand(int(entrants.sum()))), name
            if self.how == "zero":
                assert int(v[entrants].count_nonzero()) == 0, name


@pytest.mark.parametrize("how", ["zero", "mean-v", "kept"])
def test_entrant_moments_set_what_the_study_says_and_nothing_outside_b(tmp_path: Path, how: str) -> None:
    topkast = TopKASTCallback(exploration_penalty=3e-2, decoupled_penalty=True, verbose=False)
    callbacks: list[L.Callback] = [topkast]
    hook = lm_study.EntrantMoments(topkast, how) if how != "zero" else None
    callbacks += [hook] if hook is not None else []
    check = _Check(topkast, how)
    counter = lm_study.UnitRefreshes(topkast)
    make_trainer(tmp_path, [*callbacks, check, counter], max_epochs=6).fit(
        MLP(optimizer="adamw", lr=0.05), make_loader()
    )
    assert check.entrants > 0  # B changed: the hook had work to do
    assert counter.counts == {"net.2.weight": 24, "net.4.weight": 24}  # every step refreshes at update_interval=1
    assert counter.sizes == {"net.2.weight": 256, "net.4.weight": 48}
    if hook is not None:
        assert 0 < hook.given <= check.entrants
        if how == "mean-v":
            assert hook.given == check.entrants
