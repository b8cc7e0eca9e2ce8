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

from magpie_hf.cli import command_line
from magpie_hf.recipe import (
    MultiTurnArguments,
    Recipe,
    multi_turn_outputs,
    multi_turn_steps,
    parse_recipe,
    run_recipe,
)

PRO_MT = Recipe(
    name="magpie_mt",
    description=__doc__,
    paper={"model": "meta-llama/Meta-Llama-3-70B-Instruct", "num_rows": 300_000, "mixture": "pro",
           "tensor_parallel_size": 4, "newline_stop": True},
    sections=(MultiTurnArguments,),
    choose_stages=False,
)


def main(argv: list[str] | None = None, recipe: Recipe = PRO_MT) -> int:
    with command_line() as cli:
        config = parse_recipe(recipe, argv)
        cli.debug = config.run.debug
        return run_recipe(config, multi_turn_steps(config), multi_turn_outputs)


if __name__ == "__main__":
    sys.exit(main())
