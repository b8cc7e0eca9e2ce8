"""Magpie-Pro: instructions and responses from Llama-3-70B-Instruct with the paper's settings,
tagged, de-duplicated and filtered (arXiv 2406.08464, Table 6 decoding mixture, Table 4 filters).

    python recipes/magpie_pro.py --preset cpu                    # embedded SmolLM2, a few minutes on a CPU
    python recipes/magpie_pro.py --num-rows 1000000              # the paper's run (4 GPUs, vLLM)
    python recipes/magpie_pro.py --preset cpu --push-to-hub me/magpie-pro-demo --version 1.0.0
"""

from __future__ import annotations

import logging
import sys

from magpie_hf.pipeline import Pipeline
from magpie_hf.recipe import RecipeDefaults, generation_steps, recipe_parser, resolve_settings, run_info
from magpie_hf.steps import PRO_MIXTURE

PRO = RecipeDefaults(
    name="magpie_pro",
    model="meta-llama/Meta-Llama-3-70B-Instruct",
    num_rows=1_000_000,
    mixture=PRO_MIXTURE,
    tensor_parallel_size=4,
)


def main(argv: list[str] | None = None, defaults: RecipeDefaults = PRO) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = recipe_parser(defaults, __doc__).parse_args(argv)
    settings = resolve_settings(args, defaults)

    pipeline = Pipeline(generation_steps(settings), settings.output_dir, shard_size=settings.shard_size, seed=settings.seed)
    raw = pipeline.run()
    configs = {"raw": raw}

    from magpie_hf.hub import finish_recipe, save_dataset_folder

    info = run_info(settings, pipeline.manifest(), pre_query_template=raw[0]["gen_input_configs"]["pre_query_template"] if len(raw) else None)
    folder = save_dataset_folder(settings.dataset_dir, configs, info, source_model_license=settings.source_model_license)
    print(f"Wrote {len(raw)} rows to {folder}")
    return finish_recipe(args, folder, info)


if __name__ == "__main__":
    sys.exit(main())
