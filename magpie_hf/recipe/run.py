"""Running a recipe: the hardware check, ``--dry-run``, the pipeline on the chosen executor, the dataset folder
with its card, and publishing (:func:`run_recipe`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from magpie_hf.engines import resolve_backend
from magpie_hf.errors import ConfigError
from magpie_hf.hardware import Hardware
from magpie_hf.recipe.arguments import HubArguments
from magpie_hf.recipe.config import RecipeConfig
from magpie_hf.recipe.outputs import Finish
from magpie_hf.recipe.provenance import run_info
from magpie_hf.steps.base import MissingColumnsError, StepChain


def check_hardware(config: RecipeConfig) -> None:
    """Stop early, with the way out, when this machine cannot run the recipe's models (a Ray cluster
    is judged when it starts)."""
    if config.ray.ray is not None:
        return
    hardware = Hardware.local()
    engines = [config.instruction_engine(), config.response_engine()]
    if not any(resolve_backend(e, hardware, log=False) == "vllm" for e in engines):
        return
    engine = engines[0]
    if not hardware.cuda:
        raise ConfigError(
            f"This run uses {engine.model} with vLLM on {engine.tensor_parallel_size} GPU(s), and no CUDA GPU was found.\n"
            f"  Try it on this CPU:    python recipes/{config.recipe.name}.py --preset cpu\n"
            f"  Or pick a model/engine: --model MODEL --engine transformers   (or --engine openai --base_url URL)"
        )
    if not hardware.vllm:
        raise ConfigError("The vLLM engine needs vllm: pip install 'magpie-hf[vllm]'  (or pass --engine transformers)")


def run_recipe(config: RecipeConfig, steps: StepChain, finish: Finish | None = None) -> int:
    """Run ``steps`` as ``config`` says and write (and maybe publish) the dataset; 0 when done, 1 when the dataset
    was written but not pushed as asked.

    ``finish(pipeline, last_stage)`` (:mod:`magpie_hf.recipe.outputs`) returns the dataset's configs
    (``{"raw": ...}``) and extra provenance for the card; by default the last stage is the ``raw`` config.
    ``--dry-run`` prints the resolved configuration and the stage plan and loads nothing. What the user's
    settings, files, servers or Hub cause is raised as a :class:`~magpie_hf.errors.MagpieError`
    (:func:`magpie_hf.cli.command.command_line` turns it into one ``error:`` line).
    """
    from magpie_hf.pipeline import Pipeline

    pipeline = Pipeline(steps, config.output_dir, shard_size=config.run.shard_size, seed=config.run.seed,
                        overwrite=config.run.overwrite)
    try:
        pipeline.check_columns()
    except MissingColumnsError as err:
        raise ConfigError(f"{err}\nIn a recipe: add the stages that write them to --stages, or, when the "
                          "filter needs them, choose another --filter or pass --no_filter.") from err
    executor = config.ray.executor()
    if config.run.dry_run:
        import yaml

        print(dataclasses.replace(config, run=dataclasses.replace(config.run, dry_run=False)).to_yaml())
        print("# stage plan (nothing was loaded)")
        print(yaml.safe_dump({"stages": pipeline.plan(executor)}, sort_keys=False, allow_unicode=True, width=120))
        return 0
    check_hardware(config)
    if config.hub.push_to_hub:  # token, repo and tag, before hours of generation (the Hub, when reachable)
        from magpie_hf.hub.publishing import check_publish

        check_publish(config.hub.push_to_hub, config.hub.version or "", force=config.hub.force)
    last = pipeline.run(executor=executor)
    configs, extra = finish(pipeline, last) if finish else ({"raw": last}, {})

    from magpie_hf.hub import save_dataset_folder

    info = run_info(config, pipeline.manifest(), **extra)
    # the card's license: --license, else the license of the models that wrote the rows (info["models"])
    folder = save_dataset_folder(config.dataset_dir, configs, info, license=config.hub.license)
    print(f"Wrote {', '.join(f'{name}: {_rows(ds)} rows' for name, ds in configs.items())} to {folder}")
    result = publish_or_hint(config.hub, folder)
    if config.hub.push_to_hub and (result is None or not result.pushed):
        print(f"error: the dataset was not pushed to {config.hub.push_to_hub} (see above); it is kept at {folder}.",
              file=sys.stderr)
        return 1  # the request was not met: a scheduler must not see success
    return 0


def _rows(dataset: Any) -> int:
    return sum(len(split) for split in dataset.values()) if isinstance(dataset, dict) else len(dataset)


def publish_or_hint(hub: HubArguments, folder: Path) -> Any:
    """Publish ``folder`` when ``--push_to_hub`` was given (the :class:`~magpie_hf.hub.PublishResult`); otherwise
    print how to load and push it (None)."""
    from magpie_hf.hub.publishing import finish_recipe

    return finish_recipe(folder, repo_id=hub.push_to_hub, version=hub.version, private=hub.private,
                         revision=hub.revision, force=hub.force)
