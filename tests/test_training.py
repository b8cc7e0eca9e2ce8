"""The TRL recipes recipes/sft.py and recipes/dpo.py: chat template and loss mask, pinned data loading, the YAML
recipes against the paper, and both CPU presets end to end on a local dataset folder laid out like a recipe's
``OUTPUT_DIR/dataset`` (``README.md`` with ``configs:`` + ``data/<config>/<split>-00000-of-00001.parquet``)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytest.importorskip("trl")

from magpie_hf import training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the recipe look their module up
    spec.loader.exec_module(module)
    return module


# --- a dataset folder like the pipeline writes ----------------------------------------------------------------------


def write_dataset_folder(folder: Path, tables: dict[str, dict[str, list[dict]]]) -> Path:
    """``tables[config][split] = rows`` -> ``folder/data/<config>/<split>-00000-of-00001.parquet`` + README configs."""
    configs = []
    for config, splits in tables.items():
        files = []
        for split, rows in splits.items():
            path = folder / "data" / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path)
            files.append({"split": split, "path": f"data/{config}/{split}-*.parquet"})
        configs.append({"config_name": config, "data_files": files})
    (folder / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}, sort_keys=False) + "---\n")
    return folder


QA = [
    ("What is 2 + 3?", "2 + 3 equals 5."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is 4 + 4?", "4 + 4 equals 8."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Name a warm colour.", "Orange is a warm colour."),
    ("How many months are in a year?", "There are twelve months in a year."),
]


def sft_rows() -> list[dict]:
    """Rows with the pipeline's columns; the last ones are multi-turn."""
    rows = []
    for i, (question, answer) in enumerate(QA * 2):
        conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i >= len(QA):  # a second round on the second pass
            conversation += [{"role": "user", "content": "Say it again, please."},
                             {"role": "assistant", "content": answer}]
        rows.append({"conversation_id": f"c{i:03d}", "instruction": question, "response": answer,
                     "conversations": conversation})
    return rows


def dpo_rows(long_prompts: int = 1) -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(QA):
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": answer}],
                     "rejected": [{"role": "assistant", "content": "I do not know."}]})
    for _ in range(long_prompts):  # longer than the 1800-token prompt cap of the Magpie DPO recipe
        rows.append({"prompt": [{"role": "user", "content": "word " * 2000}],
                     "chosen": [{"role": "assistant", "content": "A long text."}],
                     "rejected": [{"role": "assistant", "content": "No."}]})
    return rows


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory) -> Path:
    return write_dataset_folder(tmp_path_factory.mktemp("magpie") / "dataset", {
        "sft": {"train": sft_rows()},
        "dpo": {"train": dpo_rows(), "test": dpo_rows(long_prompts=0)[:2]},
    })


@pytest.fixture(scope="module")
def llama3_tokenizer():
    tokenizer = training.embedded_tokenizer()
    training.apply_llama3_chat_template(tokenizer)
    return tokenizer


# --- chat template and loss mask ------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi there "},
    {"role": "assistant", "content": "Hello!\n"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_template_renders_like_official_llama3_instruct(llama3_tokenizer):
    official = json.loads((FIXTURES / "llama-3-8b-instruct.json").read_text())
    for messages, prompt in [(CONVERSATION, False), (CONVERSATION[:4], True)]:
        ours = llama3_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        theirs = llama3_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                                      chat_template=official["chat_template"])
        assert ours == theirs
    assert llama3_tokenizer.eos_token == official["eos_token"] == "<|eot_id|>"
    assert llama3_tokenizer.bos_token == official["bos_token"]
    assert llama3_tokenizer.pad_token == "<|end_of_text|>" != llama3_tokenizer.eos_token


def test_loss_mask_covers_exactly_the_assistant_turns(llama3_tokenizer):
    out = llama3_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    # the masked tokens are exactly the assistant replies, each with its <|eot_id|>, in order
    spans, current = [], []
    for token, masked in zip(ids, mask):
        if masked:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    expected = [llama3_tokenizer.encode(text, add_special_tokens=False) + [llama3_tokenizer.eos_token_id]
                for text in ("Hello!", "4")]
    assert spans == expected
    assert sum(mask) == sum(len(span) for span in expected)


