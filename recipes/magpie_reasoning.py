"""Magpie-Reasoning: instructions from an instruct model steered to reasoning tasks, responses from a
reasoning model whose thinking block is kept apart (`reasoning`) from its final answer (`response`,
`conversations`), as the Magpie-Reasoning-V2 "CoT-Deepseek-R1-Llama-70B" datasets.

Paper-scale defaults: instructions from meta-llama/Llama-3.3-70B-Instruct with the `reasoning` task prompt
(--task reasoning; any --task / --task_mix works), responses from deepseek-ai/DeepSeek-R1-Distill-Llama-70B at
its recommended sampling (temperature 0.6, top_p 0.95), a thinking budget of 28,672 and an answer budget of
4,096 tokens (32,768 in all, DeepSeek-R1's generation length); 250K rows; tagged with task category, input
quality, difficulty and language as the published sets are. A response whose thinking block is cut by the
length limit, never closed or over its budget is dropped and counted (see the card's "Reasoning" section).

Writes OUTPUT_DIR/dataset/ with two configs: `filtered` (the default: no errored or truncated answer) and `raw`.

    python recipes/magpie_reasoning.py --preset cpu              # embedded SmolLM2 on both sides (its answers carry no thinking)
    python recipes/magpie_reasoning.py --config recipes/configs/magpie_reasoning/paper-v2-deepseek-r1-llama-70b.yaml
    python recipes/magpie_reasoning.py --config recipes/configs/magpie_reasoning/qwen3-32b-thinking.yaml --num_rows 10000
    python recipes/magpie_reasoning.py --response_model Qwen/QwQ-32B --thinking_budget 16384 --answer_budget 2048
"""

from __future__ import annotations

import sys

from magpie_hf.cli import command_line
from magpie_hf.recipe import (
    ReasoningArguments,
    Recipe,
    parse_recipe,
    reasoning_outputs,
    reasoning_steps,
    run_recipe,
)

REASONING = Recipe(
    name="magpie_reasoning",
    description=__doc__,
    paper={
        "model": "meta-llama/Llama-3.3-70B-Instruct",
        "mixture": None,
        "temperature": 1.0,
        "top_p": 1.0,
        "sanitize": True,  # the official Llama-3.3 runs' post-processing
        "task": "reasoning",
        "response_model": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        # DeepSeek-R1 model card, "Usage Recommendations": temperature 0.6, top_p 0.95, no system prompt
        "response_temperature": 0.6,
        "response_top_p": 0.95,
        "thinking_budget": 28_672,
        "answer_budget": 4_096,
        "num_rows": 250_000,
        "tensor_parallel_size": 4,
    },
    cpu={
        "response_model": None,  # the embedded model answers too
        "response_temperature": 0.0,
        "response_top_p": 1.0,
        "sanitize": False,
        "thinking_budget": 128,
        "answer_budget": 128,
    },
    sections=(ReasoningArguments,),
    stages=("task_category", "input_quality", "difficulty", "language"),
)


def main(argv: list[str] | None = None, recipe: Recipe = REASONING) -> int:
    with command_line() as cli:
        config = parse_recipe(recipe, argv)
        cli.debug = config.run.debug
        return run_recipe(config, reasoning_steps(config), reasoning_outputs(config))


if __name__ == "__main__":
    sys.exit(main())
