"""Task-control system prompts: registry, weighted mixtures, flags, the per-row step, and steering on the
embedded model."""

from __future__ import annotations

import collections
import copy
import json

import pytest

from magpie_hf import engines
from magpie_hf.engines import Engine, EngineConfig
from magpie_hf.errors import ConfigError
from magpie_hf.prompts.labels import TASK_CATEGORIES
from magpie_hf.prompts.tasks import (
    TASK_PROMPT_CATEGORIES,
    TASK_PROMPTS,
    TaskMix,
    looks_like_math,
    parse_task_mix,
)
from magpie_hf.steps.task_control import TaskControlledInstructions
from magpie_hf.templates import ChatTemplateError
from tests.conftest import chat_template_fixtures

PAPER_CATEGORIES = set(TASK_CATEGORIES) - {"Others"}


def test_registry_covers_the_paper_categories():
    assert {"translation"} | {k for k in TASK_PROMPTS} >= {
        "math", "coding", "translation", "reasoning", "creative_writing", "data_analysis",
        "information_seeking", "advice_seeking", "planning", "editing", "role_playing", "brainstorming",
    }
    assert set(TASK_PROMPT_CATEGORIES.values()) >= PAPER_CATEGORIES
    for key, prompt in TASK_PROMPTS.items():
        assert prompt.startswith("You are an AI assistant") and "Users" in prompt and len(prompt) > 150, key
    assert len(set(TASK_PROMPTS.values())) == len(TASK_PROMPTS)


def test_specs_and_aliases():
    assert TaskMix.from_spec("math").weights == {"math": 1.0}
    assert TaskMix.from_spec("Coding & Debugging").weights == {"coding": 1.0}
    assert TaskMix.from_spec({"Creative writing": 0.25, "math": 0.75}).weights == {"creative_writing": 0.25, "math": 0.75}
    assert parse_task_mix("math=0.5, coding=0.5") == {"math": 0.5, "coding": 0.5}
    assert TaskMix.from_spec("math=1,coding=0").weights == {"math": 1.0}  # zero weights drop out
    assert TaskMix.from_spec("a=0.333,b=0.333,math=0.334", prompts={"a": "A prompt.", "b": "B prompt."}).keys == ["a", "b", "math"]
    mix = TaskMix.from_spec("legal", prompts={"legal": "You are an AI assistant for legal questions."})
    assert mix.prompts == {"legal": "You are an AI assistant for legal questions."}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("math=0.5,coding=0.6", "must sum to 1"),
        ("math=1.5,coding=-0.5", "must be >= 0"),
        ("maths=1", "Unknown task 'maths'. Did you mean 'math'?"),
        ("math=abc", "Bad weight 'abc'"),
        ("math=0.5,math=0.5", "appears twice"),
        ("math:0.5,coding:0.5", "write KEY=WEIGHT"),
        ({"math": float("nan")}, "finite"),
        ({}, "at least one task"),
    ],
)
def test_bad_weights_fail_clearly(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        TaskMix.from_spec(spec)


def test_row_keys_are_deterministic_and_follow_the_weights():
    mix = TaskMix.from_spec("math=0.7,coding=0.2,planning=0.1")
    keys = [mix.key_for_row(i, seed=3) for i in range(3000)]
    assert keys == [mix.key_for_row(i, seed=3) for i in range(3000)]
    assert keys != [mix.key_for_row(i, seed=4) for i in range(3000)]
    counts = collections.Counter(keys)
    assert abs(counts["math"] / 3000 - 0.7) < 0.03 and abs(counts["planning"] / 3000 - 0.1) < 0.02


def test_step_validates_before_any_model_loads():
    before = engines.loaded_engine_configs()
    missing = EngineConfig(model="/nonexistent/model", backend="transformers")
    with pytest.raises(ValueError, match="must sum to 1"):
        TaskControlledInstructions(engine=missing, num_rows=10, task="math=0.7,coding=0.2")
    with pytest.raises(ValueError, match="Unknown task"):
        TaskControlledInstructions(engine=missing, num_rows=10, task={"cooking": 1.0})
    with pytest.raises(ValueError, match="not both"):
        TaskControlledInstructions(engine=missing, num_rows=10, task="math", system_prompt="Be nice.")
    step = TaskControlledInstructions(engine=missing, num_rows=10, task="math")
    assert isinstance(step.task, TaskMix)
    json.dumps(step.config_record())  # recordable in pipeline.json
    assert engines.loaded_engine_configs() == before


def _task(argv):
    from magpie_hf.recipe import Recipe, parse_recipe

    return parse_recipe(Recipe(name="demo", description="", paper={"num_rows": 10}), argv).task_mix()


def test_flags(tmp_path):
    assert _task([]) is None
    assert _task(["--task", "math"]).weights == {"math": 1.0}
    assert _task(["--task-mix", "math=0.5,coding=0.5"]).weights == {"math": 0.5, "coding": 0.5}
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"legal": "You are an AI assistant for legal questions."}))
    assert _task(["--task_mix", "legal=0.5,math=0.5", "--task_prompts", str(prompts)]).keys == ["legal", "math"]
    with pytest.raises(ConfigError, match="must sum to 1"):
        _task(["--task-mix", "math=0.5,coding=0.4"])
    with pytest.raises(ConfigError, match="not both"):
        _task(["--task", "math", "--task-mix", "math=1"])