def test_bos_is_not_doubled(llama3_tokenizer):
    ids = llama3_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(llama3_tokenizer.bos_token_id) == 1 and ids[0] == llama3_tokenizer.bos_token_id


def test_sharegpt_and_role_content_become_messages():
    from datasets import Dataset

    dataset = Dataset.from_list([
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "x": 1},
        {"conversations": [{"from": "human", "value": "Unanswered"}], "x": 2},
    ])
    out = training.to_messages(dataset)
    assert out.column_names == ["messages"] and len(out) == 1
    assert out[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match="no 'conversations' column"):
        training.to_messages(Dataset.from_list([{"text": "a"}]))


# --- pinned loading -------------------------------------------------------------------------------------------------


def test_hub_dataset_revision_reaches_load_dataset(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or "ds")
    assert training.load_dataset_split("user/magpie-pro", "sft", "train", revision="v1.2.0") == "ds"
    assert calls == [(("user/magpie-pro", "sft"), {"split": "train", "revision": "v1.2.0"})]
    with pytest.raises(ValueError, match="Pin the dataset"):
        training.load_dataset_split("user/magpie-pro", "sft", "train", revision=None)


def test_recipe_passes_the_cli_revision_to_load_dataset(monkeypatch):
    """`sft.py --dataset_revision` travels from the command line to `datasets.load_dataset`."""
    import datasets

    calls = []

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(datasets, "load_dataset", record)
    sft = load_recipe("sft")
    monkeypatch.setattr(sft, "AutoTokenizer", _NoModel)
    monkeypatch.setattr(sft, "AutoModelForCausalLM", _NoModel)
    monkeypatch.setattr(sft, "apply_llama3_chat_template", lambda tok: [])
    monkeypatch.setattr(sft, "resize_embeddings_for", lambda model, tok: None)
    with pytest.raises(Stop):
        sft.main(["--config", str(RECIPES / "sft_llama3_8b.yaml"), "--dataset_revision", "abc123",
                  "--bf16", "false", "--use_cpu", "true"])
    assert calls[0][0] == ("Magpie-Align/Magpie-Pro-300K-Filtered", None)
    assert calls[0][1] == {"split": "train", "revision": "abc123"}


class _NoModel:
    @staticmethod
    def from_pretrained(*args, **kwargs):
        return None


def test_long_prompts_are_filtered(llama3_tokenizer):
    from datasets import Dataset

    dataset, removed = training.filter_long_prompts(Dataset.from_list(dpo_rows(long_prompts=2)), llama3_tokenizer, 1800)
    assert removed == 2 and len(dataset) == len(QA)


def test_packing_needs_flash_attention():
    sft = load_recipe("sft")
    _, args, model_args = sft.make_parser().parse_args_and_config(
        ["--config", str(RECIPES / "sft_llama3_8b.yaml"), "--bf16", "false", "--use_cpu", "true",
         "--attn_implementation", "sdpa"])
    with pytest.raises(ValueError, match="FlashAttention"):
        sft.check_packing(args, model_args)
    args.packing = False
    sft.check_packing(args, model_args)


# --- the YAML recipes match the paper -------------------------------------------------------------------------------


def test_sft_yaml_matches_paper_table_7():
    sft = load_recipe("sft")
    config = yaml.safe_load((RECIPES / "sft_llama3_8b.yaml").read_text())
    assert config["model_name_or_path"] == "meta-llama/Meta-Llama-3-8B"
    assert config["learning_rate"] == 2e-5 and config["lr_scheduler_type"] == "cosine"
    assert config["warmup_steps"] == 100 and config["num_train_epochs"] == 2
    assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] * 4 == 32
    assert (config["adam_beta1"], config["adam_beta2"], config["adam_epsilon"]) == (0.9, 0.999, 1e-8)
    assert config["max_length"] == 8192 and config["assistant_only_loss"] is True
    assert config["dataset_revision"]
    # every key is a current argument of the recipe (no removed TRL names such as max_seq_length)
    _, args, model_args = sft.make_parser().parse_args_and_config(
        ["--config", str(RECIPES / "sft_llama3_8b.yaml"), "--bf16", "false", "--use_cpu", "true"])
    assert args.max_length == 8192 and args.optim.startswith("adamw") and args.warmup_steps == 100
    assert model_args.dtype == "bfloat16"


