"""The device path (GPUs), run on CPU: the batched exact selection, the flat groups' passes, and their launches.

The Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py where no GPU is), which
executes each program with numpy: slow, so these tests use few, small tensors. The torch passes run as they would
on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_topkast import TopKAST, state, triton_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import launches

from lightning_topkast.batched import Queries, select_by_sort
from lightning_topkast.device import FlatGroup

needs_triton = pytest.mark.skipif(triton_kernels.triton is None, reason="needs triton (pip install triton numpy)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, 3.0, 1e-3, math.nan, math.inf, -math.inf]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


# --- an oracle that shares no code with the library --------------------------------------------------------------


def _order(values: Tensor) -> Tensor:
    """Indices by decreasing |value|, ties by index (a stable sort), NaN last, -0 tied with +0."""
    magnitude = values.double().abs()
    return torch.argsort(torch.where(magnitude.isnan(), -1.0, magnitude), descending=True, stable=True)


def _score(values: Tensor, index: int) -> int:
    """The bits of |value| as an integer, -1 for NaN."""
    if bool(values[index].isnan()):
        return -1
    bits = int(values[index : index + 1].view(_INT[values.dtype]).item())
    return bits & ((1 << (8 * values.element_size() - 1)) - 1)


def _expected(values: Tensor, k: int) -> tuple[int, int]:
    """The threshold naming the k-th entry of the order (for k = 0 the first, split at its index)."""
    order = _order(values)
    named = int(order[max(k, 1) - 1])
    return _score(values, named), named + (1 if k > 0 else 0)


@st.composite
def segments(draw: st.DrawFn, max_segments: int = 5, max_size: int = 120) -> tuple[Tensor, list[int], list[int]]:
    """A flat buffer of several segments of uneven sizes (ties, ±0, NaN, ±inf), and k per query (two a segment)."""
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_segments))
    pool = SPECIALS + draw(st.lists(st.floats(-4, 4, width=16), min_size=1, max_size=6))
    values = torch.tensor(draw(st.lists(st.sampled_from(pool), min_size=sum(sizes), max_size=sum(sizes))))
    ks = [draw(st.integers(0, size)) for size in sizes for _ in range(2)]
    return values.to(dtype), sizes, ks


def _queries(sizes: list[int], ks: list[int]) -> Queries:
    return Queries(tuple(sizes), tuple(s for s in range(len(sizes)) for _ in range(2)), tuple(ks))


def _scores(values: Tensor) -> Tensor:
    from lightning_topkast import kernels

    return kernels.scores(values)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments())
def test_the_sort_names_the_kth_entry_of_the_stable_order(case: tuple[Tensor, list[int], list[int]]) -> None:
    from lightning_topkast import kernels

    values, sizes, ks = case
    queries = _queries(sizes, ks)
    found = select_by_sort(_scores(values), queries, kernels.infinity_score(values.dtype))
    for q, (segment, k) in enumerate(zip(queries.segment, ks, strict=True)):
        start = queries.starts[segment]
        assert tuple(found[q].tolist()) == _expected(values[start : start + sizes[segment]], k), (q, k)


@settings(max_examples=80, deadline=None)
@given(segments())
def test_the_sorts_thresholds_select_exactly_k_entries(case: tuple[Tensor, list[int], list[int]]) -> None:
    """The sets, as the engine computes them from the thresholds, against the first k of the stable order."""
    from lightning_topkast import kernels

    values, sizes, ks = case
    queries = _queries(sizes, ks)
    found = select_by_sort(_scores(values), queries, kernels.infinity_score(values.dtype))
    for q, (segment, k) in enumerate(zip(queries.segment, ks, strict=True)):
        start = queries.starts[segment]
        chunk = values[start : start + sizes[segment]]
        selected = kernels.at_least(kernels.scores(chunk), kernels.Threshold(*found[q].tolist()))
        expected = torch.zeros(chunk.numel(), dtype=torch.bool)
        expected[_order(chunk)[:k]] = True
        assert torch.equal(selected, expected), (q, k)


@needs_triton
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments(max_segments=3, max_size=80))
def test_the_radix_select_equals_the_sort_bit_for_bit(case: tuple[Tensor, list[int], list[int]]) -> None:
    """Under the interpreter, with tiles of 8 entries so that segments span several tiles (more than a block of
    tiles, which the tie pick walks a block at a time) and ties cross them."""
    from lightning_topkast import kernels

    values, sizes, ks = case
    queries = _queries(sizes, ks)
    plan = triton_kernels.RadixPlan(queries, values.dtype, block=4, blocks_per_tile=2)
    expected = select_by_sort(_scores(values), queries, kernels.infinity_score(values.dtype))
    assert torch.equal(triton_kernels.select_by_radix(values, plan), expected)


@needs_triton
def test_the_radix_select_on_a_tensor_of_one_value_and_one_of_nans() -> None:
    """Every entry ties (the tie pass decides alone), and a segment of NaN only."""
    values = torch.cat([torch.full((50,), 0.25), torch.full((7,), math.nan), torch.tensor([-0.0, 0.0])])
    queries = Queries((50, 7, 2), (0, 0, 0, 0, 1, 1, 2, 2), (0, 1, 17, 50, 3, 7, 1, 2))
    plan = triton_kernels.RadixPlan(queries, values.dtype, block=4, blocks_per_tile=2)
    found = triton_kernels.select_by_radix(values, plan)
    assert found.tolist() == [
        [_score(values, 0), 0], [_score(values, 0), 1], [_score(values, 0), 17], [_score(values, 0), 50],
        [-1, 3], [-1, 7], [0, 1], [0, 2],
    ]  # fmt: skip


# --- the engine's flat groups against the per-tensor host path --------------------------------------------------


def _model(layers: int = 4, width: int = 12, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(dtype)


def _engine(model: nn.Module, densities: dict[str, tuple[float, float]] | None = None, **kwargs: object) -> TopKAST:
    """conftest's engine over the model's weight matrices, at 75/40 unless ``densities`` say otherwise."""
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    return make_engine(params, densities or (0.25, 0.6), **kwargs)


def _train(model: nn.Module, engine: TopKAST, optimizer: torch.optim.Optimizer, steps: int, skip: str = "") -> None:
    g = torch.Generator().manual_seed(1)
    first = next(model.parameters())
    for _ in range(steps):
        x = torch.randn(6, first.shape[1], generator=g, dtype=torch.float64).to(first.dtype).to(first.device)
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x), x).backward()
        if skip:  # a tensor the loss does not reach this step
            model.get_submodule(skip).weight.grad = None
        engine.before_step(optimizer)
        optimizer.step()


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    params = list(model.parameters())  # two groups with their own learning rates: per-tensor decoupled penalties
    return torch.optim.SGD(
        [{"params": params[:4], "lr": 0.1}, {"params": params[4:], "lr": 0.05}], momentum=0.9, weight_decay=0.01
    )


@contextlib.contextmanager
def _kernels(kind: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The device path's passes as torch operations ("torch"), or Triton under the interpreter ("triton")."""
    if kind == "triton":
        if triton_kernels.triton is None:
            pytest.skip("needs triton (pip install triton numpy)")
        monkeypatch.setattr(triton_kernels, "ON_CPU", True)
    yield


