"""The steps a recipe runs, built from its :class:`~magpie_hf.recipe.config.RecipeConfig`: Magpie steps 1 and 2
(:func:`generation_steps`), the paper's tagging stages (:func:`tagging_steps`), the one instruct-vs-base reward
chain (:func:`instruct_vs_base_reward_steps`), the filters, and each recipe's whole chain (:func:`filtered_steps`
for magpie_pro/air, :func:`multi_turn_steps`, :func:`preference_steps`, :func:`reasoning_steps`).

A builder raises :class:`~magpie_hf.errors.ConfigError` for settings it cannot build, before any model loads.

Example:
    >>> from magpie_hf.recipe import Recipe, parse_recipe
    >>> config = parse_recipe(Recipe(name="demo", description="", stages=("language",)), ["--preset", "cpu"])
    >>> [step.name for step in generation_steps(config) >> tagging_steps(config)]
    ['magpie_instructions', 'responses', 'language']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from magpie_hf.errors import ConfigError
from magpie_hf.recipe.arguments import (
    FilterArguments,
    MultiTurnArguments,
    PreferenceArguments,
    ReasoningArguments,
)
from magpie_hf.recipe.config import (
    EMBEDDED,
    RecipeConfig,
    judge_chat_template_kwargs,
    response_chat_template_kwargs,
)
from magpie_hf.steps.base import Step, StepChain

if TYPE_CHECKING:
    from magpie_hf.steps.multi_turn import MultiTurn


# -- Magpie steps 1 and 2 ------------------------------------------------------------------------
def instruction_filters(config: RecipeConfig, extra: Sequence[Any] = ()) -> tuple[Any, ...]:
    """Post-processing of instructions: ``--sanitize``'s filters (the official Llama-3.x / Gemma-2 rules,
    chosen by the instruction model's name) plus ``extra``."""
    from magpie_hf.steps.postprocess import sanitize_family, sanitize_filters

    i = config.instructions
    filters = [*(sanitize_filters(sanitize_family(i.model)) if i.sanitize else ()), *extra]
    return tuple({f.name: f for f in filters}.values())


def instruction_step(config: RecipeConfig, *, postprocess: Sequence[Any] = ()) -> Step:
    """Magpie step 1 with the run's model, mixture, lengths, stops (``--newline_stop``), first-token rules
    (``--no_markdown_start``, ``--first_token_temperature_scale``), task control and post-processing
    (``--sanitize``)."""
    from magpie_hf.steps import MagpieInstructions

    i = config.instructions
    kwargs: dict[str, Any] = dict(
        engine=config.instruction_engine(),
        num_rows=config.run.num_rows,
        mixture=i.decoding_mixture(),
        max_tokens=i.instruction_max_tokens,
        system_prompt=config.instruction_system_prompt(),
        keep_default_system_prompt=i.keep_default_system_prompt,
        pre_query_template=i.pre_query_template,
        chat_template_kwargs=i.template_kwargs(),
        newline_stop=i.newline_stop,
        no_markdown_start=i.no_markdown_start,
        first_token_temperature_scale=i.first_token_temperature_scale,
        seed=config.run.seed,
    )
    task = config.task_mix()
    filters = instruction_filters(config, postprocess)
    if task is not None or filters:
        from magpie_hf.steps.task_control import TaskControlledInstructions

        return TaskControlledInstructions(task=task, postprocess=filters, **kwargs)
    return MagpieInstructions(**kwargs)


def response_step(config: RecipeConfig) -> Step:
    """Magpie step 2 with the run's response model and sampling; a reasoning recipe (one with
    :class:`~magpie_hf.recipe.arguments.ReasoningArguments`) splits the thinking off (:class:`~magpie_hf.steps.reasoning.ReasoningResponses`)."""
    from magpie_hf.steps import Responses

    r = config.responses
    kwargs: dict[str, Any] = dict(
        engine=config.response_engine(),
        temperature=r.response_temperature,
        top_p=r.response_top_p,
        repetition_penalty=r.response_repetition_penalty,
        chat_template_kwargs=response_chat_template_kwargs(config),
    )
    if ReasoningArguments in config.extra:
        from magpie_hf.steps.reasoning import ReasoningResponses

        reasoning = config.section(ReasoningArguments)
        return ReasoningResponses(thinking_budget=reasoning.thinking_budget, answer_budget=reasoning.answer_budget,
                                  reasoning_tags=reasoning.tags(), **kwargs)
    return Responses(max_tokens=r.response_max_tokens, **kwargs)


