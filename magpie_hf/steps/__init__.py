"""Pipeline steps. Heavy dependencies are imported by each step's ``load()``, not here."""

from magpie_hf.steps.base import Batch, GeneratorStep, GlobalStep, Step, StepChain
from magpie_hf.steps.generate import AIR_MIXTURE, PRO_MIXTURE, DecodingSetting, MagpieInstructions, Responses

__all__ = [
    "AIR_MIXTURE",
    "PRO_MIXTURE",
    "Batch",
    "DecodingSetting",
    "GeneratorStep",
    "GlobalStep",
    "MagpieInstructions",
    "Responses",
    "Step",
    "StepChain",
]