def _both_paths(kind: str, monkeypatch: pytest.MonkeyPatch, **config: object) -> tuple[TopKAST, TopKAST]:
    optimizer_kind = str(config.pop("optimizer", "adamw"))
    steps = int(config.pop("steps", 4 if kind == "triton" else 6))  # type: ignore[call-overload]
    skip = str(config.pop("skip", ""))
    dtype = config.pop("dtype", torch.float32 if kind == "triton" else torch.float64)
    densities = config.pop("densities", None)
    engines, turnovers = [], []
    for sync_free in (False, True):
        model = _model(dtype=dtype)  # type: ignore[arg-type]
        engine = _engine(model, densities, sync_free=sync_free, compiled=False, **config)  # type: ignore[arg-type]
        optimizer = _optimizer(model, optimizer_kind)
        heard: list[dict[str, tuple[int, int]]] = []
        engine.refresh_listeners.append(lambda moved, heard=heard: heard.append(_as_ints(moved)))
        with _kernels(kind, monkeypatch) if sync_free else contextlib.nullcontext():
            engine.attach([optimizer])
            _train(model, engine, optimizer, steps, skip)
        engines.append(engine)
        turnovers.append(heard)
    assert turnovers[0] == turnovers[1]  # the members that left A and its size, per tensor and refresh
    return engines[0], engines[1]


