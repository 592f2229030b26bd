"""docs/results.md and README's headline hold exactly what benchmarks/results/*.json say.

``benchmarks/report.py`` renders every measured table from the JSON the benchmarks wrote (with the commit and date
of the run under each); these tests fail when a document's table differs from its JSON, names a table that does
not exist, or shows a ratio that is not the ratio of the milliseconds beside it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402


def _blocks(path: Path) -> dict[str, str]:
    return {m["name"]: m["body"] for m in report.BLOCK.finditer(path.read_text())}


def test_every_table_in_the_documents_matches_its_json() -> None:
    assert report.check() == []


@pytest.mark.parametrize("path", report.DOCUMENTS, ids=lambda p: p.name)
def test_every_table_block_names_a_known_table(path: Path) -> None:
    names = list(_blocks(path))
    assert names, f"{path.name} holds no generated table"
    assert set(names) <= set(report.TABLES)


def test_the_readme_headline_shows_80_and_90_percent_for_every_sparse_method() -> None:
    headline = _blocks(ROOT / "README.md")["headline-accuracy"]
    for method in (
        "Top-KAST 80%/50%",
        "Top-KAST 90%/80%",
        "ModelPruning 80%",
        "ModelPruning 90%",
        "RigL 80%",
        "RigL 90%",
    ):
        assert f"| {method} |" in headline, method


def test_every_ratio_is_the_ratio_of_the_milliseconds_beside_it() -> None:
    headline = _blocks(ROOT / "README.md")["headline-overhead"]
    rows = [line for line in headline.splitlines() if line.startswith("| ") and "ms" in line and "model" not in line]
    assert rows
    for row in rows:
        dense = float(re.search(r"\(([\d.]+)\) \|", row)[1])
        for ratio, ms in re.findall(r"([\d.]+) \(([\d.]+) ms\)", row):
            assert abs(float(ratio) - float(ms) / dense) <= 0.006 + 0.01 * float(ratio), row


def test_seeds_run_later_join_the_saved_ones_with_their_own_provenance(tmp_path: Path) -> None:
    import accuracy

    def record(seeds: list[int], commit: str) -> dict:
        runs = [{"seed": s, "method": "dense", "metric": 0.5 + s} for s in seeds]
        # a tuple, as the dataclass of a fresh record gives it; the saved file holds a list
        config = {"steps": 10, "tune_lrs": (0.1, 0.3)}
        return {"wall_seconds": 1.0, "config": config, "quick": False, "runs": runs, "provenance": commit}

    path = tmp_path / "accuracy_images.json"
    path.write_text(json.dumps(record([0], "first")))
    merged = accuracy.with_other_seeds(path, record([1, 2], "second"))
    assert [r["seed"] for r in merged["runs"]] == [0, 1, 2]
    assert merged["earlier"] == [{"seeds": [0], "wall_seconds": 1.0, "provenance": "first"}]
    path.write_text(json.dumps({**merged, "provenance": "second"}))
    again = accuracy.with_other_seeds(path, record([1], "third"))  # seed 1 rerun: replaces its runs only
    assert [r["seed"] for r in again["runs"]] == [0, 1, 2]
    assert [e["seeds"] for e in again["earlier"]] == [[0], [2]]
    other = {**record([1], "fourth"), "config": {"steps": 20}}  # another budget: nothing joins
    assert accuracy.with_other_seeds(path, other)["runs"] == other["runs"]


def test_tuning_one_task_keeps_the_other_tasks_runs_and_provenance(tmp_path: Path) -> None:
    import accuracy

    def run(task: str, method: str, lr: float, metric: float) -> dict:
        return {"task": task, "method": method, "lr": lr, "metric": metric}

    path = tmp_path / "tune.json"
    images = [run("images", "dense", 0.1, 0.9), run("images", "dense", 0.3, 0.1)]
    old_text = [run("text", "dense", 3e-3, 2.2), run("text", "dense", 1e-2, 2.3)]
    path.write_text(json.dumps({"chosen": {}, "runs": images + old_text, "provenance": "first"}))
    # a fresh tuning of the text task: every earlier text run goes (another setup's), images untouched
    fresh = accuracy.merge_tune(path, [run("text", "dense", 1e-2, 2.1)], "fresh")
    assert [r for r in fresh["runs"] if r["task"] == "images"] == images
    assert [r for r in fresh["runs"] if r["task"] == "text"] == [run("text", "dense", 1e-2, 2.1)]
    assert fresh["tasks"] == {"images": ["first"], "text": ["fresh"]}
    # the grid widened (--lrs): runs at those rates replaced, the task's other runs kept
    second = [run("text", "dense", 1e-2, 2.1), run("text", "dense", 2e-2, 2.4)]
    merged = accuracy.merge_tune(path, second, "second", widen=True)
    assert [r for r in merged["runs"] if r["task"] == "images"] == images
    text = {r["lr"]: r["metric"] for r in merged["runs"] if r["task"] == "text"}
    assert text == {3e-3: 2.2, 1e-2: 2.1, 2e-2: 2.4}
    assert merged["chosen"] == {"images": {"dense": 0.1}, "text": {"dense": 1e-2}}
    # images keep the provenance of the file they came from; text names both invocations (3e-3 is from the first)
    assert merged["tasks"] == {"images": ["first"], "text": ["first", "second"]}
    path.write_text(json.dumps({**merged, "provenance": "second"}))
    # every text rate rerun: only the new invocation is text's provenance
    again = accuracy.merge_tune(path, [run("text", "dense", lr, 2.0) for lr in (3e-3, 1e-2, 2e-2)], "third", widen=True)
    assert again["tasks"] == {"images": ["first"], "text": ["third"]}
    assert "| dense | 2.000 | 2.000 | 2.000 |" in accuracy.tune_table("text", again["runs"]).replace("**", "")


def test_another_method_on_a_saved_seed_joins_without_dropping_it(tmp_path: Path) -> None:
    import accuracy

    def record(keys: list[tuple[str, int]], commit: str) -> dict:
        runs = [{"seed": s, "method": m, "sparsity": 0.9, "metric": 1.0} for m, s in keys]
        return {"wall_seconds": 1.0, "config": {"steps": 10}, "quick": False, "runs": runs, "provenance": commit}

    path = tmp_path / "accuracy_text.json"
    path.write_text(json.dumps(record([("dense", 0), ("static", 0)], "first")))
    second = accuracy.with_other_seeds(path, record([("static", 1)], "second"))  # seed 1 of one method
    path.write_text(json.dumps(second))
    third = accuracy.with_other_seeds(path, record([("dense", 1)], "third"))  # seed 1 of the other: both kept
    assert sorted(accuracy.run_key(r) for r in third["runs"]) == [
        ("dense", 0.9, 0),
        ("dense", 0.9, 1),
        ("static", 0.9, 0),
        ("static", 0.9, 1),
    ]
    assert third["earlier"] == [
        {"seeds": [0], "wall_seconds": 1.0, "provenance": "first"},
        {"seeds": [1], "wall_seconds": 1.0, "provenance": "second", "runs": [["static", 0.9, 1]]},
    ]


def test_text_tunes_top_kast_and_model_pruning_at_each_sparsity_and_the_grid_reads_each_rows_rate() -> None:
    import accuracy

    tuned = {(r.method, r.sparsity) for r in accuracy.plan_tune(["text"])}
    assert tuned >= {("topkast", 0.8), ("topkast", 0.9), ("topkast", 0.95), ("pruning", 0.8), ("pruning", 0.9)}
    assert {(r.method, r.sparsity) for r in accuracy.plan_tune(["images"])} == {
        ("dense", 0.0),
        *((m, accuracy.TUNE_SPARSITY) for m in list(accuracy.GRID)[1:]),
    }
    assert {r.sparsity for r in accuracy.plan_tune(["text"], ["topkast:0.8"])} == {0.8}

    def run(method: str, sparsity: float, lr: float, metric: float) -> dict:
        return {"task": "text", "method": method, "sparsity": sparsity, "lr": lr, "metric": metric}

    runs = [run("topkast", 0.9, 1e-2, 2.3), run("topkast", 0.9, 2e-2, 2.2), run("topkast", 0.8, 1e-2, 2.1)]
    runs += [run("topkast", 0.8, 2e-2, 2.2), run("dense", 0.0, 3e-3, 2.0)]
    chosen = accuracy.choose_lrs(runs)["text"]
    assert chosen == {"dense": 3e-3, "topkast": 2e-2, "topkast:0.8": 1e-2}
    rates = {(r.method, r.sparsity): r.lr for r in accuracy.plan_grid(["text"], [0], {"text": chosen}, ["topkast"])}
    assert rates == {("topkast", 0.8): 1e-2, ("topkast", 0.9): 2e-2, ("topkast", 0.95): 2e-2}  # 95: not tuned there
    table = accuracy.tune_table("text", runs)
    assert "| Top-KAST 80% | – | **2.100** | 2.200 |" in table
    assert "| Top-KAST 90% | – | 2.300 | **2.200** |" in table


def test_the_scaling_family_tunes_each_member_and_reuses_seed_0_from_its_tuning() -> None:
    import scaling

    # the width-128 rate and one neighbour: half from width 128 up, double below
    assert scaling.tune_rates(2e-2, 280) == (2e-2, 1e-2)
    assert scaling.tune_rates(3e-3, 128) == (3e-3, 1.5e-3)
    assert scaling.tune_rates(3e-3, 64) == (3e-3, 6e-3)

    def run(width: int, lr: float, val: float, test: float) -> dict:
        return {"method": "dense", "sparsity": 0.0, "seed": 0, "lr": lr, "model": [["d_model", width]],
                "split": "val", "metric": val, "metrics": {"test": test}}  # fmt: skip

    tuning = [
        run(64, 3e-3, 2.1, 2.0),
        run(64, 6e-3, float("nan"), 1.0),
        run(96, 3e-3, 2.0, 1.9),
        run(96, 6e-3, 1.9, 2.5),
    ]
    # validation alone chooses (d = 64's test favours the diverged rate; d = 96's the other one)
    assert scaling.choose(tuning) == {"dense-64": 3e-3, "dense-96": 6e-3}
    taken = scaling.reused(scaling.accuracy.Run("text", "dense", 0.0, 0, 6e-3, model=(("d_model", 96),)), tuning)
    assert taken is not None
    assert (taken["split"], taken["metric"], taken["validation"]) == ("test", 2.5, 1.9)
    assert scaling.reused(scaling.accuracy.Run("text", "dense", 0.0, 1, 6e-3, model=(("d_model", 96),)), tuning) is None


def test_a_source_line_names_the_file_that_made_runs_taken_from_it() -> None:
    def p(commit: str) -> dict:
        return {"commit": commit * 7, "dirty": False, "date": "2026-12-02T16:00:00"}

    runs = [{"method": "dense", "sparsity": 0.0, "seed": s} for s in (0, 1)]
    earlier = [{"seeds": [0], "wall_seconds": 1.0, "provenance": p("a"), "from": "scaling_tune.json"}]
    record = {"runs": runs, "earlier": earlier, "provenance": p("b")}
    assert report.made_by(record) == (
        "seed 0: commit `aaaaaaa`, 2026-12-02, the runs of `scaling_tune.json`; seed 1: commit `bbbbbbb`, 2026-12-02"
    )


def test_members_of_the_scaling_family_join_one_invocation_at_a_time() -> None:
    import accuracy

    def runs(seed: int, widths: tuple[int, ...]) -> list[dict]:
        return [{"method": "dense", "sparsity": 0.0, "seed": seed, "model": [["d_model", w]]} for w in widths]

    tuned = {"seeds": [0], "wall_seconds": 1.0, "provenance": "tune", "from": "scaling_tune.json"}
    saved = {"sparsity": 0.8, "wall_seconds": 2.0, "runs": runs(0, (64, 96)) + runs(1, (64,)), "earlier": [tuned]}
    saved["provenance"] = "first"
    merged = accuracy.merge_seeds(saved, {"sparsity": 0.8, "runs": runs(1, (96,))})
    # seed 1 at d = 96 joins seed 1 at d = 64 instead of replacing it; seed 0 still names the file that made it
    assert sorted(accuracy.run_key(r) for r in merged["runs"]) == [
        ("dense", 0.0, 0, "d_model=64"),
        ("dense", 0.0, 0, "d_model=96"),
        ("dense", 0.0, 1, "d_model=64"),
        ("dense", 0.0, 1, "d_model=96"),
    ]
    assert merged["earlier"][0] == tuned
    assert merged["earlier"][1]["runs"] == [["dense", 0.0, 1, "d_model=64"]]


def test_a_row_rerun_at_another_rate_drops_its_older_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    import accuracy

    def run(method: str, seed: int, lr: float) -> dict:
        return {"method": method, "sparsity": 0.8, "seed": seed, "lr": lr}

    saved = {"sparsity": 0.8, "wall_seconds": 2.0, "provenance": "first"}
    saved["runs"] = [run("topkast", 0, 4e-2), run("topkast", 1, 4e-2), run("static", 0, 4e-2), run("static", 1, 4e-2)]
    merged = accuracy.merge_seeds(saved, {"sparsity": 0.8, "runs": [run("topkast", 2, 1e-2), run("static", 2, 4e-2)]})
    # Top-KAST's seeds 0 and 1 were at 4e-2: they would average with seed 2 at 1e-2; static's rate did not change
    assert sorted((r["method"], r["seed"], r["lr"]) for r in merged["runs"]) == [
        ("static", 0, 4e-2),
        ("static", 1, 4e-2),
        ("static", 2, 4e-2),
        ("topkast", 2, 1e-2),
    ]
    assert merged["earlier"] == [{"seeds": [0, 1], "wall_seconds": 2.0, "provenance": "first"}]  # all it kept
    assert "dropped 2 saved run(s) at another rate" in capsys.readouterr().out
    only_stale = {**saved, "runs": saved["runs"][:2]}
    rerun = {"sparsity": 0.8, "runs": [run("topkast", 2, 1e-2)]}
    assert accuracy.merge_seeds(only_stale, rerun) == rerun  # nothing saved is left to keep


def test_text_is_tuned_at_the_full_budget_and_seed_0_of_the_grid_is_taken_from_its_tuning() -> None:
    import accuracy

    tuning_runs = accuracy.plan_tune(["text"], ["topkast:0.8"])
    assert {(r.budget, r.split, r.extra_splits) for r in tuning_runs} == {(1.0, "val", ("test",))}
    assert [r.lr for r in tuning_runs] == [3e-3, 1e-2, 2e-2]
    assert {r.budget for r in accuracy.plan_tune(["images"])} == {0.25}  # images keep the quarter budget

    def made(run: accuracy.Run, val: float, test: float, commit: str) -> dict:
        record = json.loads(json.dumps(dataclasses.asdict(run)))  # as tune.json holds it
        return {**record, "metric": val, "metrics": {"test": test}, "train_seconds": 60.0, "provenance": commit}

    tuning = [made(r, 2.0 + r.lr, 1.9 + r.lr, "tune") for r in tuning_runs]
    grid = accuracy.plan_grid(["text"], [0, 1], {"text": {"topkast": 2e-2, "topkast:0.8": 1e-2}}, ["topkast:0.8"])
    taken = [accuracy.reused(run, tuning) for run in grid]
    assert taken[1] is None  # seed 1 was never trained by the tuning
    assert taken[0] is not None
    assert (taken[0]["split"], taken[0]["metric"], taken[0]["validation"], taken[0]["lr"]) == ("test", 1.91, 2.01, 1e-2)
    # another rate, another budget or a tuning run without the test split is not the grid's run
    assert accuracy.reused(dataclasses.replace(grid[0], lr=4e-2), tuning) is None
    assert accuracy.reused(dataclasses.replace(grid[0], budget=0.25), tuning) is None
    assert accuracy.reused(grid[0], [{**tuning[1], "metrics": {}}]) is None
    assert accuracy.made_in_tuning([taken[0]]) == [
        {"seeds": [0], "runs": [["topkast", 0.8, 0]], "wall_seconds": 60.0, "provenance": "tune", "from": "tune.json"}
    ]
