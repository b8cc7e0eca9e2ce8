"""``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}``) reach every rendering of every step that
uses a chat template, and are recorded in the rows' provenance, the step configs and the dataset card.

Tokenizer only: the engine is a recorder that keeps the prompts it gets and answers with a fixed text.
"""

from __future__ import annotations

import copy
import json

import datasets
import pytest

from magpie_hf.engines import Completion, Engine, EngineConfig
from magpie_hf.steps import MagpieInstructions, Responses
from magpie_hf.steps.judges import TaskCategory
from magpie_hf.steps.multi_turn import MultiTurn
from magpie_hf.steps.preferences import MultiResponses
from magpie_hf.steps.reward import RewardModelScorer
from magpie_hf.steps.safety import LlamaGuard
from magpie_hf.steps.task_control import TaskControlledInstructions
from tests.conftest import chat_template_fixtures

OFF = {"enable_thinking": False}
QWEN3_EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
FIRST_TURNS = {"instruction": ["What is 2+2?"], "response": ["It is 4."], "response_finish_reason": ["stop"]}


class _Recorder(Engine):
    """Keeps every prompt; every completion is ``reply``."""

    name = "recorder"

    def __init__(self, tokenizer, reply: str) -> None:
        super().__init__(EngineConfig(model="recorder"))
        self._tok = tokenizer
        self.reply = reply
        self.prompts: list[str] = []

    @property
    def tokenizer(self):
        return self._tok

    def _generate(self, prompts, sampling, seeds=None, progress=None):
        self.prompts.extend(prompts)
        return [[Completion(self.reply, 3, "stop") for _ in range(sampling.n)] for _ in prompts]


def _dress(base, name: str):
    fixture = chat_template_fixtures()[name]
    tok = copy.deepcopy(base)
    named = {k: fixture[k] for k in ("bos_token", "eos_token", "pad_token") if fixture.get(k)}
    tok.add_special_tokens({**named, "additional_special_tokens": fixture.get("format_tokens") or ["<|im_start|>", "<|im_end|>"]})
    if not fixture.get("bos_token"):
        tok.bos_token = None
    tok.chat_template = fixture["chat_template"]
    return tok


@pytest.fixture(scope="module")
def qwen3(embedded_tokenizer):
    return _dress(embedded_tokenizer, "qwen3-0.6b")


@pytest.fixture(scope="module")
def glm46(embedded_tokenizer):
    return _dress(embedded_tokenizer, "glm-4.6")


def test_instructions_and_responses(qwen3):
    engine = _Recorder(qwen3, "What is a monad?<|im_end|>")
    step = MagpieInstructions(engine=engine, num_rows=2, max_tokens=16, chat_template_kwargs=OFF)
    step.load()
    batch = step.generate(offset=0, num_rows=2, seed=1)
    assert engine.prompts == ["<|im_start|>user\n"] * 2  # the pre-query (one request per row), derived under the kwargs
    assert step._templates.chat_template_kwargs == OFF
    assert [c["chat_template_kwargs"] for c in batch["gen_input_configs"]] == ['{"enable_thinking": false}'] * 2
    assert json.loads(json.dumps(step.config_record()))["chat_template_kwargs"] == OFF

    engine.prompts.clear()
    responses = Responses(engine=engine, max_tokens=16, chat_template_kwargs=OFF)
    responses.load()
    out = responses.process({"instruction": ["What is a monad?"]}, seed=0)
    assert engine.prompts == ["<|im_start|>user\nWhat is a monad?<|im_end|>\n" + QWEN3_EMPTY_THINK]
    assert out["gen_response_configs"][0]["chat_template_kwargs"] == '{"enable_thinking": false}'

    engine.prompts.clear()
    plain = Responses(engine=engine, max_tokens=16)
    plain.load()
    out = plain.process({"instruction": ["What is a monad?"]}, seed=0)
    assert engine.prompts[0].endswith("<|im_start|>assistant\n") and "<think>" not in engine.prompts[0]
    assert out["gen_response_configs"][0]["chat_template_kwargs"] is None


