"""The package's public surface: lazy exports resolve, subpackages ship, the CLI starts."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

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