def _as_ints(moved: dict[str, tuple[object, object]]) -> dict[str, tuple[int, int]]:
    return {name: (int(left), int(size)) for name, (left, size) in moved.items()}  # type: ignore[call-overload]


def _assert_same(host: TopKAST, device: TopKAST) -> None:
    assert device.refreshes == host.refreshes
    for name, tensor in host.tensors.items():
        assert torch.equal(tensor.theta, device.tensors[name].theta), name
        assert torch.equal(tensor.code, device.tensors[name].code), name
        assert torch.equal(tensor.param, device.tensors[name].param), name


TRITON_MARKS = [needs_triton, pytest.mark.slow]
KINDS = ["torch", pytest.param("triton", marks=TRITON_MARKS)]
# the interpreter runs each Triton program in Python: the Triton cases take float32 (3 radix rounds, not fp64's 6)
CONFIGS = {
    "adamw, coupled penalty": {},
    "sgd, two learning rates, decoupled penalty": {"optimizer": "sgd", "decoupled_penalty": True, "penalty": 0.01},
    "densities per tensor (erk-like)": {
        "densities": {"0.weight": (0.5, 0.75), "1.weight": (0.25, 0.6), "2.weight": (0.1, 0.1), "3.weight": (0.3, 1.0)}
    },
    "a global pool": {"global_pool": ("1.weight", "2.weight")},
    "a tensor without a gradient": {"skip": "2"},
    "interval 3": {"update_interval": 3},
    "float32": {"dtype": torch.float32},
    "bfloat16 (Triton selects, torch passes)": {"dtype": torch.bfloat16, "penalty": 0.0},
}


# under the interpreter, the configurations whose kernels differ (the torch passes take them all)
_TRITON_CONFIGS = (
    "adamw, coupled penalty",
    "sgd, two learning rates, decoupled penalty",
    "a global pool",
    "a tensor without a gradient",
    "bfloat16 (Triton selects, torch passes)",
)


