"""Provenance of a recipe run, for its dataset card: the command (secrets masked), the models, templates,
sampling and seeds, what the run's seed guarantees, the language and reasoning reports, and the stage counts
(:func:`run_info`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from magpie_hf.engines import resolve_backend

if TYPE_CHECKING:
    from magpie_hf.recipe.config import RecipeConfig


def language_report(config: RecipeConfig, stages: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Under ``--language``: the target, its system prompt and the share of step-1 rows lingua tagged as
    it (from the first ``Language`` stage), and how many rows ``--keep_language_only`` removed."""
    i = config.instructions
    language = i.target_language()
    if language is None:
        return None
    report: dict[str, Any] = {"language": language, "system_prompt": config.instruction_system_prompt(),
                              "keep_language_only": i.keep_language_only}
    tagged = next((s for s in stages if s.get("step") == "Language"), None)
    if tagged is not None:
        rows, hits = tagged.get("rows_in", 0), tagged.get("stats", {}).get("target_language_rows", 0)
        report.update(rows_tagged=rows, rows_in_language=hits, share=round(hits / rows, 4) if rows else None)
    kept = next((s for s in stages if s.get("stage", "").endswith("keep_language")), None)
    if kept is not None:
        report["rows_removed"] = kept.get("rows_in", 0) - kept.get("rows_out", 0)
    return report


def reproducibility_report(backends: Iterable[str], stages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the run's seed guarantees, for the card: per engine backend used, and whether vLLM ran
    batch-invariant (``vllm_batch_invariant`` in the stages' provenance, recorded where each stage ran).

    Example:
        >>> report = reproducibility_report(["vllm"], [{"provenance": {"vllm_batch_invariant": False}}])
        >>> report["vllm_batch_invariant"], report["statements"][0][:33]
        (False, 'Every row owns its sampling seeds')
    """
    used = sorted(set(backends))
    flags = {s["provenance"]["vllm_batch_invariant"] for s in stages if "vllm_batch_invariant" in (s.get("provenance") or {})}
    invariant = None if not flags else (flags == {True})
    statements = [
        "Every row owns its sampling seeds (from the run seed, its stage and its row; recorded in the row), so a "
        "resumed, re-sharded or distributed run draws the same random numbers for every row. It redraws the same "
        "text only where the model also computes the same logits for that row:"
    ]
    if "transformers" in used:
        statements.append(
            "transformers: each completion samples from its own generator, so its draws do not depend on its batch; "
            "its logits can (padding and batch shape change floating-point sums, most in bf16 on GPU). A rerun with "
            "the same shard and batch sizes, hardware and library versions redraws the same text; a re-sharded one "
            "can differ in some rows."
        )
    if "vllm" in used or invariant is not None:
        if invariant:
            statements.append(
                "vLLM ran batch-invariant (VLLM_BATCH_INVARIANT=1): a row's logits do not depend on the other requests "
                "in its batch, so a rerun with the same model, vLLM version, GPU type and tensor parallelism redraws "
                "the same text."
            )
        else:
            statements.append(
                "vLLM ran without batch invariance: a row's logits depend on which requests were batched with it, so a "
                "resumed or re-sharded run can draw different text from the same seeds. VLLM_BATCH_INVARIANT=1 (beta; "
                "compute capability 9.0+ GPUs such as H100/H200) makes them independent of the batch."
            )
    if {"openai", "openai-chat"} & set(used):
        statements.append(
            "OpenAI-compatible server: each request carries its row's seed; whether the server honours it and batches "
            "invariantly is the server's."
        )
    return {"backends": used, "vllm_batch_invariant": invariant, "statements": statements}


def reasoning_report(stages: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """For a reasoning run: the thinking tags and budgets, and how many responses had, lacked or lost a
    thinking block (from the ``ReasoningResponses`` stage)."""
    stage = next((s for s in stages if s.get("step") == "ReasoningResponses"), None)
    if stage is None:
        return None
    counts = stage.get("stats", {})
    keys = ("with_reasoning", "without_reasoning", "dropped_cut_reasoning", "dropped_unclosed_reasoning",
            "dropped_reasoning_over_budget", "dropped_empty_answer")
    return {**(stage.get("provenance") or {}).get("reasoning", {}), **{k: counts.get(k, 0) for k in keys}}


def run_info(config: RecipeConfig, manifest: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Provenance for the dataset card: models, templates, sampling, seeds, stage counts, the resolved
    configuration and the command."""
    from magpie_hf import __version__

    stages = manifest.get("stages", [])
    provenance = stages[0].get("provenance", {}) if stages else {}
    models = {"instruct": config.instruction_engine().describe()}
    engines = [config.instruction_engine()]
    if not config.run.instructions_only:
        engines.append(config.response_engine())
    if config.responses.response_model != config.instructions.model:
        models["response"] = config.response_engine().describe()
    chosen = config.stages()
    if {"task_category", "input_quality", "difficulty"} & set(chosen):
        models["judge"] = config.judge_engine().describe()
        engines.append(config.judge_engine())
    if "safety" in chosen:
        models["guard"] = config.guard_engine().describe()
        engines.append(config.guard_engine())
    if "reward" in chosen:
        reward = config.tagging.reward_model or "judge"
        models["reward"] = f"{config.judge_engine().describe()} as a 1-10 judge" if reward == "judge" else reward
    info: dict[str, Any] = {
        "recipe": config.recipe.name,
        "preset": config.run.preset,
        "command": config.command,
        "configuration": config.to_yaml(),
        "package_version": __version__,
        "seed": config.run.seed,
        "num_rows_requested": config.run.num_rows,
        "models": models,
        "engine": config.instruction_engine().backend,
        "pre_query_template": provenance.get("pre_query"),
        "decoding_mixture": [
            {"temperature": m.temperature, "top_p": m.top_p, "weight": m.weight}
            for m in config.instructions.decoding_mixture()
        ],
        "stage_stats": stages,
        "reproducibility": reproducibility_report(
            (e.backend if e.backend != "auto" else resolve_backend(e, log=False) for e in engines), stages
        ),
    }
    if not config.run.instructions_only:
        r = config.responses
        info["response_sampling"] = {"temperature": r.response_temperature, "top_p": r.response_top_p,
                                     "repetition_penalty": r.response_repetition_penalty, "max_tokens": r.response_max_tokens}
    language = language_report(config, stages)
    if language is not None:
        info["language_target"] = language
    reasoning = reasoning_report(stages)
    if reasoning is not None:
        info["reasoning"] = reasoning
    task = config.task_mix()
    if task is not None:
        info["task_control"] = {"weights": dict(task.weights), "prompts": dict(task.prompts)}
    template_kwargs = {
        s.get("name") or s["step"]: s["chat_template_kwargs"]
        for s in manifest.get("steps", [])
        if s.get("chat_template_kwargs")
    }
    if template_kwargs:
        info["chat_template_kwargs"] = template_kwargs
    models.update(extra.pop("models", {}))
    info.update(extra)
    return info