def language_steps(config: RecipeConfig) -> StepChain:
    """Under ``--language``: tag the instructions' language (counting the target's rows), and with
    ``--keep_language_only`` keep only the target's rows, before any response is generated."""
    from magpie_hf.steps import Condition, Filter, Language

    language = config.instructions.target_language()
    if language is None:
        return StepChain()
    chain = StepChain([Language(target=language)])
    if config.instructions.keep_language_only:
        chain = chain >> Filter(conditions=[Condition("language", "==", language)], name="keep_language")
    return chain


def generation_steps(config: RecipeConfig, *, postprocess: Sequence[Any] = (), responses: bool = True) -> StepChain:
    """Magpie step 1, the ``--language`` tag (and filter), and step 2 (not with ``--instructions_only`` or
    ``responses=False``)."""
    chain = StepChain([instruction_step(config, postprocess=postprocess)]) >> language_steps(config)
    return chain if config.run.instructions_only or not responses else chain >> response_step(config)


# -- tagging and filtering -----------------------------------------------------------------------
def tagging_steps(config: RecipeConfig, *, reward_difference: bool = False) -> StepChain:
    """The paper's dataset analysis, the stages of :meth:`RecipeConfig.stages` in order: task category,
    quality, difficulty, safety, language, reward (and, with ``reward_difference``, base responses and
    the reward difference), minimum-neighbour distance."""
    from magpie_hf.steps import (
        Difficulty,
        InputQuality,
        Language,
        LlamaGuard,
        Neighbors,
        TaskCategory,
    )

    stages = config.stages()
    judge_options: dict[str, Any] = {"explanations": config.tagging.judge_explanations,
                                     "chat_template_kwargs": judge_chat_template_kwargs(config)}
    if config.tagging.judge_max_tokens:
        judge_options["max_tokens"] = config.tagging.judge_max_tokens
    chain = StepChain()
    if "task_category" in stages:
        chain = chain >> TaskCategory(engine=config.judge_engine(), **judge_options)
    if "input_quality" in stages:
        chain = chain >> InputQuality(engine=config.judge_engine(), **judge_options)
    if "difficulty" in stages:
        chain = chain >> Difficulty(engine=config.judge_engine(), **judge_options)
    if "safety" in stages:
        chain = chain >> LlamaGuard(engine=config.guard_engine())  # taxonomy from the model name (Guard 2 or 3)
    if "language" in stages and config.instructions.language is None:  # --language tags right after step 1
        chain = chain >> Language()
    if reward_difference:
        chain = chain >> instruct_vs_base_reward_steps(config)
    elif "reward" in stages:
        chain = chain >> reward_step(config, name="instruct_reward")
    if "neighbors" in stages:
        model = config.tagging.embedding_model or EMBEDDED
        chain = chain >> (Neighbors.embedded() if model == EMBEDDED else Neighbors(model=model))
    return chain


def reward_step(config: RecipeConfig, *, name: str, **columns: str) -> Step:
    """The reward step: the ``--reward_model`` (a sequence-classification RM), or with ``"judge"`` the
    judge model rating responses 1-10 (``JudgeReward``, the mean of ``--judge_reward_samples`` ratings).

    ``columns`` renames the columns it reads and writes (``response_column``, ``output_column``,
    ``model_column``), e.g. to score ``base_output`` into ``base_reward``.
    """
    from magpie_hf.steps import JudgeReward, RewardModel

    model = config.tagging.reward_model or "judge"
    if model == "judge":
        return JudgeReward(engine=config.judge_engine(), num_samples=config.tagging.judge_reward_samples,
                           chat_template_kwargs=judge_chat_template_kwargs(config), name=name, **columns)
    return RewardModel(model=model, trust_remote_code=config.engine.trust_remote_code, name=name, **columns)


