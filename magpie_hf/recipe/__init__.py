"""What every recipe shares, one module per idea, read top to bottom as a recipe script runs:

- :mod:`~magpie_hf.recipe.arguments`: the typed argument sections (dataclasses with help text);
- :mod:`~magpie_hf.recipe.parser`: flags and ``--config FILE.yaml`` into those sections, TRL style;
- :mod:`~magpie_hf.recipe.config`: a recipe's identity and presets (:class:`Recipe`), a run's resolved settings
  (:class:`RecipeConfig`, :func:`parse_recipe`);
- :mod:`~magpie_hf.recipe.builders`: the steps built from those settings (every recipe's chain);
- :mod:`~magpie_hf.recipe.run`: running them, the dataset folder and publishing (:func:`run_recipe`);
- :mod:`~magpie_hf.recipe.outputs`: the dataset configs a recipe writes at the end;
- :mod:`~magpie_hf.recipe.provenance`: what the dataset card records about the run.

A recipe script (``recipes/magpie_pro.py`` and friends) declares a :class:`Recipe`, then parses, builds, runs::

    config = parse_recipe(PRO, argv)
    steps = filtered_steps(config)
    return run_recipe(config, steps, filter_outputs(config))

Example:
    >>> from magpie_hf.recipe import Recipe, parse_recipe
    >>> recipe = Recipe(name="demo", description="", paper={"model": "meta-llama/Meta-Llama-3-8B-Instruct", "num_rows": 1000})
    >>> parse_recipe(recipe, ["--preset", "cpu"]).run.num_rows
    40
"""

from magpie_hf.recipe.arguments import (
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
)
from magpie_hf.recipe.builders import (
    filter_needs_reward_difference,
    filter_step,
    filtered_steps,
    generation_steps,
    hygiene_step,
    instruct_vs_base_reward_steps,
    instruction_filters,
    instruction_step,
    language_steps,
    multi_turn_filters,
    multi_turn_step,
    multi_turn_steps,
    preference_steps,
    reasoning_steps,
    response_step,
    reward_step,
    tagging_steps,
)
from magpie_hf.recipe.config import (
    COMMON_SECTIONS,
    CPU_PRESET,
    DEFAULT_FILTER,
    EMBEDDED,
    EMBEDDED_FILTER,
    PAPER_DEFAULTS,
    Recipe,
    RecipeConfig,
    judge_chat_template_kwargs,
    parse_recipe,
    response_chat_template_kwargs,
)
from magpie_hf.recipe.outputs import (
    Finish,
    filter_outputs,
    filter_report,
    filtered_and_raw,
    multi_turn_outputs,
    preference_outputs,
    reasoning_outputs,
)
from magpie_hf.recipe.parser import recipe_command
from magpie_hf.recipe.provenance import (
    language_report,
    reasoning_report,
    reproducibility_report,
    run_info,
)
from magpie_hf.recipe.run import check_hardware, publish_or_hint, run_recipe

__all__ = [
    "COMMON_SECTIONS",
    "CPU_PRESET",
    "DEFAULT_FILTER",
    "EMBEDDED",
    "EMBEDDED_FILTER",
    "PAPER_DEFAULTS",
    "TAGGING_STAGES",
    "EngineArguments",
    "FilterArguments",
    "Finish",
    "HubArguments",
    "InstructionArguments",
    "MultiTurnArguments",
    "PreferenceArguments",
    "RayArguments",
    "ReasoningArguments",
    "Recipe",
    "RecipeConfig",
    "ResponseArguments",
    "RunArguments",
    "TaggingArguments",
    "check_hardware",
    "filter_needs_reward_difference",
    "filter_outputs",
    "filter_report",
    "filter_step",
    "filtered_and_raw",
    "filtered_steps",
    "generation_steps",
    "hygiene_step",
    "instruct_vs_base_reward_steps",
    "instruction_filters",
    "instruction_step",
    "judge_chat_template_kwargs",
    "language_report",
    "language_steps",
    "multi_turn_filters",
    "multi_turn_outputs",
    "multi_turn_step",
    "multi_turn_steps",
    "parse_recipe",
    "preference_outputs",
    "preference_steps",
    "publish_or_hint",
    "reasoning_outputs",
    "reasoning_report",
    "reasoning_steps",
    "recipe_command",
    "reproducibility_report",
    "response_chat_template_kwargs",
    "response_step",
    "reward_step",
    "run_info",
    "run_recipe",
    "tagging_steps",
]
