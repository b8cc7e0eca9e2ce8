"""Magpie-PO: preference pairs for DPO from Magpie instructions (arXiv 2406.08464, Appendix A.3).

Two ways to pair (``--pairs``):

- ``instruct-vs-base`` (the paper, default): chosen = the instruct model's greedy response,
  rejected = the base model's in-context (URIAL-style) response, kept when
  ``instruct_reward - base_reward > --tau`` under the same reward model (FsfairX-LLaMA3-RM);
- ``best-of-n`` (as the published Magpie PO sets): ``--num-responses`` samples per instruction at
  ``--sampling-temperature``, each scored; chosen = best, rejected = worst, kept when the gap is
  more than ``--margin``.

The ``dpo`` config (train/test) is in TRL's conversational preference format; ``raw`` keeps every
row with its scores.

    python recipes/magpie_po.py --preset cpu                      # embedded SmolLM2 for every model, minutes on a CPU
    python recipes/magpie_po.py --num-rows 100000                 # Llama-3-8B-Instruct vs Llama-3-8B, FsfairX RM (GPU)
    python recipes/magpie_po.py --pairs best-of-n --num-rows 100000
"""

from __future__ import annotations

import argparse
import logging
import sys

from magpie_hf.engines import EngineConfig
from magpie_hf.recipe import (
    RecipeDefaults,
    RecipeSettings,
    generation_steps,
    recipe_parser,
    resolve_settings,
    reward_step,
    run_info,
)
from magpie_hf.steps import AIR_MIXTURE
from magpie_hf.steps.base import StepChain
from magpie_hf.steps.base_responses import BaseResponses, RewardDifference
from magpie_hf.steps.preferences import (
    BestOfNPairs,
    InstructVsBasePairs,
    MultiResponseRewards,
    MultiResponses,
    split_preferences,
)

PO = RecipeDefaults(
    name="magpie_po",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    num_rows=100_000,
    cpu_num_rows=160,  # enough rows that the pairs surviving the threshold number 50 or more
    mixture=AIR_MIXTURE,
    tensor_parallel_size=1,
)


def parser(defaults: RecipeDefaults = PO) -> argparse.ArgumentParser:
    p = recipe_parser(defaults, __doc__)
    group = p.add_argument_group("preference pairs")
    group.add_argument("--pairs", choices=("instruct-vs-base", "best-of-n"), default="instruct-vs-base",
                       help="instruct-vs-base: the paper's Appendix A.3; best-of-n: as the published Magpie PO sets")
    group.add_argument("--base-model", default=None, help=f"base model for --pairs instruct-vs-base (paper: {defaults.base_model})")
    group.add_argument("--reward-model", default=None,
                       help=f"sequence-classification reward model (paper: {defaults.reward_model}; --preset cpu: the embedded model as a 1-10 judge)")
    group.add_argument("--tau", type=float, default=0.0, help="instruct-vs-base: keep pairs with reward difference > tau")
    group.add_argument("--margin", type=float, default=0.0, help="best-of-n: keep pairs whose best-worst reward gap is > 0 and >= margin")
    group.add_argument("--num-responses", type=int, default=5, help="best-of-n: answers sampled per instruction")
    group.add_argument("--sampling-temperature", type=float, default=0.8, help="best-of-n: temperature of those answers")
    group.add_argument("--test-size", type=float, default=0.02, help="share of pairs in the test split (at least one)")
    return p


def pair_steps(settings: RecipeSettings, args: argparse.Namespace, base: EngineConfig) -> StepChain:
    generation = generation_steps(settings)
    if args.pairs == "instruct-vs-base":
        return (
            generation
            >> BaseResponses(engine=base, max_tokens=settings.response_max_tokens)
            >> reward_step(settings, reward_model=args.reward_model, name="instruct_reward")
            >> reward_step(settings, reward_model=args.reward_model, name="base_reward", response_column="base_output", output_column="base_reward")
            >> RewardDifference()
            >> InstructVsBasePairs(tau=args.tau)
        )
    instructions = generation[0]  # best-of-n samples its own answers
    return (
        StepChain([instructions])
        >> MultiResponses(engine=settings.engine, n=args.num_responses, temperature=args.sampling_temperature,
                          max_tokens=settings.response_max_tokens)
        >> MultiResponseRewards(reward=reward_step(settings, reward_model=args.reward_model, name="response_reward"))
        >> BestOfNPairs(margin=args.margin)
    )


def main(argv: list[str] | None = None, defaults: RecipeDefaults = PO) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser(defaults).parse_args(argv)
    settings = resolve_settings(args, defaults)
    base = settings.base
    if args.base_model:
        base = EngineConfig(model=args.base_model, backend=settings.engine.backend, base_url=settings.engine.base_url,
                            tensor_parallel_size=settings.engine.tensor_parallel_size,
                            trust_remote_code=settings.engine.trust_remote_code)

    steps = pair_steps(settings, args, base)
    pipeline = settings.pipeline(steps)
    pairs = pipeline.run(executor=settings.executor())
    raw = pipeline.stage_dataset(len(steps) - 2)  # every row with its scores, before pairing
    if len(pairs) == 0:
        raise SystemExit(
            f"No preference pair survived out of {len(raw)} scored rows (see {settings.output_dir / 'manifest.json'} "
            "for the drop counts). Generate more rows (--num-rows) or lower --tau / --margin."
        )
    dpo = split_preferences(pairs, test_size=args.test_size, seed=settings.seed)

    from magpie_hf.hub import finish_recipe, save_dataset_folder

    scorer = args.reward_model or settings.reward_model or f"{settings.judge.describe()} as a 1-10 judge (JudgeReward)"
    info = run_info(
        settings,
        pipeline.manifest(),
        pre_query_template=raw[0]["gen_input_configs"]["pre_query_template"] if len(raw) else None,
        preference_pairs={
            "method": args.pairs,
            **({"tau": args.tau} if args.pairs == "instruct-vs-base" else
               {"num_responses": args.num_responses, "temperature": args.sampling_temperature, "margin": args.margin}),
            "test_size": args.test_size,
            "pairs": {split: len(ds) for split, ds in dpo.items()},
            "rows_scored": len(raw),
        },
    )
    info["models"]["reward"] = scorer
    if args.pairs == "instruct-vs-base":
        info["models"]["base"] = base.describe()
        if settings.is_cpu_preset and not args.base_model:
            info["models"]["base"] += (
                f" (stand-in: --preset cpu has no embedded base model; the paper uses {defaults.base_model},"
                " URIAL-prompted)"
            )
    folder = save_dataset_folder(settings.dataset_dir, {"dpo": dpo, "raw": raw}, info,
                                 source_model_license=settings.source_model_license)
    print(f"Wrote {len(dpo['train'])} train + {len(dpo['test'])} test preference pairs "
          f"(from {len(raw)} rows) to {folder}")
    finish_recipe(args, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
