"""Deprecated: the configuration parser moved to :mod:`magpie_hf.recipe.parser`. This module re-exports it for one
release."""

import warnings

from magpie_hf.errors import ConfigError
from magpie_hf.recipe.parser import ConfigParser, HelpFormatter, check_choices, load_yaml_config, to_yaml

__all__ = ["ConfigError", "ConfigParser", "HelpFormatter", "check_choices", "load_yaml_config", "to_yaml"]

warnings.warn("magpie_hf.cli_config is deprecated; import from magpie_hf.recipe.parser", DeprecationWarning,
              stacklevel=2)
