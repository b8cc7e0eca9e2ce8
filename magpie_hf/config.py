"""Deprecated: the argument sections moved to :mod:`magpie_hf.recipe.arguments` (``parse_json_object`` to
:mod:`magpie_hf.recipe.parser`). This module re-exports them for one release."""

import warnings

from magpie_hf.recipe.arguments import (
    LIMITS,
    MIXTURES,
    TAGGING_STAGES,
    EngineArguments,
    FilterArguments,
    HubArguments,
    InstructionArguments,
    MultiTurnArguments,
    PreferenceArguments,
    RayArguments,
    ReasoningArguments,
    ResponseArguments,
    RunArguments,
    TaggingArguments,
    check_limits,
    parse_stage_resources,
    read_task_prompts,
)
from magpie_hf.recipe.parser import parse_json_object

__all__ = [
    "LIMITS",
    "MIXTURES",
    "TAGGING_STAGES",
    "EngineArguments",
    "FilterArguments",
    "HubArguments",
    "InstructionArguments",
    "MultiTurnArguments",
    "PreferenceArguments",
    "RayArguments",
    "ReasoningArguments",
    "ResponseArguments",
    "RunArguments",
    "TaggingArguments",
    "check_limits",
    "parse_json_object",
    "parse_stage_resources",
    "read_task_prompts",
]

warnings.warn("magpie_hf.config is deprecated; import from magpie_hf.recipe.arguments (or magpie_hf.recipe)",
              DeprecationWarning, stacklevel=2)
