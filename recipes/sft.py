#!/usr/bin/env python
"""Supervised fine-tuning of Llama-3-8B (base) on a Magpie dataset with TRL's ``SFTTrainer`` (paper, Table 7).

The dataset is read at a pinned revision from the Hub, or from the ``OUTPUT_DIR/dataset`` folder a magpie_hf recipe
wrote; its ``conversations`` become TRL's ``messages``. The base model gets the Llama-3 chat template (with
``{% generation %}`` markers, so the loss covers the assistant turns only) and ``<|eot_id|>`` as EOS.

Usage:
    # the paper's run, 4 GPUs x batch 1 x grad-accum 8 = 32
    accelerate launch --config_file recipes/accelerate/zero3_4gpu.yaml recipes/sft.py \\
        --config recipes/sft_llama3_8b.yaml
    # any YAML value can be overridden on the command line
    python recipes/sft.py --config recipes/sft_llama3_8b.yaml --dataset_name you/magpie-pro --dataset_revision v1.0.0
    # a few steps of a tiny model on the CPU, on a dataset folder made by `recipes/magpie_pro.py --preset cpu`
    python recipes/sft.py --preset cpu --dataset_name outputs/magpie_pro_cpu/dataset --output_dir outputs/sft-cpu
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config  # noqa: E402

from magpie_hf.training import (  # noqa: E402
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_EOT,
    LLAMA3_TRAINING_CHAT_TEMPLATE,
    RecipeArguments,
    apply_llama3_chat_template,
    build_tiny_base_model,
    load_dataset_split,
    parse_recipe_args,
    resize_embeddings_for,
    to_messages,
)

# Defaults of this recipe whatever the config: Magpie data is conversational and the loss is on the replies only.
RECIPE_DEFAULTS = {
    "dataset_config": "sft",
    "assistant_only_loss": True,
    "eos_token": LLAMA3_EOT,
    "report_to": "none",
}

PRESETS = {
    # A few steps of a ~3M-parameter random Llama (built from the embedded SmolLM2 tokenizer) on the CPU.
    "cpu": {
        "model_name_or_path": None,  # None: build the tiny model under OUTPUT_DIR/base_model
        "output_dir": "outputs/sft-cpu",
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "max_length": 512,
        "packing": False,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "max_steps": 12,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "dataloader_num_workers": 0,
    },
}


def make_parser() -> TrlParser:
    parser = TrlParser((RecipeArguments, SFTConfig, ModelConfig))
    parser.set_defaults_with_config(**RECIPE_DEFAULTS)
    return parser


def check_packing(training_args: SFTConfig, model_args: ModelConfig) -> None:
    """Best-fit-decreasing packing keeps every conversation whole, but only FlashAttention keeps them apart."""
    if training_args.packing and training_args.packing_strategy in {"bfd", "bfd_split"}:
        if "flash" not in (model_args.attn_implementation or ""):
            raise ValueError(
                f"packing_strategy={training_args.packing_strategy!r} puts several conversations in one padding-free "
                "row; only a FlashAttention kernel keeps them from attending to each other. Pass "
                "--attn_implementation flash_attention_2 (pip install flash-attn) or "
                "kernels-community/flash-attn2, or turn packing off with --packing false."
            )
    if training_args.packing and training_args.packing_strategy == "wrapped":
        raise ValueError("packing_strategy='wrapped' cuts conversations mid-turn; use 'bfd' or --packing false.")


def main(argv: list[str] | None = None) -> Path:
    script_args, training_args, model_args = parse_recipe_args(make_parser(), PRESETS, argv)
    set_seed(training_args.seed)
    check_packing(training_args, model_args)
    if not script_args.dataset_name:
        raise ValueError(
            "Pass --dataset_name: a Hub repo id (with --dataset_revision) or the OUTPUT_DIR/dataset folder of a "
            "magpie_hf recipe, e.g. `python recipes/magpie_pro.py --preset cpu` then "
            "--dataset_name outputs/<run>/dataset."
        )
    if model_args.model_name_or_path is None:
        if script_args.preset != "cpu":
            raise ValueError("Pass --model_name_or_path (e.g. meta-llama/Meta-Llama-3-8B).")
        model_args.model_name_or_path = str(build_tiny_base_model(Path(training_args.output_dir) / "base_model",
                                                                  seed=training_args.seed))

    # Model and tokenizer: the base model gets the Llama-3 chat template and its special tokens.
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    added = apply_llama3_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )
    resize_embeddings_for(model, tokenizer)
    if added:
        print(f"Added the Llama-3 special tokens {added} to the tokenizer and resized the embeddings.")

    # Data: one pinned split per stage, conversations -> messages.
    def load(split: str):
        dataset = load_dataset_split(script_args.dataset_name, script_args.dataset_config, split,
                                     revision=script_args.dataset_revision)
        return to_messages(dataset, num_proc=training_args.dataset_num_proc)

    train_dataset = load(script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    eval_dataset = load(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None
    print(f"Training on {len(train_dataset)} conversations from {script_args.dataset_name}"
          f" ({script_args.dataset_config}, revision {script_args.dataset_revision or 'local folder'}).")

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if tokenizer.chat_template == LLAMA3_TRAINING_CHAT_TEMPLATE:
        tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE  # same rendering, without the training-only markers
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return Path(training_args.output_dir)


if __name__ == "__main__":
    main()