@pytest.mark.parametrize(
    ("kind", "config"),
    [("torch", config) for config in CONFIGS]
    + [pytest.param("triton", config, marks=TRITON_MARKS) for config in _TRITON_CONFIGS],
)
def test_flat_groups_step_as_the_host_path_bit_for_bit(kind: str, config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    host, device = _both_paths(kind, monkeypatch, **CONFIGS[config])
    assert host._flat == {}
    assert len(device._flat[0]) == 1  # one group: every tensor in one flat buffer
    expected = triton_kernels.TritonGroup if kind == "triton" else FlatGroup
    assert type(device._flat[0][0]) is expected
    _assert_same(host, device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "densities", [None, {"0.weight": (0.5, 0.75), "1.weight": (0.25, 0.6), "2.weight": (0.1, 0.3)}]
)
def test_flat_groups_keep_the_one_step_late_early_refresh(
    kind: str, densities: dict[str, tuple[float, float]] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Early refreshes read their test a step late on the device path: the same steps, sets and turnover as the
    per-tensor sync-free passes, which do the same (with densities per tensor, some refreshes are of some units)."""
    runs, turnovers = [], []
    for batched in (False, True):
        model = _model(layers=3)
        engine = _engine(model, densities, sync_free=True, compiled=False, update_interval=50, early_refresh=0.02)
        engine.batched_passes = batched
        heard: list[dict[str, tuple[int, int]]] = []
        engine.refresh_listeners.append(lambda moved, heard=heard: heard.append(_as_ints(moved)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        with _kernels(kind, monkeypatch):
            engine.attach([optimizer])
            _train(model, engine, optimizer, 8)
        assert bool(engine._flat) is batched
        runs.append(engine)
        turnovers.append(heard)
    per_tensor, flat = runs
    assert 0 < flat.early_refreshes == per_tensor.early_refreshes < 8
    assert flat.refreshes == per_tensor.refreshes
    assert turnovers[0] == turnovers[1]
    if densities is not None:
        assert any(len(moved) < len(flat.tensors) for moved in turnovers[1])  # a refresh of some units only
    for name, tensor in per_tensor.tensors.items():
        assert torch.equal(tensor.code, flat.tensors[name].code), name
        assert torch.equal(tensor.theta, flat.tensors[name].theta), name


def test_a_flat_group_resumes_bit_exactly() -> None:
    """State saved mid-run and loaded into a fresh engine continues as the run that was not interrupted."""
    model = _model()
    engine = _engine(model, sync_free=True, update_interval=2, early_refresh=0.05)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    engine.attach([optimizer])
    _train(model, engine, optimizer, 3)
    saved = copy.deepcopy((engine.state_dict(), optimizer.state_dict(), model.state_dict()))  # they hold references
    _train(model, engine, optimizer, 3)

    resumed_model = _model(seed=5)
    resumed_model.load_state_dict(saved[2])
    resumed = _engine(resumed_model, sync_free=True, update_interval=2, early_refresh=0.05)
    resumed_optimizer = torch.optim.AdamW(resumed_model.parameters(), lr=0.05)
    resumed_optimizer.load_state_dict(saved[1])
    resumed.attach([resumed_optimizer])
    resumed.load_state_dict(saved[0])
    _train(resumed_model, resumed, resumed_optimizer, 3)
    assert resumed.state_dict()["steps"] == engine.state_dict()["steps"]
    for name, tensor in engine.tensors.items():
        assert torch.equal(tensor.theta, resumed.tensors[name].theta), name
        assert torch.equal(tensor.code, resumed.tensors[name].code), name
    assert torch.equal(engine._flat[0][0].thresholds, resumed._flat[0][0].thresholds)


# --- launches: the number of operations in a step does not grow with the number of tensors --------------------------

# The counts README.md, docs/refresh.md and docs/results.md state (benchmarks/launches.py prints them). The target
# is 40: both meet it (the torch passes exactly, when they refresh).
STATED = {"triton": {1: 25, 100: 12}, "torch": {1: 40, 100: 38}}


@pytest.mark.parametrize("kind", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("update_interval", [1, 100])
def test_launches_per_step_do_not_grow_with_the_number_of_tensors(kind: str, update_interval: int) -> None:
    """Counted by benchmarks/launches.py's counter (torch operations that are not views, and Triton kernels)."""
    few = launches.launches_per_step(22, update_interval, kind)
    many = launches.launches_per_step(82, update_interval, kind)
    assert few == many
    assert len(set(many)) == 1
    assert many == [STATED[kind][update_interval]] * len(many)


def test_the_per_tensor_passes_launch_in_proportion_to_the_tensors() -> None:
    """The counter sees what it should: the per-tensor device passes grow with the tensors (2,024 and 7,544 ops a
    step were counted on the demo Transformers before the flat groups)."""
    few = launches.launches_per_step(22, 1, "per tensor", steps=2)
    many = launches.launches_per_step(82, 1, "per tensor", steps=2)
    assert many[0] > 3 * few[0] > 3 * 40


# --- a real Lightning fit through the device path ----------------------------------------------------------------


@pytest.mark.parametrize("early_refresh", [None, 0.05])
def test_a_lightning_fit_on_the_device_path_keeps_every_invariant(
    early_refresh: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callback as on a GPU (the engine's device is taken for CUDA), in a real Trainer.fit on CPU tensors."""
    import lightning as L
    from conftest import MLP, make_loader

    from lightning_topkast import TopKASTCallback

    monkeypatch.setattr(state, "_on_cuda", lambda params: True)
    callback = TopKASTCallback(
        forward_sparsity=0.75, backward_sparsity=0.5, update_interval=2, early_refresh=early_refresh
    )
    refreshed: list[list[str]] = []

    class Listen(L.Callback):  # after the Top-KAST callback, whose engine exists by then
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            callback.engine.refresh_listeners.append(lambda moved: refreshed.append(sorted(moved)))

    trainer = L.Trainer(
        max_epochs=2, callbacks=[callback, Listen()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    model = MLP(optimizer="adamw", lr=0.05)
    trainer.fit(model, make_loader())
    engine = callback.engine
    assert engine.sync_free is True
    assert engine._flat == {}  # detached at the fit's end: the groups go with the optimizer hooks
    assert engine.refreshes == len(refreshed) >= trainer.global_step // 2
    # listeners hear of each refreshed tensor by name, as on the host path (the logged turnover sums them)
    assert all(names and set(names) <= set(engine.tensors) for names in refreshed)
    assert sorted(engine.tensors) in refreshed
    for tensor in engine.tensors.values():
        a, b = tensor.forward_set, tensor.backward_set
        assert int(a.sum()) == math.floor(0.25 * tensor.numel + 0.5)
        assert int(b.sum()) == math.floor(0.5 * tensor.numel + 0.5)
        assert bool((b | ~a).all())
        assert torch.equal(tensor.param.detach(), torch.where(a, tensor.theta, 0))


# --- on a GPU (pytest -m cuda): the compiled kernels -----------------------------------------------------------------


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_on_a_gpu_the_radix_select_equals_the_sort(dtype: torch.dtype) -> None:
    """Compiled for the GPU, over 300 segments of uneven sizes (up to a million entries) with many ties."""
    from lightning_topkast import kernels

    g = torch.Generator().manual_seed(0)
    sizes = [*torch.randint(1, 20_000, (300,), generator=g).tolist(), 1_000_000]
    values = torch.randn(sum(sizes), generator=g).to(dtype)
    values[::5] = values[1]  # ties across tiles
    values[::97] = math.nan
    ks = [int(k) for size in sizes for k in (size // 5, size // 2)]
    queries = Queries(
        tuple(sizes), tuple(s for s in range(len(sizes)) for _ in range(2)), tuple(ks), torch.device("cuda")
    )
    values = values.cuda()
    expected = select_by_sort(kernels.scores(values), queries, kernels.infinity_score(dtype))
    found = triton_kernels.select_by_radix(values, triton_kernels.plan_for(queries, dtype))
    assert torch.equal(found, expected)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("config", ["adamw, coupled penalty", "sgd, two learning rates, decoupled penalty", "float32"])
def test_on_a_gpu_the_triton_group_steps_as_the_host_path(config: str) -> None:
    """The fused kernels against the per-tensor torch passes on the same GPU, bit for bit (no fused multiply-add)."""
    engines = []
    for sync_free in (False, True):
        model = _model(dtype=CONFIGS[config].get("dtype", torch.float64)).cuda()  # type: ignore[arg-type]
        settings_ = {k: v for k, v in CONFIGS[config].items() if k not in ("dtype", "optimizer")}
        engine = _engine(model, sync_free=sync_free, **settings_)
        optimizer = _optimizer(model, str(CONFIGS[config].get("optimizer", "adamw")))
        engine.attach([optimizer])
        _train(model, engine, optimizer, 6)
        engines.append(engine)
    host, device = engines
    assert type(device._flat[0][0]) is triton_kernels.TritonGroup
    _assert_same(host, device)
