"""Deprecated: ``magpie-hf push`` moved to :mod:`magpie_hf.cli.push`, :func:`finish_recipe` to
:mod:`magpie_hf.hub.publishing`. This module re-exports them for one release."""

import warnings

from magpie_hf.cli.push import register_cli
from magpie_hf.hub.publishing import finish_recipe

__all__ = ["finish_recipe", "register_cli"]

warnings.warn("magpie_hf.hub.cli is deprecated; import finish_recipe from magpie_hf.hub (the push command is "
              "magpie_hf.cli.push)", DeprecationWarning, stacklevel=2)