def test_multi_turn_queries_and_replies(glm46):
    """GLM-4.6 without thinking appends /nothink to user turns and writes an empty think block."""
    engine = _Recorder(glm46, "And of 3+3?<|assistant|>")
    step = MultiTurn(engine=engine, n_turns=2, mt_system_prompt=None, chat_template_kwargs=OFF)
    step.load()
    step.process(dict(FIRST_TURNS), seed=0)
    query, reply = engine.prompts
    assert query == "[gMASK]<sop><|user|>\nWhat is 2+2?/nothink<|assistant|>\n<think></think>\nIt is 4.<|user|>\n"
    assert reply == (
        "[gMASK]<sop><|user|>\nWhat is 2+2?/nothink<|assistant|>\n<think></think>\nIt is 4."
        "<|user|>\nAnd of 3+3?/nothink<|assistant|>\n<think></think>"
    )
    assert step.config_summary()["chat_template_kwargs"] == OFF
    assert step._templates.stop_strings == ["/nothink", "<|assistant|>", "<|user|>"]


def test_multi_responses_and_task_control(qwen3):
    engine = _Recorder(qwen3, "4<|im_end|>")
    step = MultiResponses(engine=engine, n=2, max_tokens=8, chat_template_kwargs=OFF)
    step.load()
    out = step.process({"instruction": ["2+2?"]}, seed=0)
    assert engine.prompts == ["<|im_start|>user\n2+2?<|im_end|>\n" + QWEN3_EMPTY_THINK]
    assert out["gen_multi_response_configs"][0]["chat_template_kwargs"] == '{"enable_thinking": false}'

    task = TaskControlledInstructions(engine=engine, num_rows=2, task="math", chat_template_kwargs=OFF)
    task.load()
    assert all(t.chat_template_kwargs == OFF for t in task._key_templates.values())
    batch = task.generate(offset=0, num_rows=2, seed=3)
    assert {c["chat_template_kwargs"] for c in batch["gen_input_configs"]} == {'{"enable_thinking": false}'}


def test_judges_guard_and_reward_model(qwen3, glm46):
    answer = '{"task_category": "Math", "other_task_category": []}'
    engine = _Recorder(qwen3, answer)
    judge = TaskCategory(engine=engine, constrained=False, chat_template_kwargs=OFF)
    out = judge.process({"instruction": ["What is 2+2?"]}, seed=0)
    assert out["task_category"] == ["Math"]
    assert engine.prompts[0].endswith(QWEN3_EMPTY_THINK)
    assert json.loads(json.dumps(judge.config_record()))["chat_template_kwargs"] == OFF

    # rendered as a chat endpoint would (Llama Guard templates ignore the generation prompt)
    guard = _loaded_guard(glm46, chat_template_kwargs=OFF)
    assert guard.prompt("Hi", "Hello").startswith("[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>\nHello")
    assert _loaded_guard(glm46).prompt("Hi", "Hello").startswith("[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello")

    scorer = RewardModelScorer("a-reward-model", chat_template_kwargs=OFF)
    scorer._tokenizer, scorer._limit = glm46, 4096  # what load() sets; only the tokenizer is used here
    ids = scorer.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert "Hi/nothink<|assistant|>" in glm46.decode(ids)


def _loaded_guard(tokenizer, **kwargs):
    guard = LlamaGuard(engine=_Recorder(tokenizer, "safe"), **kwargs)
    guard.load()
    return guard


def test_run_info_and_card(tmp_path):
    from magpie_hf.hub import save_dataset_folder
    from magpie_hf.recipe import run_info

    manifest = {
        "steps": [
            MagpieInstructions(engine=EngineConfig(model="m"), num_rows=2, chat_template_kwargs=OFF).config_record(),
            Responses(engine=EngineConfig(model="m")).config_record(),
            TaskCategory(engine=EngineConfig(model="j"), chat_template_kwargs={"thinking": True}).config_record(),
        ],
        "stages": [],
    }
    from magpie_hf.recipe import Recipe, parse_recipe

    config = parse_recipe(Recipe(name="magpie_pro", description=""), ["--preset", "cpu", "--num_rows", "2"])
    info = run_info(config, manifest)
    assert info["chat_template_kwargs"] == {"magpie_instructions": OFF, "task_category": {"thinking": True}}
    rows = datasets.Dataset.from_list([{"instruction": "q", "response": "a"}] * 2)
    folder = save_dataset_folder(tmp_path / "ds", {"raw": rows}, info, license="apache-2.0", embedding_map=False)
    card = (folder / "README.md").read_text()
    assert "### Chat template options" in card
    assert '| magpie_instructions | `{"enable_thinking": false}` |' in card
    assert '| task_category | `{"thinking": true}` |' in card
    assert "`chat_template_kwargs`" not in card  # rendered in its own section, not under "Other settings"
    assert "chat_template_kwargs" not in run_info(config, {"steps": manifest["steps"][1:2], "stages": []})
