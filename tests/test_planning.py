"""The plan: targets, overrides, distribution and feasibility, decided from a bare nn.Module, no Trainer."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_topkast import Config, Plan, Selection, TopKASTCallback, plan
from lightning_topkast.distributions import erk
from lightning_topkast.selection import count


def wider() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.Linear(16, 3))


def test_uniform_plan_with_the_defaults() -> None:
    model = wider()
    p = plan(model, Config())
    assert isinstance(p, Plan)
    assert p.densities == {"2.weight": (0.2, 0.5), "4.weight": (0.2, 0.5), "5.weight": (0.2, 0.5)}
    assert p.parameters == {"2.weight": model[2].weight, "4.weight": model[4].weight, "5.weight": model[5].weight}
    assert all(p.parameters[name] is param for name, param in model.named_parameters() if name in p.parameters)
    assert p.global_pool == []
    assert p.pinned == {}
    assert p.shapes == {"0.weight": (32, 8), "2.weight": (24, 32), "4.weight": (16, 24), "5.weight": (3, 16)}
    assert p.selection.kept_dense == {"0.weight": "first layer (dense_first_layer=True)"}


def test_planning_changes_nothing_in_the_model() -> None:
    model = wider()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    plan(model, Config(forward_sparsity=0.9, backward_sparsity=0.8, distribution="erk"))
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_erk_densities_per_tensor() -> None:
    p = plan(wider(), Config(forward_sparsity=0.8, backward_sparsity=0.6, distribution="erk"))
    shapes = {"2.weight": (24, 32), "4.weight": (16, 24), "5.weight": (3, 16)}
    forward, backward = erk(shapes, 0.2), erk(shapes, 0.4)
    assert p.densities == {name: (forward[name], backward[name]) for name in shapes}


def test_global_pool_leaves_pinned_tensors_out() -> None:
    config = Config(distribution="global", sparsity_overrides={"5.weight": (0.5, 0.25)})
    p = plan(wider(), config)
    assert p.global_pool == ["2.weight", "4.weight"]
    assert p.densities["5.weight"] == (0.5, 0.75)
    assert p.pinned == {"5.weight": "5.weight"}


def test_the_last_matching_override_wins() -> None:
    config = Config(sparsity_overrides={"*.weight": (0.5, 0.5), "4.*": (0.9, 0.0)})
    p = plan(wider(), config)
    assert p.densities == {"2.weight": (0.5, 0.5), "4.weight": (0.1, 1.0), "5.weight": (0.5, 0.5)}
    assert p.pinned == {"2.weight": "*.weight", "4.weight": "4.*", "5.weight": "*.weight"}


def test_override_matching_no_masked_tensor_lists_the_masked_ones() -> None:
    message = "TopKASTCallback(sparsity_overrides={'0.weight': [0.5, 0.5]}): '0.weight' names no masked tensor. Masked"
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(wider(), Config(sparsity_overrides={"0.weight": (0.5, 0.5)}))


def test_infeasible_budget_names_forward_sparsity_and_the_largest_feasible_value() -> None:
    with pytest.raises(ValueError, match=r"forward_sparsity=0\.99\): 5\.weight \(48 weights\) would keep.*<= 0\.9895"):
        plan(wider(), Config(forward_sparsity=0.99))


def test_infeasible_override_names_the_override() -> None:
    with pytest.raises(ValueError, match=re.escape("TopKASTCallback(sparsity_overrides={'5.*': [0.995, 0.5]})")):
        plan(wider(), Config(sparsity_overrides={"5.*": (0.995, 0.5)}))


@pytest.mark.parametrize("kind", [nn.Embedding, nn.EmbeddingBag])
def test_sparse_gradient_embeddings_are_refused(kind: type[nn.Module]) -> None:
    model = nn.Sequential(kind(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"nn\.{kind.__name__} has sparse=True.*exclude=\['{kind.__name__}'\]"):
        plan(model, Config(dense_first_layer=False))


def test_a_given_selection_replaces_the_default_targets() -> None:
    model = wider()
    p = plan(model, Config(), Selection(["5.weight", "0.weight"]))
    assert list(p.parameters) == ["5.weight", "0.weight"]
    assert p.selection.reasons == {}


def test_a_selection_naming_no_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"returned '9\.weight', which is not a parameter.*same last name: 0\.weight"):
        plan(wider(), Config(), Selection(["9.weight"]))


def test_a_selection_naming_a_tied_tensor_twice_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert list(plan(model, Config(dense_first_layer=False)).parameters) == ["0.weight"]
    with pytest.raises(ValueError, match=r"returned '0\.weight' and '1\.weight', which are one tied tensor"):
        plan(model, Config(), Selection(["0.weight", "1.weight"]))
    # either name works on its own
    assert plan(model, Config(), Selection(["1.weight"])).parameters["1.weight"] is model[0].weight


def test_callback_plan_is_the_same_plan_with_its_arguments_and_select_targets() -> None:
    class OnlyLast(TopKASTCallback):
        def select_targets(self, pl_module: nn.Module) -> Selection:
            return Selection(["5.weight"])

    model = wider()
    assert TopKASTCallback(forward_sparsity=0.9, backward_sparsity=0.8).plan(model) == plan(
        model, Config(forward_sparsity=0.9, backward_sparsity=0.8)
    )
    p = OnlyLast().plan(model)
    assert list(p.densities) == ["5.weight"]
    assert count(p.densities["5.weight"][0], 48) == 10
