"""Magpie-Pro-MT: two-turn conversations from Llama-3-70B-Instruct (arXiv 2406.08464, Appendix A.1).

Turn 1 is Magpie-Pro (Table 6 decoding mixture, greedy responses); each later user query is sampled
(temperature 1.0, top_p 1.0) from the chat template's rendering of the conversation so far with a
multi-turn system prompt, and answered greedily with the normal template. Optional task control
(Appendix A.2) steers the first queries with a domain system prompt.

    python recipes/magpie_mt.py --preset cpu                          # embedded SmolLM2 on a CPU
    python recipes/magpie_mt.py --preset cpu --task math              # math conversations
    python recipes/magpie_mt.py --preset cpu --task-mix math=0.5,coding=0.5 --n-turns 3
    python recipes/magpie_mt.py --num-rows 300000                     # the paper's run (4 GPUs, vLLM)
"""

from __future__ import annotations

import argparse
import logging
import sys

from magpie_hf.postprocess import FILTERS, filters_from_names
from magpie_hf.recipe import RecipeDefaults, generation_steps, recipe_parser, resolve_settings, run_info
from magpie_hf.steps import PRO_MIXTURE
from magpie_hf.steps.multi_turn import MULTI_TURN_SYSTEM_PROMPT, MultiTurn
from magpie_hf.task_prompts import add_task_args, task_from_args

PRO_MT = RecipeDefaults(
    name="magpie_mt",
    model="meta-llama/Meta-Llama-3-70B-Instruct",
    num_rows=300_000,
    mixture=PRO_MIXTURE,
    tensor_parallel_size=4,
)


def add_multi_turn_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the multi-turn stage and of instruction post-processing."""
    group = parser.add_argument_group("multi-turn (paper, Appendix A.1)")
    group.add_argument("--n-turns", type=int, default=2, help="user turns per conversation (paper: 2)")
    group.add_argument("--end-with-user", action="store_true", help="end conversations with a user query, no reply")
    group.add_argument("--mt-system-prompt", default=MULTI_TURN_SYSTEM_PROMPT,
                       help="system message shown while sampling follow-up queries")
    group.add_argument("--no-mt-system-prompt", dest="mt_system_prompt", action="store_const", const=None,
                       help="sample follow-up queries without a system message (templates without one, e.g. Gemma)")
    group.add_argument("--min-turns", type=int, default=1, help="drop conversations with fewer user turns")
    group.add_argument("--instruction-filters", default="trailing_role_word,system_prompt_echo",
                       help=f"comma-separated post-processing of queries ({', '.join(FILTERS)}; 'none' for none)")
    return parser


def main(argv: list[str] | None = None, defaults: RecipeDefaults = PRO_MT) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = add_multi_turn_args(add_task_args(recipe_parser(defaults, __doc__)))
    args = parser.parse_args(argv)
    task = task_from_args(args)  # bad weights stop here, before any model loads
    try:
        filters = filters_from_names(args.instruction_filters)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.n_turns < 1 or not 1 <= args.min_turns <= args.n_turns:
        raise SystemExit("error: need --n-turns >= 1 and 1 <= --min-turns <= --n-turns")
    settings = resolve_settings(args, defaults)

    multi_turn = MultiTurn(
        engine=settings.engine,
        n_turns=args.n_turns,
        end_with_user=args.end_with_user,
        mt_system_prompt=args.mt_system_prompt,
        query_max_tokens=settings.instruction_max_tokens,
        max_tokens=settings.response_max_tokens,
        postprocess=filters,
        min_turns=args.min_turns,
    )
    steps = generation_steps(settings, task=task, postprocess=filters) >> multi_turn
    pipeline = settings.pipeline(steps)
    raw = pipeline.run(executor=settings.executor())

    from magpie_hf.hub import finish_recipe, save_dataset_folder

    info = run_info(
        settings,
        pipeline.manifest(),
        pre_query_template=raw[0]["gen_input_configs"]["pre_query_template"] if len(raw) else None,
        multi_turn=multi_turn.config_summary(),
        task_control={"weights": dict(task.weights), "prompts": dict(task.prompts)} if task else None,
        instruction_filters=[f.name for f in filters],
    )
    folder = save_dataset_folder(settings.dataset_dir, {"raw": raw}, info, source_model_license=settings.source_model_license)
    print(f"Wrote {len(raw)} conversations to {folder}")
    finish_recipe(args, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
