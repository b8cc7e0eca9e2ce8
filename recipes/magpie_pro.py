"""Magpie-Pro: instructions and responses from Llama-3-70B-Instruct with the paper's settings,
tagged, de-duplicated and filtered (arXiv 2406.08464: Table 6 decoding mixture, Table 4 filters).

Writes OUTPUT_DIR/dataset/ with two configs: `filtered` (the default: what to train on; no errored, truncated or
guard-unsafe row, then the --filter preset) and `raw` (every tagged row).

    python recipes/magpie_pro.py --preset cpu                    # embedded SmolLM2, minutes on a CPU
    python recipes/magpie_pro.py                                 # the paper's run: 1M rows, vLLM, 4 GPUs
    python recipes/magpie_pro.py --config recipes/configs/magpie_pro/qwen2.5-72b-instruct.yaml \\
        --response_temperature 0.6 --judge_model Qwen/Qwen2.5-7B-Instruct --num_rows 200000
    python recipes/magpie_pro.py --config recipes/configs/magpie_pro/llama-3.1-8b-instruct.yaml --dry_run
    python recipes/magpie_pro.py --preset cpu --push_to_hub me/magpie-pro-demo --version 1.0.0
"""

from __future__ import annotations

import logging
import sys

from magpie_hf.config import FilterArguments
from magpie_hf.logs import setup_logging
from magpie_hf.recipe import (
    Recipe,
    filter_needs_reward_difference,
    filter_report,
    filter_step,
    generation_steps,
    parse_recipe,
    run_recipe,
    tagging_steps,
)
from magpie_hf.config import TAGGING_STAGES

PRO = Recipe(
    name="magpie_pro",
    description=__doc__,
    paper={"model": "meta-llama/Meta-Llama-3-70B-Instruct", "num_rows": 1_000_000, "mixture": "pro",
           "tensor_parallel_size": 4, "newline_stop": True},
    sections=(FilterArguments,),
    stages=TAGGING_STAGES,
)

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None, recipe: Recipe = PRO) -> int:
    setup_logging()
    config = parse_recipe(recipe, argv)
    options = config.section(FilterArguments)
    filtering = not options.no_filter and not config.run.instructions_only
    steps = generation_steps(config)
    if not config.run.instructions_only:
        steps = steps >> tagging_steps(config, reward_difference=filtering and filter_needs_reward_difference(options.filter))
    if filtering:
        steps = steps >> filter_step(config, steps)

    def finish(pipeline, last):
        if not filtering:
            return {"raw": last}, {}
        configs = {"filtered": last, "raw": pipeline.stage_dataset(len(steps) - 2)}  # the first is the default
        report = filter_report(pipeline.manifest()["stages"][-1])
        if len(last) == 0:  # datasets cannot load an empty split: say so instead of writing one
            del configs["filtered"]
            logger.warning("Filter %s removed every row (%s); writing only the 'raw' config. Try another --filter.",
                           options.filter, ", ".join(f"{r['condition']}: {r['removed']}" for r in report))
        return configs, {"filter": options.filter, "filter_report": report}

    return run_recipe(config, steps, finish)


if __name__ == "__main__":
    sys.exit(main())