def instruct_vs_base_reward_steps(config: RecipeConfig) -> StepChain:
    """The instruct-vs-base reward chain (arXiv 2406.08464, Appendix A.3): the instruct response's reward, the
    base model's in-context (URIAL-style) response to the same instruction, its reward under the same reward
    model, and their difference. ``magpie_pro``'s reward-difference filters and ``magpie_po``'s instruct-vs-base
    pairs both read it."""
    from magpie_hf.steps import BaseResponses, RewardDifference

    return (
        StepChain([reward_step(config, name="instruct_reward")])
        >> BaseResponses(engine=config.base_engine(), max_tokens=config.responses.response_max_tokens)
        >> reward_step(config, name="base_reward", response_column="base_output", output_column="base_reward",
                       model_column="base_reward_model")
        >> RewardDifference()
    )


def filter_step(config: RecipeConfig, steps: Sequence[Step] = ()) -> Step:
    """The ``--filter`` preset, its length cut scaled by this run's size against the paper's, after the
    conditions every trainable config needs on the columns ``steps`` write
    (:func:`~magpie_hf.steps.filters.hygiene_conditions`: no error, no truncated response, guard-safe)."""
    from magpie_hf.steps.filters import hygiene_conditions, preset_filter

    paper_rows = config.recipe.paper.get("num_rows") or config.run.num_rows
    columns = [c for step in steps for c in step.output_features()]
    return preset_filter(config.section(FilterArguments).filter, scale=config.run.num_rows / paper_rows,
                         before=hygiene_conditions(columns))


def hygiene_step(steps: Sequence[Step]) -> Step:
    """For a recipe without a ``--filter`` preset (magpie_mt, magpie_reasoning): a filter of only
    :func:`~magpie_hf.steps.filters.hygiene_conditions` on the columns ``steps`` write, which makes the ``filtered``
    config (no errored, truncated or guard-unsafe row)."""
    from magpie_hf.steps.filters import Filter, hygiene_conditions

    return Filter(conditions=hygiene_conditions([c for step in steps for c in step.output_features()]), name="filtered")


def filter_needs_reward_difference(name: str) -> bool:
    from magpie_hf.steps.filters import FILTER_PRESETS

    return any(c.column == "reward_difference" for c in FILTER_PRESETS[name].conditions)


# -- each recipe's chain -------------------------------------------------------------------------
def filtered_steps(config: RecipeConfig) -> StepChain:
    """magpie_pro / magpie_air: steps 1 and 2, the tagging stages (with the instruct-vs-base reward chain when
    the ``--filter`` preset reads ``reward_difference``) and the ``--filter`` preset; without a filter
    (``--no_filter``, ``--instructions_only``) the chain stops after the tags."""
    options = config.section(FilterArguments)
    filtering = not options.no_filter and not config.run.instructions_only
    steps = generation_steps(config)
    if not config.run.instructions_only:
        reward_difference = filtering and filter_needs_reward_difference(options.filter)
        steps = steps >> tagging_steps(config, reward_difference=reward_difference)
    if filtering:
        steps = steps >> filter_step(config, steps)
    return steps


def reasoning_steps(config: RecipeConfig) -> StepChain:
    """magpie_reasoning: steps 1 and 2 (the thinking kept apart), the tags, and the hygiene filter that makes
    the ``filtered`` config (no errored or truncated answer); only step 1 with ``--instructions_only``."""
    steps = generation_steps(config)
    if config.run.instructions_only:
        return steps
    steps = steps >> tagging_steps(config)
    return steps >> hygiene_step(steps)


