"""First contact: the README's commands, the extras they install, the notebook and the examples as a user meets them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_block(marker: str) -> str:
    """The fenced bash block after ``<!-- ci:<marker> -->``, as ``.ci/run`` reads it."""
    found = re.search(rf"<!-- ci:{marker} -->\n```bash\n(.*?)\n```", README, re.DOTALL)
    assert found is not None, marker
    return found[1]


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_quick_start_installs_only_what_the_example_needs() -> None:
    command = readme_block("quickstart")
    installs = re.findall(r"pip install -q (.+?)(?= &&|$)", command)
    assert installs == ["torch==2.13.0", '-e ".[examples]"']  # the CPU wheel first, then the example's extra
    assert command.endswith("python examples/digits.py fit --config examples/digits_topkast.yaml")
    # the example imports scikit-learn and LightningCLI (jsonargparse): exactly the examples extra
    assert {re.split(r"[\[<>=]", r)[0] for r in extras()["examples"]} == {"jsonargparse", "scikit-learn"}
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith("wandb") for d in dependencies)  # the library never imports it


def test_test_command_adds_the_dev_extras_then_runs_the_whole_suite() -> None:
    command = readme_block("tests")
    assert command == '. .venv/bin/activate && pip install -q -e ".[dev]" && pytest'


def test_readme_states_the_measured_time_of_each_command() -> None:
    section = README[README.index("## Quick start") : README.index("## Usage")]
    times = re.search(r"Measured on a fresh venv[^\n]*\n(?:[^\n]+\n)*", section)
    assert times is not None
    assert re.search(r"quick start command took [\d.]+ (s|min)", times[0])
    assert re.search(r"test command took [\d.]+ (s|min)", times[0])
    assert re.search(r'pytest -m "not slow"', README)


def test_ci_runs_the_readme_blocks_as_written() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "for block in quickstart tests; do" in ci
    assert 'bash -euo pipefail -c "$commands"' in ci


def test_the_notebook_installs_without_placeholders_and_trains_on_the_default_refresh() -> None:
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    sources = ["".join(cell["source"]) for cell in notebook["cells"]]
    assert not any("<this repository>" in s or "git+<" in s for s in sources)
    assert 'pip install -e ".[notebooks]"' in sources[0]
    code = "\n".join(s for cell, s in zip(notebook["cells"], sources, strict=True) if cell["cell_type"] == "code")
    assert "update_interval" not in code
    assert "magnitude_histogram(" in code  # one picture of the masks, as W&B and TensorBoard get them
    assert notebook["cells"][-1]["cell_type"] == "code"
    assert sources[-1].count("assert ") >= 3  # it ends with checks


def test_the_example_yaml_uses_the_default_refresh() -> None:
    config = yaml.safe_load((ROOT / "examples" / "digits_topkast.yaml").read_text())
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_topkast.TopKASTCallback"
    assert "update_interval" not in callback["init_args"]


@pytest.mark.slow
def test_the_fast_lane_leaves_out_notebooks_subprocesses_and_ddp() -> None:
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "quickstart.ipynb" not in collected
    assert "test_ddp.py" not in collected
    assert "test_sigkill" not in collected
    assert re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", collected)


def guarantee_rows() -> list[list[str]]:
    """The cells of each row of the README's Guarantees table (the header and the rule left out)."""
    section = README[README.index("## Guarantees") : README.index("## Limits")]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| guarantee | how it is tested | tests |"
    return [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in lines[1:]]


def test_every_guarantee_names_test_files_that_exist() -> None:
    rows = guarantee_rows()
    assert len(rows) == 15
    for guarantee, _how, tests in rows:
        named = re.findall(r"`([^`]+)`", tests)
        assert named, guarantee
        assert tests.strip() == ", ".join(f"`{path}`" for path in named), guarantee  # nothing else in the cell
        for path in named:
            assert re.fullmatch(r"tests/test_\w+\.py", path), (guarantee, path)
            assert (ROOT / path).is_file(), (guarantee, path)


def test_the_guarantees_check_fails_on_a_missing_file(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = README.replace("`tests/test_flops.py`", "`tests/test_flop.py`")
    assert broken != README
    monkeypatch.setattr(sys.modules[__name__], "README", broken)
    with pytest.raises(AssertionError, match=r"tests/test_flop\.py"):
        test_every_guarantee_names_test_files_that_exist()


def test_the_declared_license_ships_in_full() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]  # hatchling puts it in the wheel's dist-info/licenses/
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) == 201


def test_ci_trains_from_the_installed_wheel_outside_the_checkout() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip wheel . --no-deps" in ci
    assert "grep 'dist-info/licenses/LICENSE$' >/dev/null" in ci
    assert '(cd "$wheel_work" && LIGHTNING_TOPKAST_CACHE="$wheel_work/cache"' in ci  # outside, compiling afresh
    assert 'wait "$wheel_pid"' in ci
    smoke = (ROOT / ".ci" / "installed_smoke.py").read_text()
    assert "where.is_relative_to(site)" in smoke
    assert "kernels.CKernels" in smoke