def test_recipe_rejects_bad_weights_before_loading_a_model():
    from tests.conftest import load_recipe

    recipe = load_recipe("magpie_mt")
    before = engines.loaded_engine_configs()
    with pytest.raises(SystemExit, match="must sum to 1"):
        recipe.main(["--preset", "cpu", "--task-mix", "math=0.7,coding=0.2", "--output-dir", "/nonexistent/never-written"])
    assert engines.loaded_engine_configs() == before


class _TokenizerOnly(Engine):
    """Carries a tokenizer for template arithmetic; never generates (load-time checks only)."""

    name = "tokenizer-only"

    def __init__(self, tokenizer):
        super().__init__(EngineConfig(model="tokenizer-only", backend="transformers"))
        self._tok = tokenizer

    @property
    def tokenizer(self):
        return self._tok

    def _generate(self, prompts, sampling, seeds, progress):
        raise AssertionError("not expected to generate")


def test_template_without_system_role_fails_clearly(embedded_tokenizer):
    gemma = chat_template_fixtures()["gemma-2-2b-it"]
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = gemma["chat_template"]
    step = TaskControlledInstructions(engine=_TokenizerOnly(tok), num_rows=4, task="math")
    with pytest.raises(ChatTemplateError, match="cannot take one"):
        step.load()


def test_task_control_on_the_embedded_model(embedded_engine):
    """Rows are split by key, each key's prompt is used and recorded, and math steering works."""
    step = TaskControlledInstructions(
        engine=embedded_engine, num_rows=24, max_tokens=40, drop_truncated=False, seed=1,
        task="math=0.5,creative_writing=0.5",
    )
    step.load()
    batch = step.generate(offset=0, num_rows=24, seed=11)
    assert len(batch["instruction"]) == 24 - step.stats["dropped_empty_instruction"]
    mix = step.task
    for key, config in zip(batch["system_prompt_key"], batch["gen_input_configs"]):
        assert config["system_prompt"] == mix.prompts[key]
        assert mix.prompts[key] in config["pre_query_template"]
    row_keys = [mix.key_for_row(i, 1) for i in range(24)]
    from magpie_hf.steps.generate import conversation_id

    ids = {conversation_id(1, i): k for i, k in enumerate(row_keys)}
    assert all(ids[c] == k for c, k in zip(batch["conversation_id"], batch["system_prompt_key"]))
    math_share = {
        key: sum(looks_like_math(t) for t, k in zip(batch["instruction"], batch["system_prompt_key"]) if k == key)
        / max(1, batch["system_prompt_key"].count(key))
        for key in ("math", "creative_writing")
    }
    assert math_share["math"] > math_share["creative_writing"], math_share
