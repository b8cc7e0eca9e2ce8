"""Magpie-Air: the Magpie-Pro recipe with Llama-3-8B-Instruct and the Air decoding mixture
(arXiv 2406.08464, Table 6: 3M rows over 12 temperature/top_p settings).

    python recipes/magpie_air.py --preset cpu
    python recipes/magpie_air.py --num_rows 3000000
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

AIR = Recipe(
    name="magpie_air",
    description=__doc__,
    paper={"model": "meta-llama/Meta-Llama-3-8B-Instruct", "num_rows": 3_000_000, "mixture": "air",
           "tensor_parallel_size": 1, "newline_stop": True},
    sections=(FilterArguments,),
    stages=TAGGING_STAGES,
)


def main(argv: list[str] | None = None, recipe: Recipe = AIR) -> int:
    """The steps and outputs of magpie_pro (:func:`~magpie_hf.recipe.filtered_steps`), with Air's model and mixture."""
    with command_line() as cli:
        config = parse_recipe(recipe, argv)
        cli.debug = config.run.debug
        return run_recipe(config, filtered_steps(config), filter_outputs(config))


if __name__ == "__main__":
    sys.exit(main())
