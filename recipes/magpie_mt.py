"""Magpie-Pro-MT: two-turn conversations from Llama-3-70B-Instruct (arXiv 2406.08464, Appendix A.1).

Turn 1 is Magpie-Pro (Table 6 decoding mixture, greedy responses); each later user query is sampled
(temperature 1.0, top_p 1.0) from the chat template's rendering of the conversation so far with a
multi-turn system prompt, and answered greedily with the normal template. Optional task control
(Appendix A.2) steers the first queries with a domain system prompt.

    python recipes/magpie_mt.py --preset cpu                          # embedded SmolLM2 on a CPU
    python recipes/magpie_mt.py --preset cpu --task math              # math conversations
    python recipes/magpie_mt.py --preset cpu --task_mix math=0.5,coding=0.5 --n_turns 3
    python recipes/magpie_mt.py --preset cpu --language de            # German, follow-up queries included
    python recipes/magpie_mt.py --num_rows 300000                     # the paper's run (4 GPUs, vLLM)
"""

from __future__ import annotations

import sys

from magpie_hf.config import MultiTurnArguments
from magpie_hf.languages import language_system_prompt
from magpie_hf.postprocess import filters_from_names
from magpie_hf.logs import setup_logging
from magpie_hf.recipe import (
    Recipe,
    RecipeConfig,
    filtered_and_raw,
    generation_steps,
    hygiene_step,
    parse_recipe,
    response_chat_template_kwargs,
    run_recipe,
)
from magpie_hf.steps.multi_turn import MULTI_TURN_SYSTEM_PROMPT, MultiTurn

PRO_MT = Recipe(
    name="magpie_mt",
    description=__doc__,
    paper={"model": "meta-llama/Meta-Llama-3-70B-Instruct", "num_rows": 300_000, "mixture": "pro",
           "tensor_parallel_size": 4, "newline_stop": True},
    sections=(MultiTurnArguments,),
    choose_stages=False,
)


def multi_turn_step(config: RecipeConfig, filters: tuple = ()) -> MultiTurn:
    """The follow-up turns, from the instruction model, as ``config``'s multi-turn section says."""
    mt = config.section(MultiTurnArguments)
    if mt.n_turns < 1 or not 1 <= mt.min_turns <= mt.n_turns:
        raise SystemExit("error: need --n_turns >= 1 and 1 <= --min_turns <= --n_turns")
    if config.run.instructions_only:
        raise SystemExit("error: multi-turn conversations need responses; drop --instructions_only")
    r = config.responses
    if r.response_model != config.instructions.model or response_chat_template_kwargs(config) != config.instructions.template_kwargs():
        raise SystemExit("error: in magpie_mt one model writes every turn, queries and replies (one engine, one set of "
                         "chat template options); drop --response_model and --response_chat_template_kwargs")
    system = {"default": MULTI_TURN_SYSTEM_PROMPT, "none": None}.get(mt.mt_system_prompt or "none", mt.mt_system_prompt)
    language = config.instructions.target_language()
    if language is not None and mt.mt_system_prompt == "default":
        # --language steers the follow-up queries too: the built-in prompt plus the language's own (or the
        # --system_prompt written in it, for a language without a built-in one)
        try:
            steer = config.instructions.system_prompt or language_system_prompt(language)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
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


def main(argv: list[str] | None = None, recipe: Recipe = PRO_MT) -> int:
    setup_logging()
    config = parse_recipe(recipe, argv)
    try:
        filters = filters_from_names(config.section(MultiTurnArguments).instruction_filters)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    multi_turn = multi_turn_step(config, filters)
    steps = generation_steps(config, postprocess=filters) >> multi_turn
    steps = steps >> hygiene_step(steps)  # `filtered` (the default config): no errored or truncated first response
    return run_recipe(config, steps, lambda pipeline, last: filtered_and_raw(
        pipeline, last, {"multi_turn": multi_turn.config_summary(), "instruction_filters": [f.name for f in filters]}
    ))


if __name__ == "__main__":
    sys.exit(main())
