"""Pipeline steps.

The generation steps are imported eagerly; the taggers, neighbours, filters and preference steps
load on first use (``from magpie_hf.steps import Neighbors``) so that importing the package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from magpie_hf.steps.base import Batch, GeneratorStep, GlobalStep, Step, StepChain
from magpie_hf.steps.generate import (
    AIR_MIXTURE,
    EMBEDDED_MIXTURE,
    PRO_MIXTURE,
    DecodingSetting,
    MagpieInstructions,
    Responses,
)

_LAZY = {
    "magpie_hf.steps.judges": ("TaskCategory", "InputQuality", "Difficulty"),
    "magpie_hf.steps.safety": ("LlamaGuard",),
    "magpie_hf.steps.language": ("Language",),
    "magpie_hf.steps.reward": ("RewardModelScorer", "RewardModel", "JudgeReward"),
    "magpie_hf.steps.neighbors": ("Neighbors", "find_neighbors"),
    "magpie_hf.steps.filters": ("Filter", "Condition", "ColumnRef", "DEDUPLICATE", "Stratum", "preset_filter", "FILTER_PRESETS"),
    "magpie_hf.steps.base_responses": ("BaseResponses", "BasePromptTemplate", "RewardDifference"),
    "magpie_hf.steps.preferences": (
        "InstructVsBasePairs", "MultiResponses", "MultiResponseRewards", "BestOfNPairs", "split_preferences",
    ),
    "magpie_hf.steps.multi_turn": ("MultiTurn",),
    "magpie_hf.steps.reasoning": ("ReasoningResponses", "split_reasoning"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "AIR_MIXTURE",
    "EMBEDDED_MIXTURE",
    "PRO_MIXTURE",
    "Batch",
    "DecodingSetting",
    "GeneratorStep",
    "GlobalStep",
    "MagpieInstructions",
    "Responses",
    "Step",
    "StepChain",
    *_WHERE,
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
