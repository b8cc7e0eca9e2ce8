"""Magpie-Pro: instructions and responses from Llama-3-70B-Instruct with the paper's settings,
tagged, de-duplicated and filtered (arXiv 2406.08464: Table 6 decoding mixture, Table 4 filters).

Writes OUTPUT_DIR/dataset/ with two configs, `raw` (every tagged row) and `filtered`.

    python recipes/magpie_pro.py --preset cpu                    # embedded SmolLM2, minutes on a CPU
    python recipes/magpie_pro.py                                 # the paper's run: 1M rows, vLLM, 4 GPUs
    python recipes/magpie_pro.py --preset cpu --push-to-hub me/magpie-pro-demo --version 1.0.0
"""

from __future__ import annotations

import logging
import sys

from magpie_hf.recipe import (
    RecipeDefaults,
    add_filter_args,
    filter_needs_reward_difference,
    filter_report,
    filter_name,
    filter_step,
    generation_steps,
    recipe_parser,
    resolve_settings,
    run_info,
    tagging_steps,
)
from magpie_hf.steps import PRO_MIXTURE
from magpie_hf.task_prompts import add_task_args, task_from_args

PRO = RecipeDefaults(
    name="magpie_pro",
    model="meta-llama/Meta-Llama-3-70B-Instruct",
    num_rows=1_000_000,
    mixture=PRO_MIXTURE,
    tensor_parallel_size=4,
)


def main(argv: list[str] | None = None, defaults: RecipeDefaults = PRO) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = recipe_parser(defaults, __doc__)
    add_filter_args(parser)
    add_task_args(parser)
    args = parser.parse_args(argv)
    args.filter = filter_name(args)
    task = task_from_args(args)  # bad weights stop here, before any model loads
    settings = resolve_settings(args, defaults)

    steps = generation_steps(settings, task=task) >> tagging_steps(
        settings, reward_difference=not args.no_filter and filter_needs_reward_difference(args.filter)
    )
    if not args.no_filter:
        steps = steps >> filter_step(settings, defaults)
    pipeline = settings.pipeline(steps)
    last = pipeline.run(executor=settings.executor())

    manifest = pipeline.manifest()
    if args.no_filter:
        configs = {"raw": last}
        extra = {}
    else:
        configs = {"raw": pipeline.stage_dataset(len(steps) - 2), "filtered": last}
        extra = {"filter": args.filter, "filter_report": filter_report(manifest["stages"][-1])}
        if len(last) == 0:  # datasets cannot load an empty split: say so instead of writing one
            del configs["filtered"]
            logging.getLogger(__name__).warning(
                "Filter %s removed every row (%s); writing only the 'raw' config. Try another --filter.",
                args.filter, ", ".join(f"{r['condition']}: {r['removed']}" for r in extra["filter_report"]))
    raw = configs["raw"]
    pre_query = raw[0]["gen_input_configs"]["pre_query_template"] if len(raw) else None
    if task is not None:
        extra["task_control"] = {"weights": dict(task.weights), "prompts": dict(task.prompts)}
    info = run_info(settings, manifest, pre_query_template=pre_query, **extra)

    from magpie_hf.hub import finish_recipe, save_dataset_folder

    folder = save_dataset_folder(
        settings.dataset_dir, configs, info,
        license=args.license, source_model_license=settings.source_model_license,
    )
    print(f"Wrote {', '.join(f'{name}: {len(ds)} rows' for name, ds in configs.items())} to {folder}")
    finish_recipe(args, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
