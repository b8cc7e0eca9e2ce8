"""What a recipe writes once its pipeline ran: the dataset's configs (the first is the default) and the extra
provenance for its card. Each ``*_outputs`` function is a :data:`Finish` for :func:`magpie_hf.recipe.run.run_recipe`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from magpie_hf.errors import ConfigError
from magpie_hf.recipe.arguments import FilterArguments, PreferenceArguments
from magpie_hf.recipe.config import EMBEDDED, RecipeConfig

if TYPE_CHECKING:
    import datasets

    from magpie_hf.pipeline import Pipeline

logger = logging.getLogger(__name__)

#: what a recipe returns after its pipeline ran: the dataset's configs and extra provenance
Finish = Callable[["Pipeline", "datasets.Dataset"], tuple[dict[str, Any], dict[str, Any]]]


def filtered_and_raw(pipeline: "Pipeline", last: "datasets.Dataset", extra: dict[str, Any] | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dataset configs of a run whose last stage is a filter: ``filtered`` (the default, first) and ``raw`` (the
    stage before it), with the filter report. An empty ``filtered`` is left out with a warning (``datasets`` cannot
    load an empty split)."""
    report = filter_report(pipeline.manifest()["stages"][-1])
    configs = {"filtered": last, "raw": pipeline.stage_dataset(len(pipeline.steps) - 2)}
    if len(last) == 0:
        del configs["filtered"]
        logger.warning("The filter removed every row (%s); writing only the 'raw' config.",
                       ", ".join(f"{r['condition']}: {r['removed']}" for r in report))
    return configs, {**(extra or {}), "filter_report": report}


def filter_report(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{condition, removed}]`` of a finished filter stage, from its manifest counts (in order)."""
    prefix = "removed: "
    return [{"condition": k[len(prefix):], "removed": v} for k, v in stage.get("stats", {}).items() if k.startswith(prefix)]


def filter_outputs(config: RecipeConfig) -> Finish:
    """magpie_pro / magpie_air: ``filtered`` (the ``--filter`` preset's rows, the default) and ``raw``, with the
    filter and its report; only ``raw`` without a filter (``--no_filter``, ``--instructions_only``)."""
    options = config.section(FilterArguments)

    def finish(pipeline: "Pipeline", last: "datasets.Dataset") -> tuple[dict[str, Any], dict[str, Any]]:
        if options.no_filter or config.run.instructions_only:
            return {"raw": last}, {}
        configs = {"filtered": last, "raw": pipeline.stage_dataset(len(pipeline.steps) - 2)}
        report = filter_report(pipeline.manifest()["stages"][-1])
        if len(last) == 0:  # datasets cannot load an empty split: say so instead of writing one
            del configs["filtered"]
            logger.warning("Filter %s removed every row (%s); writing only the 'raw' config. Try another --filter.",
                           options.filter, ", ".join(f"{r['condition']}: {r['removed']}" for r in report))
        return configs, {"filter": options.filter, "filter_report": report}

    return finish


def reasoning_outputs(config: RecipeConfig) -> Finish | None:
    """magpie_reasoning: ``filtered`` and ``raw`` (:func:`filtered_and_raw`); with ``--instructions_only`` the
    instructions as ``raw``."""
    return None if config.run.instructions_only else filtered_and_raw


def multi_turn_outputs(pipeline: "Pipeline", last: "datasets.Dataset") -> tuple[dict[str, Any], dict[str, Any]]:
    """magpie_mt: ``filtered`` and ``raw``, with the multi-turn settings and the follow-up queries' filters."""
    from magpie_hf.steps.multi_turn import MultiTurn

    multi_turn = next(step for step in pipeline.steps if isinstance(step, MultiTurn))
    return filtered_and_raw(pipeline, last, {"multi_turn": multi_turn.config_summary(),
                                             "instruction_filters": [f.name for f in multi_turn.postprocess]})


def preference_outputs(config: RecipeConfig) -> Finish:
    """magpie_po: ``dpo`` (train/test pairs in TRL's conversational preference format, the default) and ``raw``
    (every row with its scores, before pairing), with the pairing method and counts. No pair surviving is a
    :class:`~magpie_hf.errors.ConfigError` naming the settings to change."""
    po = config.section(PreferenceArguments)

    def finish(pipeline: "Pipeline", pairs: "datasets.Dataset") -> tuple[dict[str, Any], dict[str, Any]]:
        from magpie_hf.steps.preferences import split_preferences

        raw = pipeline.stage_dataset(len(pipeline.steps) - 2)  # every row with its scores, before pairing
        if len(pairs) == 0:
            raise ConfigError(
                f"No preference pair survived out of {len(raw)} scored rows (see {config.output_dir / 'manifest.json'} "
                "for the drop counts). Generate more rows (--num_rows) or lower --tau / --margin."
            )
        dpo = split_preferences(pairs, test_size=po.test_size, seed=config.run.seed)
        method = ({"tau": po.tau} if po.pairs == "instruct-vs-base" else
                  {"num_responses": po.num_responses, "temperature": po.sampling_temperature, "margin": po.margin})
        extra = {"preference_pairs": {"method": po.pairs, **method, "test_size": po.test_size,
                                      "pairs": {split: len(ds) for split, ds in dpo.items()}, "rows_scored": len(raw)}}
        if po.pairs == "instruct-vs-base":
            base = config.base_engine().describe()
            if config.tagging.base_model == EMBEDDED:
                base += (" (stand-in: --preset cpu has no embedded base model; the paper uses "
                         "meta-llama/Meta-Llama-3-8B, URIAL-prompted)")
            extra["models"] = {"base": base}
        return {"dpo": dpo, "raw": raw}, extra

    return finish
