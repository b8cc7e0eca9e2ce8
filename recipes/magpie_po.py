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

from magpie_hf.cli import command_line
from magpie_hf.recipe import (
    PreferenceArguments,
    Recipe,
    parse_recipe,
    preference_outputs,
    preference_steps,
    run_recipe,
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


def main(argv: list[str] | None = None, recipe: Recipe = PO) -> int:
    with command_line() as cli:
        config = parse_recipe(recipe, argv)
        cli.debug = config.run.debug
        return run_recipe(config, preference_steps(config), preference_outputs(config))


if __name__ == "__main__":
    sys.exit(main())