def test_dpo_yaml_matches_magpie_dpo_recipe():
    dpo = load_recipe("dpo")
    config = yaml.safe_load((RECIPES / "dpo_llama3_8b.yaml").read_text())
    assert config["beta"] == 0.01 and config["learning_rate"] == 1e-6 and config["num_train_epochs"] == 1
    assert config["lr_scheduler_type"] == "cosine" and config["warmup_steps"] == 0.1
    assert config["max_length"] == 2048 and config["max_prompt_length"] == 1800
    assert config["dataset_config"] == "dpo" and config["dataset_revision"]
    script_args, args, _ = dpo.make_parser().parse_args_and_config(
        ["--config", str(RECIPES / "dpo_llama3_8b.yaml"), "--bf16", "false", "--use_cpu", "true"])
    assert args.beta == 0.01 and args.max_length == 2048 and script_args.max_prompt_length == 1800


@pytest.mark.parametrize("name,kind,processes", [("zero3_4gpu", "DEEPSPEED", 4), ("zero3_8gpu", "DEEPSPEED", 8),
                                                  ("fsdp_4gpu", "FSDP", 4), ("fsdp_8gpu", "FSDP", 8)])
def test_accelerate_configs(name, kind, processes):
    config = yaml.safe_load((RECIPES / "accelerate" / f"{name}.yaml").read_text())
    assert config["distributed_type"] == kind and config["num_processes"] == processes
    assert config["mixed_precision"] == "bf16"
    if kind == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] == 3 and config["deepspeed_config"]["zero3_save_16bit_model"]
    else:
        assert config["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


# --- both CPU presets end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_output(dataset_folder, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("sft-cpu")
    return load_recipe("sft").main(["--preset", "cpu", "--dataset_name", str(dataset_folder),
                                    "--output_dir", str(output_dir)])


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_sft_cpu_preset_learns_and_answers(sft_output):
    values = losses(sft_output)
    assert len(values) >= 10 and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0]
    reply = training.chat_reply(sft_output, [{"role": "user", "content": "What is 2 + 3?"}], max_new_tokens=12)
    assert isinstance(reply, str) and reply.strip()
    from transformers import AutoConfig, AutoTokenizer

    # the checkpoint carries the official Llama-3 template (no training markers) and stops at <|eot_id|>
    tokenizer = AutoTokenizer.from_pretrained(sft_output)
    official = json.loads((FIXTURES / "llama-3-8b-instruct.json").read_text())["chat_template"]
    assert tokenizer.chat_template == training.LLAMA3_CHAT_TEMPLATE and "endgeneration" not in tokenizer.chat_template
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, chat_template=official)
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token == "<|end_of_text|>"
    assert AutoConfig.from_pretrained(sft_output).eos_token_id == tokenizer.eos_token_id


@pytest.mark.slow
def test_dpo_cpu_preset_from_the_sft_checkpoint(sft_output, dataset_folder, tmp_path, capsys):
    output_dir = load_recipe("dpo").main(["--preset", "cpu", "--model_name_or_path", str(sft_output),
                                          "--dataset_name", str(dataset_folder), "--output_dir", str(tmp_path)])
    assert "Dropped 1 of 9 preference pairs" in capsys.readouterr().out
    values = losses(output_dir)
    assert values and all(math.isfinite(v) for v in values)
    reply = training.chat_reply(output_dir, [{"role": "user", "content": "Name a primary colour."}], max_new_tokens=8)
    assert isinstance(reply, str)
