"""Reasoning responses: the thinking block goes to ``reasoning``, only the answer to ``response`` and
``conversations``; a cut thinking block is dropped and counted.

Fast tests put a tiny reasoning chat template onto the embedded tokenizer (as tests/test_templates.py does
with the real templates) and drive :class:`ReasoningResponses` with a scripted engine that answers each
instruction with a fixed completion. The slow test runs ``recipes/magpie_reasoning.py --preset cpu``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from magpie_hf.engines import Completion, Engine, EngineConfig
from magpie_hf.errors import ConfigError
from magpie_hf.pipeline import Pipeline
from magpie_hf.recipe.arguments import ReasoningArguments
from magpie_hf.steps.base import INT, STRING
from magpie_hf.steps.reasoning import ReasoningResponses, split_reasoning
from magpie_hf.templates import ReasoningMarkers, derive_templates

ROOT = Path(__file__).resolve().parents[1]

#: ChatML with a thinking block: the generation prompt opens it when the template variable ``open_thinking``
#: is set (as DeepSeek-R1's does always); earlier assistant turns keep only their answer (as Qwen3's)
TINY_REASONING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1] | trim }}{% else %}{{ m['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if open_thinking %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)

LONG_THOUGHT = "<think>" + "I count the sheep once more. " * 40 + "</think>\n\nThere are ten sheep."
REPLIES = {
    "What is 2+2?": Completion("<think>\nTwo and two make four.\n</think>\n\nIt is 4.", 20, "stop"),
    "Prove that there are infinitely many primes.": Completion("<think>\nAssume finitely many primes p1..pn and", 16, "length"),
    "What is the capital of France?": Completion("Paris is the capital of France.", 8, "stop"),
    "How many sheep?": Completion(LONG_THOUGHT, 300, "stop"),
    "Say nothing.": Completion("<think>Nothing to say.</think>", 8, "stop"),
    "Think forever.": Completion("<think>I keep going and", 6, "stop"),
}
OPENED_REPLIES = {
    "What is 2+2?": Completion("Two and two make four.\n</think>\n\nIt is 4.", 18, "stop"),
    "Prove that there are infinitely many primes.": Completion("Assume finitely many primes", 16, "length"),
}


class ScriptedReasoner(Engine):
    """Answers each instruction with its scripted completion; keeps the prompts and sampling it got."""

    name = "scripted"

    def __init__(self, tokenizer, replies: dict[str, Completion]) -> None:
        super().__init__(EngineConfig(model="scripted-reasoner"))
        self._tok = tokenizer
        self.replies = replies
        self.prompts: list[str] = []
        self.samplings: list = []

    @property
    def tokenizer(self):
        return self._tok

    def _generate(self, prompts, sampling, seeds=None, progress=None):
        self.prompts.extend(prompts)
        self.samplings.append(sampling)
        return [[next(c for q, c in self.replies.items() if q in p)] for p in prompts]


@pytest.fixture(scope="module")
def reasoning_tokenizer(embedded_tokenizer):
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = TINY_REASONING_TEMPLATE
    return tok


def _step(tokenizer, replies, **kwargs) -> tuple[ReasoningResponses, ScriptedReasoner]:
    engine = ScriptedReasoner(tokenizer, replies)
    step = ReasoningResponses(engine=engine, thinking_budget=64, answer_budget=32, **kwargs)
    step.load()
    return step, engine


def test_tiny_template_names_its_thinking_tags(reasoning_tokenizer):
    assert derive_templates(reasoning_tokenizer).reasoning == ReasoningMarkers("<think>", "</think>", False)
    opened = derive_templates(reasoning_tokenizer, chat_template_kwargs={"open_thinking": True})
    assert opened.reasoning == ReasoningMarkers("<think>", "</think>", True)


def test_reasoning_and_answer_are_split_and_cut_thinking_is_dropped(reasoning_tokenizer):
    step, engine = _step(reasoning_tokenizer, REPLIES)
    instructions = list(REPLIES)
    out = step.process({"instruction": instructions, "id": list(range(len(instructions)))}, seed=3)

    assert engine.samplings[0].max_tokens == 96 == step.max_tokens  # thinking + answer budget
    assert not engine.prompts[0].endswith("<think>\n")  # this template's prompt leaves the block to the model
    assert out["id"] == [0, 2]  # the cut, over-budget, empty-answer and unclosed rows are gone
    assert out["reasoning"] == ["Two and two make four.", None]
    assert out["response"] == ["It is 4.", "Paris is the capital of France."]
    assert out["reasoning_num_tokens"][0] == len(reasoning_tokenizer("Two and two make four.", add_special_tokens=False)["input_ids"])
    assert out["reasoning_num_tokens"][1] == 0
    assert out["response_num_tokens"] == [20, 8]  # what the model generated for the turn, thinking included
    for instruction, response, conversation in zip(["What is 2+2?", "What is the capital of France?"],
                                                   out["response"], out["conversations"]):
        assert conversation == [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        assert "<think>" not in json.dumps(conversation) and "</think>" not in json.dumps(conversation)
    assert step.stats["dropped_cut_reasoning"] == 1
    assert step.stats["dropped_reasoning_over_budget"] == 1
    assert step.stats["dropped_empty_answer"] == 1
    assert step.stats["dropped_unclosed_reasoning"] == 1
    assert (step.stats["with_reasoning"], step.stats["without_reasoning"]) == (1, 1)
    assert step.provenance()["reasoning"] == {
        "open": "<think>", "close": "</think>", "opened_by_generation_prompt": False, "tags_from": "chat template",
        "thinking_budget": 64, "answer_budget": 32, "max_tokens": 96,
    }


def test_generation_prompt_that_opens_the_block(reasoning_tokenizer):
    """DeepSeek-R1 style: the prompt ends inside the block, the completion holds only its end."""
    step, engine = _step(reasoning_tokenizer, OPENED_REPLIES, chat_template_kwargs={"open_thinking": True})
    out = step.process({"instruction": list(OPENED_REPLIES)}, seed=0)
    assert engine.prompts[0].endswith("<|im_start|>assistant\n<think>\n")
    assert out["reasoning"] == ["Two and two make four."] and out["response"] == ["It is 4."]
    assert out["conversations"][0][-1] == {"role": "assistant", "content": "It is 4."}
    assert step.stats["dropped_cut_reasoning"] == 1
    assert step.provenance()["reasoning"]["opened_by_generation_prompt"] is True


def test_explicit_tags_and_the_default_for_templates_without_tags(embedded_tokenizer):
    replies = {"Q": Completion("<reasoning>Short.</reasoning>Answer.", 5, "stop")}
    step, _ = _step(embedded_tokenizer, replies, reasoning_tags="<reasoning>,</reasoning>")
    out = step.process({"instruction": ["Q"]}, seed=0)
    assert (out["reasoning"], out["response"]) == (["Short."], ["Answer."])
    assert step.provenance()["reasoning"]["tags_from"] == "explicit"
    # SmolLM2's own template names no tags: <think>...</think> is assumed, and its plain answers pass through
    plain, _ = _step(embedded_tokenizer, {"Q": Completion("Just an answer.", 4, "stop")})
    assert plain.provenance()["reasoning"]["tags_from"] == "default"
    assert plain.process({"instruction": ["Q"]}, seed=0)["reasoning"] == [None]


def test_bad_settings_fail_before_loading():
    engine = EngineConfig.embedded()
    with pytest.raises(ValueError, match="set the two budgets"):
        ReasoningResponses(engine=engine, thinking_budget=10, answer_budget=10, max_tokens=50)
    with pytest.raises(ValueError, match="thinking_budget must be a positive"):
        ReasoningResponses(engine=engine, thinking_budget=0)
    with pytest.raises(ValueError, match="two different non-empty strings"):
        ReasoningResponses(engine=engine, reasoning_tags="<think>")


def test_split_edge_cases():
    markers = ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=True)
    assert split_reasoning("<think>\nechoed tag</think>A", markers).reasoning == "echoed tag"
    assert split_reasoning("</think>A", markers) == split_reasoning("\n</think>\nA", markers)
    mid = ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=False)
    assert split_reasoning("Use <think> tags like this.", mid).reasoning is None  # only a leading block counts


def test_typed_columns_and_counts_through_the_pipeline(reasoning_tokenizer, tmp_path):
    step, _ = _step(reasoning_tokenizer, REPLIES)
    rows = datasets.Dataset.from_dict({"conversation_id": [f"c{i}" for i in range(len(REPLIES))], "instruction": list(REPLIES)})
    pipe = Pipeline([step], tmp_path, shard_size=3, input_dataset=rows, progress=False)
    ds = pipe.run()
    assert ds["conversation_id"] == ["c0", "c2"]
    stage = pipe.manifest()["stages"][0]
    assert stage["rows_in"] == 6 and stage["rows_out"] == 2
    assert {k: v for k, v in stage["stats"].items() if k.startswith("dropped")} == {
        "dropped_cut_reasoning": 1, "dropped_reasoning_over_budget": 1, "dropped_empty_answer": 1,
        "dropped_unclosed_reasoning": 1,
    }
    schema = pq.read_schema(pipe.stage_files(0)[0])
    assert schema.field("reasoning").type == STRING and schema.field("reasoning_num_tokens").type == INT
    # a shard whose rows were all dropped still has a typed (string) reasoning column, not a null one
    schema = pq.read_schema(pipe.stage_files(0)[1])
    assert schema.field("reasoning").type == STRING


def test_reasoning_recipe_configuration(tmp_path):
    from magpie_hf.recipe import generation_steps, parse_recipe
    from tests.conftest import load_recipe

    recipe = load_recipe("magpie_reasoning").REASONING
    paper = parse_recipe(recipe, [])
    assert (paper.instructions.model, paper.responses.response_model) == (
        "meta-llama/Llama-3.3-70B-Instruct", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B")
    assert paper.instructions.task == "reasoning" and paper.responses.response_max_tokens == 28_672 + 4_096
    first, responses = generation_steps(paper)
    assert first.task.keys == ["reasoning"]
    assert isinstance(responses, ReasoningResponses) and responses.max_tokens == 32_768
    assert (responses.temperature, responses.top_p, responses.chat_template_kwargs) == (0.6, 0.95, None)

    cpu = parse_recipe(recipe, ["--preset", "cpu", "--thinking_budget", "100", "--answer_budget", "20",
                                "--reasoning_tags", "<reasoning>,</reasoning>"])
    assert cpu.responses.response_model == "embedded" and cpu.responses.response_max_tokens == 120
    responses = generation_steps(cpu)[-1]
    assert responses.reasoning_tags == ("<reasoning>", "</reasoning>") and responses.max_tokens == 120
    assert cpu.response_engine() == cpu.instruction_engine()

    # one model, a template option per side; a separate response model gets only its own options
    qwen = parse_recipe(recipe, ["--model", "Qwen/Qwen3-8B", "--response_model", "Qwen/Qwen3-8B",
                                 "--chat_template_kwargs", '{"enable_thinking": false}',
                                 "--response_chat_template_kwargs", '{"enable_thinking": true}'])
    first, responses = generation_steps(qwen)
    assert first.chat_template_kwargs == {"enable_thinking": False}
    assert responses.chat_template_kwargs == {"enable_thinking": True}
    other = parse_recipe(recipe, ["--chat_template_kwargs", '{"enable_thinking": false}'])
    assert generation_steps(other)[-1].chat_template_kwargs is None  # R1 is not the instruction model
    config_file = tmp_path / "tags.yaml"
    config_file.write_text("reasoning_tags: ['<seed:think>', '</seed:think>']\n")
    tags = parse_recipe(recipe, ["--config", str(config_file)]).section(ReasoningArguments).tags()
    assert tags == ("<seed:think>", "</seed:think>")
    for argv, message in ((["--reasoning_tags", "<think>"], "two different"),
                          (["--answer_budget", "0"], "answer_budget must be >= 1"),
                          (["--response_chat_template_kwargs", "{enable"], "response_chat_template_kwargs must be a JSON")):
        with pytest.raises(ConfigError, match=message):
            parse_recipe(recipe, argv)


@pytest.mark.slow
def test_reasoning_recipe_cpu_end_to_end(tmp_path):
    """``recipes/magpie_reasoning.py --preset cpu``: the embedded model on both sides; its answers carry no
    thinking, so every kept row has a null ``reasoning`` and the card says so."""
    out = tmp_path / "run"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "magpie_reasoning.py"), "--preset", "cpu", "--num_rows", "6",
         "--thinking_budget", "32", "--answer_budget", "64", "--stages", "language", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    print(f"magpie_reasoning --preset cpu, 6 rows: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    ds = datasets.load_dataset(str(out / "dataset"), "raw", split="train")
    assert len(ds) >= 1
    assert {"reasoning", "reasoning_num_tokens", "response", "conversations", "system_prompt_key"} <= set(ds.column_names)
    assert ds.features["reasoning"].dtype == "string"
    for row in ds:
        assert row["reasoning"] is None and row["reasoning_num_tokens"] == 0 and row["response"]
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
        assert row["conversations"][-1] == {"from": "gpt", "value": row["response"]}  # ShareGPT, as published
        assert row["system_prompt_key"] == "reasoning"
    run = json.loads((out / "dataset" / "magpie_run.json").read_text())["run_info"]
    assert run["reasoning"]["without_reasoning"] == len(ds) and run["reasoning"]["tags_from"] == "default"
    assert run["reasoning"]["max_tokens"] == 96 == run["response_sampling"]["max_tokens"]
    card = (out / "dataset" / "README.md").read_text()
    assert "### Reasoning" in card
