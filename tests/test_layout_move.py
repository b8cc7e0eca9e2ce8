"""The module paths of the layout before the move keep working for one release, with a warning that names the
new path, and nothing in the repository still uses them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from magpie_hf.utils.deprecation import MOVED_MODULES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_imports_with_a_warning_naming_the_new_one(old):
    """In a fresh interpreter: with warnings as errors the import fails on the DeprecationWarning (so the finder
    answered, not a leftover file), and with warnings on, every public name of the new homes is reachable."""
    homes = MOVED_MODULES[old]
    strict = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", f"import {old}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert strict.returncode != 0 and "DeprecationWarning" in strict.stderr, strict.stderr
    assert f"{old} moved to {homes[0]}" in strict.stderr
    check = (
        "import importlib, warnings\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"old = importlib.import_module({old!r})\n"
        f"for home in {list(homes)!r}:\n"
        "    new = importlib.import_module(home)\n"
        "    names = getattr(new, '__all__', [n for n in vars(new) if not n.startswith('_')])\n"
        "    missing = [n for n in names if getattr(old, n, None) is not getattr(new, n)]\n"
        "    assert not missing, (home, missing)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_task_control_step_is_found_under_its_old_module_path():
    """``magpie_hf.task_prompts`` went to two places: the prompt data and the step."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c",
         "from magpie_hf.task_prompts import TaskControlledInstructions, TaskMix, TASK_PROMPTS; "
         "print(TaskControlledInstructions.__module__, TaskMix.__module__)"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.stdout.split() == ["magpie_hf.steps.task_control", "magpie_hf.prompts.tasks"], result.stderr


def test_python_dash_m_on_an_old_path_runs_the_new_module(tmp_path):
    """``python -m magpie_hf.embedded DIR`` (the model fetcher; both models already in DIR, so nothing downloads)."""
    from magpie_hf.utils.embedded import MODEL_WHEELS

    for _, module in MODEL_WHEELS:
        (tmp_path / module).mkdir()
    result = subprocess.run([sys.executable, "-m", "magpie_hf.embedded", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"embedded models in {tmp_path}"
    assert "magpie_hf.embedded moved to magpie_hf.utils.embedded" in result.stderr


def test_no_file_of_the_repository_imports_an_old_path():
    """Old paths are for users' code; the package, recipes, benchmarks and tests use the new ones."""
    offenders = []
    for folder in ("magpie_hf", "recipes", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names if name in MOVED_MODULES]
    assert not offenders, offenders
