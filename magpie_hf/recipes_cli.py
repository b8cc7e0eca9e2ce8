"""Deprecated: the recipe commands moved to :mod:`magpie_hf.cli.recipes`. This module re-exports them for one
release."""

import warnings

from magpie_hf.cli.recipes import RECIPES, recipes_dir, register_cli, resolve_config, run_recipe_script

__all__ = ["RECIPES", "recipes_dir", "register_cli", "resolve_config", "run_recipe_script"]

warnings.warn("magpie_hf.recipes_cli is deprecated; import from magpie_hf.cli.recipes", DeprecationWarning,
              stacklevel=2)
