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

import sys

from magpie_hf.cli import command_line
from magpie_hf.recipe import (
    TAGGING_STAGES,
    FilterArguments,
    Recipe,
    filter_outputs,
    filtered_steps,
    parse_recipe,
    run_recipe,
)

PRO = Recipe(
    name="magpie_pro",
    description=__doc__,
    paper={"model": "meta-llama/Meta-Llama-3-70B-Instruct", "num_rows": 1_000_000, "mixture": "pro",
           "tensor_parallel_size": 4, "newline_stop": True},
    sections=(FilterArguments,),
    stages=TAGGING_STAGES,
)


def main(argv: list[str] | None = None, recipe: Recipe = PRO) -> int:
    with command_line() as cli:
        config = parse_recipe(recipe, argv)
        cli.debug = config.run.debug
        return run_recipe(config, filtered_steps(config), filter_outputs(config))


if __name__ == "__main__":
    sys.exit(main())
