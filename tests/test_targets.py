"""Which parameters are masked: default layer types, first/last layer, include/exclude, tied weights, errors."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_topkast.targets import Selection, candidates, select


class Zoo(nn.Module):
    """One of every default layer type, with norms and biases around them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm((2, 4))  # a 2-D norm weight: still never masked
        self.lstm = nn.LSTM(8, 4)
        self.group_norm = nn.GroupNorm(1, 4)
        self.head = nn.Linear(4, 3)


ZOO_DEFAULTS = [
    "embed.weight",
    "conv.weight",
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "lstm.weight_ih_l0",
    "lstm.weight_hh_l0",
    "head.weight",
]


class MyLinear(nn.Linear):
    pass


class RawParameter(nn.Module):
    """A weight used through ``F.linear``, owned by no default layer type."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.lin(x), self.w)


def mlp(*sizes: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(i, o) for i, o in itertools.pairwise(sizes)])


# --- defaults ---------------------------------------------------------------------------------------------------------


def test_defaults_mask_every_default_layer_weight() -> None:
    selection = select(Zoo(), dense_first_layer=False)
    assert selection == Selection(ZOO_DEFAULTS, {})


def test_defaults_never_mask_biases_or_norms() -> None:
    model = Zoo()
    masked = set(select(model, dense_first_layer=False).masked)
    for name, _ in model.named_parameters():
        if "bias" in name or name.startswith(("bn.", "norm.", "group_norm.")):
            assert name not in masked, name
    # norm parameters are not even candidates, whatever their shape
    assert model.norm.weight.ndim == 2
    assert all(not c.name.startswith(("bn.", "norm.", "group_norm.")) for c in candidates(model))
    assert all(c.param.ndim >= 2 for c in candidates(model))


def test_defaults_keep_the_first_layer_dense() -> None:
    selection = select(Zoo())
    assert selection.masked == ZOO_DEFAULTS[1:]
    assert selection.kept_dense == {"embed.weight": "first layer (dense_first_layer=True)"}


def test_dense_last_layer() -> None:
    selection = select(mlp(2, 3, 4, 5), dense_last_layer=True)
    assert selection.masked == ["1.weight"]
    assert selection.kept_dense == {
        "0.weight": "first layer (dense_first_layer=True)",
        "2.weight": "last layer (dense_last_layer=True)",
    }
    selection = select(mlp(2, 3, 4, 5), dense_first_layer=False, dense_last_layer=True)
    assert selection.masked == ["0.weight", "1.weight"]
    assert list(selection.kept_dense) == ["2.weight"]


def test_other_default_types() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.ConvTranspose2d(3, 2, 2), nn.GRU(4, 4, num_layers=2), nn.RNN(4, 2), MyLinear(2, 2)
    )
    assert select(model, dense_first_layer=False).masked == [
        "0.weight",
        "1.weight",
        "2.weight_ih_l0",
        "2.weight_hh_l0",
        "2.weight_ih_l1",
        "2.weight_hh_l1",
        "3.weight_ih_l0",
        "3.weight_hh_l0",
        "4.weight",
    ]


def test_candidates_in_registration_order() -> None:
    names = [c.name for c in candidates(Zoo())]
    assert names == ZOO_DEFAULTS


# --- tied weights -----------------------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weight_appears_once_under_its_first_name() -> None:
    model = TiedLM()
    assert [c.name for c in candidates(model)] == ["embed.weight", "hidden.weight"]
    assert select(model, dense_first_layer=False).masked == ["embed.weight", "hidden.weight"]
    assert select(model).masked == ["hidden.weight"]
    # the tied head is the same tensor as the embedding: excluding it by either name excludes both
    assert select(model, exclude=["Embedding"], dense_first_layer=False).masked == ["hidden.weight"]


# --- include / exclude ------------------------------------------------------------------------------------------------


def test_include_by_glob() -> None:
    selection = select(Zoo(), include=["lstm.*", "attn.*proj*"], dense_first_layer=False)
    assert selection.masked == ["attn.in_proj_weight", "attn.out_proj.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0"]


def test_include_by_module_class_name() -> None:
    assert select(Zoo(), include=["Conv2d", "Embedding"], dense_first_layer=False).masked == [
        "embed.weight",
        "conv.weight",
    ]
    # MultiheadAttention owns in_proj_weight; its out_proj is a Linear subclass
    assert select(Zoo(), include=["MultiheadAttention"], dense_first_layer=False).masked == ["attn.in_proj_weight"]


def test_include_class_name_matches_subclasses() -> None:
    model = nn.Sequential(MyLinear(2, 3), nn.Conv2d(1, 1, 1), MyLinear(3, 4))
    assert select(model, include=["Linear"], dense_first_layer=False).masked == ["0.weight", "2.weight"]
    assert select(model, include=["MyLinear"], dense_first_layer=False).masked == ["0.weight", "2.weight"]
    assert select(Zoo(), include=["Linear"], dense_first_layer=False).masked == ["attn.out_proj.weight", "head.weight"]


def test_raw_parameter_used_functionally_is_selectable_by_name() -> None:
    model = RawParameter()
    assert model(torch.ones(2, 4)).shape == (2, 3)
    assert select(model, dense_first_layer=False).masked == ["lin.weight"]  # not a default layer type
    assert select(model, include=["w"], dense_first_layer=False).masked == ["w"]
    assert select(model, include=["RawParameter"], dense_first_layer=False).masked == ["w"]


def test_include_still_applies_the_first_layer_rule() -> None:
    selection = select(mlp(2, 3, 4), include=["*.weight"])
    assert selection.masked == ["1.weight"]
    assert list(selection.kept_dense) == ["0.weight"]


def test_exclude() -> None:
    assert select(Zoo(), exclude=["LSTM", "head.weight"], dense_first_layer=False).masked == [
        "embed.weight",
        "conv.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]
    assert select(Zoo(), include=["attn.*"], exclude=["*out_proj*"], dense_first_layer=False).masked == [
        "attn.in_proj_weight"
    ]


def test_exclude_applies_before_the_first_layer_rule() -> None:
    selection = select(mlp(2, 3, 4, 5), exclude=["0.weight"])
    assert selection.masked == ["2.weight"]
    assert list(selection.kept_dense) == ["1.weight"]


# --- errors -----------------------------------------------------------------------------------------------------------


def test_include_matching_nothing_quotes_it_and_lists_candidates() -> None:
    message = (
        "TopKASTCallback(include=[..., 'encoder.*', ...]): 'encoder.*' matches no parameter of two or more "
        "dimensions by name (glob) or module type. Candidates: 'embed.weight', 'conv.weight'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        select(Zoo(), include=["conv.weight", "encoder.*"])


def test_exclude_matching_nothing_names_the_argument_and_module_types() -> None:
    with pytest.raises(ValueError, match=r"exclude=\[\.\.\., 'Conv3d', \.\.\.\]\).*'Conv3d' matches no parameter"):
        select(Zoo(), exclude=["Conv3d"])
    with pytest.raises(ValueError, match=r"module types: 'Embedding', 'Conv2d', 'MultiheadAttention', 'NonDynamically"):
        select(Zoo(), exclude=["Conv3d"])


@pytest.mark.parametrize("pattern", ["head.bias", "norm.weight", "bn.weight"])
def test_patterns_for_biases_and_norms_match_nothing(pattern: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{pattern!r} matches no parameter")):
        select(Zoo(), include=[pattern])


def test_candidate_list_is_truncated() -> None:
    with pytest.raises(ValueError, match=re.escape("'7.weight', ...; module types: 'Linear'.")):
        select(mlp(*range(2, 13)), include=["nothing"])


def test_model_with_nothing_to_mask() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.BatchNorm1d(4))
    with pytest.raises(
        ValueError, match=r"found no parameter to mask with the defaults\. .*The model has no parameter"
    ):
        select(model, dense_first_layer=False)


def test_one_layer_model_says_to_pass_dense_first_layer_false() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "found no parameter to mask with the defaults and kept dense: 0.weight (first layer "
            "(dense_first_layer=True))"
        ),
    ) as excinfo:
        select(mlp(3, 2))
    assert "dense_first_layer=False" in str(excinfo.value)
    assert select(mlp(3, 2), dense_first_layer=False).masked == ["0.weight"]


def test_excluding_everything_raises_with_the_patterns() -> None:
    with pytest.raises(ValueError, match=re.escape("include=['*'], exclude=['Linear']")):
        select(mlp(2, 3, 4), include=["*"], exclude=["Linear"], dense_first_layer=False)


def test_model_with_only_custom_parameters_has_nothing_by_default() -> None:
    model = nn.Module()
    model.register_parameter("table", nn.Parameter(torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"Candidates: 'table'; module types: 'Module'"):
        select(model, dense_first_layer=False)
    assert select(model, include=["table"], dense_first_layer=False).masked == ["table"]
