"""Which parameters are masked: default layer types, first/last layer, include/exclude, tied weights, errors."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_topkast.targets import DEFAULT_REASON, candidates, glob_match, select


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


def test_defaults_mask_every_candidate() -> None:
    selection = select(Zoo(), dense_first_layer=False)
    assert selection.masked == ZOO_DEFAULTS
    assert selection.kept_dense == {}
    assert selection.reasons == dict.fromkeys(ZOO_DEFAULTS, DEFAULT_REASON)
    assert selection.notes == []


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


def test_never_masked_lists_every_other_parameter_with_its_reason() -> None:
    never = select(Zoo()).never_masked
    assert never == {
        "conv.bias": "bias or other 1-D parameter",
        "bn.weight": "normalisation layer (BatchNorm2d)",
        "bn.bias": "normalisation layer (BatchNorm2d)",
        "attn.in_proj_bias": "bias or other 1-D parameter",
        "attn.out_proj.bias": "bias or other 1-D parameter",
        "norm.weight": "normalisation layer (LayerNorm)",
        "norm.bias": "normalisation layer (LayerNorm)",
        "lstm.bias_ih_l0": "bias or other 1-D parameter",
        "lstm.bias_hh_l0": "bias or other 1-D parameter",
        "group_norm.weight": "normalisation layer (GroupNorm)",
        "group_norm.bias": "normalisation layer (GroupNorm)",
        "head.bias": "bias or other 1-D parameter",
    }
    assert set(never) | {c.name for c in candidates(Zoo())} == {n for n, _ in Zoo().named_parameters()}


class Wild(nn.Module):
    """Parameters as research code writes them: raw matrices, a hand-written norm, a frozen table, an int buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(8, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.scale = nn.Parameter(torch.ones(8))
        self.rms = LlamaRMSNorm()
        self.frozen = nn.Parameter(torch.randn(5, 8), requires_grad=False)
        self.counts = nn.Parameter(torch.zeros(3, 3, dtype=torch.long), requires_grad=False)
        self.out = nn.Linear(8, 2)


class LlamaRMSNorm(nn.Module):
    """A norm written by hand with a 2-D weight: recognised by its class name."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 8))


def test_raw_parameters_are_masked_by_default_and_frozen_ones_kept_dense() -> None:
    selection = select(Wild(), dense_first_layer=False)
    assert selection.masked == ["w_in", "cls_token", "out.weight"]
    assert selection.kept_dense == {"frozen": "frozen (requires_grad=False)"}
    assert selection.never_masked == {
        "scale": "bias or other 1-D parameter",
        "counts": "not floating point (torch.int64)",
        "rms.weight": "normalisation layer (LlamaRMSNorm)",
        "out.bias": "bias or other 1-D parameter",
    }
    # an explicit include masks a frozen tensor too: the user's word
    assert select(Wild(), include=["frozen"]).masked == ["frozen"]


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


def test_raw_parameter_used_functionally_is_masked_by_default() -> None:
    model = RawParameter()
    assert model(torch.ones(2, 4)).shape == (2, 3)
    assert select(model, dense_first_layer=False).masked == ["w", "lin.weight"]
    assert select(model, include=["w"]).masked == ["w"]
    assert select(model, include=["RawParameter"]).masked == ["w"]


# --- include wins over the first/last switches ------------------------------------------------------------------------


def test_include_is_not_trimmed_by_the_first_layer_rule() -> None:
    """The bug: include=['fc*.weight'] silently kept fc1 (87% of the model) dense and masked only fc2."""
    model = nn.Module()
    model.fc1 = nn.Linear(100, 87)
    model.fc2 = nn.Linear(87, 15)
    selection = select(model, include=["fc*.weight"])
    assert selection.masked == ["fc1.weight", "fc2.weight"]
    assert selection.reasons == {"fc1.weight": "include 'fc*.weight'", "fc2.weight": "include 'fc*.weight'"}
    assert selection.kept_dense == {}
    selection = select(model, include=["fc*.weight"], dense_first_layer=True, dense_last_layer=True)
    assert selection.masked == ["fc1.weight", "fc2.weight"]


def test_include_reports_what_it_left_out() -> None:
    selection = select(mlp(2, 3, 4), include=["1.*"])
    assert selection.masked == ["1.weight"]
    assert selection.kept_dense == {"0.weight": "not matched by include"}


def test_exclude() -> None:
    assert select(Zoo(), exclude=["LSTM", "head.weight"], dense_first_layer=False).masked == [
        "embed.weight",
        "conv.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]
    selection = select(Zoo(), include=["attn.*"], exclude=["*out_proj*"])
    assert selection.masked == ["attn.in_proj_weight"]
    assert selection.kept_dense["attn.out_proj.weight"] == "exclude '*out_proj*'"
    assert selection.kept_dense["conv.weight"] == "not matched by include"


def test_exclude_applies_before_the_first_layer_rule() -> None:
    selection = select(mlp(2, 3, 4, 5), exclude=["0.weight"])
    assert selection.masked == ["2.weight"]
    assert selection.kept_dense == {
        "0.weight": "exclude '0.weight'",
        "1.weight": "first layer (dense_first_layer=True)",
    }


# --- one-layer models -------------------------------------------------------------------------------------------------


def test_one_layer_model_is_masked_anyway_with_a_note() -> None:
    selection = select(mlp(32, 2))
    assert selection.masked == ["0.weight"]
    assert selection.kept_dense == {}
    assert selection.reasons == {"0.weight": "masked anyway: dense_first_layer=True would leave nothing to mask"}
    assert selection.notes == [
        "TopKASTCallback(dense_first_layer=True) would keep 0.weight dense, and it is all there is to mask: masking "
        "it anyway. Pass dense_first_layer=False to silence this, or exclude=['0.weight'] to train it dense."
    ]
    assert select(mlp(32, 2), dense_first_layer=False).notes == []


def test_two_layers_with_both_switches_are_masked_anyway() -> None:
    selection = select(mlp(4, 3, 2), dense_last_layer=True)
    assert selection.masked == ["0.weight", "1.weight"]
    assert selection.notes[0].startswith(
        "TopKASTCallback(dense_first_layer=True, dense_last_layer=True) would keep 0.weight, 1.weight dense"
    )
    # one of three left masked: the switches apply as asked, no note
    assert select(mlp(4, 3, 2, 2), dense_last_layer=True).notes == []


def test_one_layer_left_after_exclude_is_masked_anyway() -> None:
    selection = select(mlp(2, 3, 4), exclude=["1.weight"])
    assert selection.masked == ["0.weight"]
    assert selection.kept_dense == {"1.weight": "exclude '1.weight'"}
    assert len(selection.notes) == 1


# --- one matcher ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern", "hit"),
    [
        ("net.2.weight", "net.2.weight", True),
        ("net.2.weight", "net.*", True),
        ("net.2.weight", "net.[46].weight", False),
        ("net.4.weight", "net.[46].weight", True),
        ("net.[46].weight", "net.[46].weight", True),  # a literal name wins over the glob reading
        ("Net.2.weight", "net.*", False),  # case-sensitive on every platform
    ],
)
def test_glob_match(name: str, pattern: str, hit: bool) -> None:
    assert glob_match(name, pattern) is hit


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
        ValueError, match=r"found no parameter to mask: Top-KAST masks floating-point parameters .*The "
    ):
        select(model, dense_first_layer=False)


def test_exclude_that_leaves_nothing_names_exclude() -> None:
    """The bug: exclude=['Conv2d', 'Linear'] reported 'no parameter to mask with the defaults'."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    message = (
        "TopKASTCallback(exclude=['Conv2d', 'Linear']): exclude removes every candidate, leaving nothing to mask. "
        "Remove a pattern from exclude. Candidates: '0.weight', '2.weight'; module types: 'Conv2d', 'Linear'."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        select(model, exclude=["Conv2d", "Linear"])


def test_exclude_that_removes_everything_included_names_both() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "TopKASTCallback(include=['*'], exclude=['Linear']): exclude removes every tensor that include selects"
        ),
    ):
        select(mlp(2, 3, 4), include=["*"], exclude=["Linear"])


def test_empty_include_names_include() -> None:
    with pytest.raises(ValueError, match=re.escape("TopKASTCallback(include=[]): selects no parameter to mask.")):
        select(mlp(2, 3, 4), include=[])


def test_all_frozen_says_so() -> None:
    model = mlp(2, 3, 4).requires_grad_(False)
    with pytest.raises(ValueError, match=r"every candidate is frozen \(requires_grad=False\)\. Name the ones"):
        select(model)
