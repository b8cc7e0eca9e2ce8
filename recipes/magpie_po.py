"""Magpie-PO: preference pairs for DPO from Magpie instructions (arXiv 2406.08464, Appendix A.3).

Two ways to pair (``--pairs``):

- ``instruct-vs-base`` (the paper, default): chosen = the instruct model's greedy response,
  rejected = the base model's in-context (URIAL-style) response, kept when
  ``instruct_reward - base_reward > --tau`` under the same reward model (FsfairX-LLaMA3-RM);
- ``best-of-n`` (as the published Magpie PO sets): ``--num_responses`` samples per instruction at
  ``--sampling_temperature``, each scored; chosen = best, rejected = worst, kept when the gap is
  more than ``--margin``.

The ``dpo`` config (train/test) is in TRL's conversational preference format; ``raw`` keeps every
row with its scores.

    python recipes/magpie_po.py --preset cpu                      # embedded SmolLM2 for every model, minutes on a CPU
    python recipes/magpie_po.py --num_rows 100000                 # Llama-3-8B-Instruct vs Llama-3-8B, FsfairX RM (GPU)
    python recipes/magpie_po.py --pairs best-of-n --num_rows 100000
"""

from __future__ import annotations

import sys

from magpie_hf.config import PreferenceArguments
from magpie_hf.logs import setup_logging
from magpie_hf.recipe import (
    EMBEDDED,
    Recipe,
    RecipeConfig,
    generation_steps,
    parse_recipe,
    response_chat_template_kwargs,
    reward_step,
    run_recipe,
)
from magpie_hf.steps.base import StepChain
from magpie_hf.steps.base_responses import BaseResponses, RewardDifference
from magpie_hf.steps.preferences import (
    BestOfNPairs,
    InstructVsBasePairs,
    MultiResponseRewards,
    MultiResponses,
    split_preferences,
)

PO = Recipe(
    name="magpie_po",
    description=__doc__,
    paper={"model": "meta-llama/Meta-Llama-3-8B-Instruct", "num_rows": 100_000, "mixture": "air",
           "tensor_parallel_size": 1, "newline_stop": True},
    cpu={"num_rows": 160},  # enough rows that the pairs surviving the threshold number 50 or more
    sections=(PreferenceArguments,),
    stages=("reward",),
    choose_stages=False,
)


def pair_steps(config: RecipeConfig) -> StepChain:
    po = config.section(PreferenceArguments)
    if po.pairs == "instruct-vs-base":
        return (
            generation_steps(config)
            >> BaseResponses(engine=config.base_engine(), max_tokens=config.responses.response_max_tokens)
            >> reward_step(config, name="instruct_reward")
            >> reward_step(config, name="base_reward", response_column="base_output", output_column="base_reward")
            >> RewardDifference()
            >> InstructVsBasePairs(tau=po.tau)
        )
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


def main(argv: list[str] | None = None, recipe: Recipe = PO) -> int:
    setup_logging()
    config = parse_recipe(recipe, argv)
    po = config.section(PreferenceArguments)
    if config.run.instructions_only:
        raise SystemExit("error: preference pairs need responses; drop --instructions_only")
    steps = pair_steps(config)

    def finish(pipeline, pairs):
        raw = pipeline.stage_dataset(len(steps) - 2)  # every row with its scores, before pairing
        if len(pairs) == 0:
            raise SystemExit(
                f"No preference pair survived out of {len(raw)} scored rows (see {config.output_dir / 'manifest.json'} "
                "for the drop counts). Generate more rows (--num_rows) or lower --tau / --margin."
            )
        dpo = split_preferences(pairs, test_size=po.test_size, seed=config.run.seed)
        method = ({"tau": po.tau} if po.pairs == "instruct-vs-base" else
                  {"num_responses": po.num_responses, "temperature": po.sampling_temperature, "margin": po.margin})
        extra = {"preference_pairs": {"method": po.pairs, **method, "test_size": po.test_size,
                                      "pairs": {split: len(ds) for split, ds in dpo.items()}, "rows_scored": len(raw)}}
        if po.pairs == "instruct-vs-base":
            base = config.base_engine().describe()
            if config.tagging.base_model == EMBEDDED:
                base += (" (stand-in: --preset cpu has no embedded base model; the paper uses "
                         "meta-llama/Meta-Llama-3-8B, URIAL-prompted)")
            extra["models"] = {"base": base}
        return {"dpo": dpo, "raw": raw}, extra

    return run_recipe(config, steps, finish)


if __name__ == "__main__":
    sys.exit(main())