def multi_turn_filters(config: RecipeConfig) -> tuple[Any, ...]:
    """``--instruction_filters`` of magpie_mt, by name."""
    from magpie_hf.steps.postprocess import filters_from_names

    try:
        return tuple(filters_from_names(config.section(MultiTurnArguments).instruction_filters))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def multi_turn_step(config: RecipeConfig, filters: tuple = ()) -> MultiTurn:
    """The follow-up turns, from the instruction model, as ``config``'s multi-turn section says."""
    from magpie_hf.prompts.languages import language_system_prompt
    from magpie_hf.steps.multi_turn import MULTI_TURN_SYSTEM_PROMPT, MultiTurn

    mt = config.section(MultiTurnArguments)
    if mt.n_turns < 1 or not 1 <= mt.min_turns <= mt.n_turns:
        raise ConfigError("need --n_turns >= 1 and 1 <= --min_turns <= --n_turns")
    if config.run.instructions_only:
        raise ConfigError("multi-turn conversations need responses; drop --instructions_only")
    r = config.responses
    if (r.response_model != config.instructions.model
            or response_chat_template_kwargs(config) != config.instructions.template_kwargs()):
        raise ConfigError("in magpie_mt one model writes every turn, queries and replies (one engine, one set of "
                          "chat template options); drop --response_model and --response_chat_template_kwargs")
    system = {"default": MULTI_TURN_SYSTEM_PROMPT, "none": None}.get(mt.mt_system_prompt or "none", mt.mt_system_prompt)
    language = config.instructions.target_language()
    if language is not None and mt.mt_system_prompt == "default":
        # --language steers the follow-up queries too: the built-in prompt plus the language's own (or the
        # --system_prompt written in it, for a language without a built-in one)
        try:
            steer = config.instructions.system_prompt or language_system_prompt(language)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        system = f"{MULTI_TURN_SYSTEM_PROMPT}\n\n{steer}"
    return MultiTurn(  # follow-up queries and their replies come from the instruction model
        engine=config.instruction_engine(),
        n_turns=mt.n_turns,
        end_with_user=mt.end_with_user,
        mt_system_prompt=system,
        query_max_tokens=config.instructions.instruction_max_tokens,
        temperature=r.response_temperature,  # later replies are sampled as turn 1's
        top_p=r.response_top_p,
        repetition_penalty=r.response_repetition_penalty,
        max_tokens=r.response_max_tokens,
        postprocess=filters,
        min_turns=mt.min_turns,
        chat_template_kwargs=config.instructions.template_kwargs(),
    )


def multi_turn_steps(config: RecipeConfig) -> StepChain:
    """magpie_mt: turn 1 (steps 1 and 2, with ``--instruction_filters``), the follow-up turns, and the hygiene
    filter that makes the ``filtered`` config (no errored or truncated first response)."""
    filters = multi_turn_filters(config)
    steps = generation_steps(config, postprocess=filters) >> multi_turn_step(config, filters)
    return steps >> hygiene_step(steps)


def preference_steps(config: RecipeConfig) -> StepChain:
    """magpie_po's pairs (``--pairs``): instruct-vs-base (the paper: the instruct response against the base
    model's, kept when the reward difference passes ``--tau``) or best-of-n (``--num_responses`` samples, the
    best against the worst, kept when the gap passes ``--margin``)."""
    from magpie_hf.steps.preferences import (
        BestOfNPairs,
        InstructVsBasePairs,
        MultiResponseRewards,
        MultiResponses,
    )

    if config.run.instructions_only:
        raise ConfigError("preference pairs need responses; drop --instructions_only")
    po = config.section(PreferenceArguments)
    if po.pairs == "instruct-vs-base":
        return generation_steps(config) >> instruct_vs_base_reward_steps(config) >> InstructVsBasePairs(tau=po.tau)
    instructions = generation_steps(config, responses=False)  # best-of-n samples its own answers
    r = config.responses
    return (
        instructions
        >> MultiResponses(engine=config.response_engine(), n=po.num_responses, temperature=po.sampling_temperature,
                          top_p=r.response_top_p, repetition_penalty=r.response_repetition_penalty,
                          max_tokens=r.response_max_tokens, chat_template_kwargs=response_chat_template_kwargs(config))
        >> MultiResponseRewards(reward=reward_step(config, name="response_reward"))
        >> BestOfNPairs(margin=po.margin)
    )
