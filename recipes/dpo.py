#!/usr/bin/env python
"""DPO of a Magpie SFT checkpoint on Magpie preference pairs with TRL's ``DPOTrainer``.

Settings of the published Magpie DPO recipe: beta 0.01, lr 1e-6, 1 epoch, cosine, warmup ratio 0.1, max length
2048; prompts longer than 1800 tokens are dropped beforehand (TRL 1.x has no prompt-length cap) and counted.
The data is the ``dpo`` config (``prompt`` / ``chosen`` / ``rejected`` message lists; splits train and test) of a
dataset from ``recipes/magpie_po.py``, pinned to a revision on the Hub or read from its local output folder.

Usage:
    accelerate launch --config_file recipes/accelerate/zero3_4gpu.yaml recipes/dpo.py \\
        --config recipes/dpo_llama3_8b.yaml --dataset_name you/magpie-pro-dpo --dataset_revision v1.0.0
    # a few steps on the CPU from the checkpoint of `python recipes/sft.py --preset cpu`
    python recipes/dpo.py --preset cpu --model_name_or_path outputs/sft-cpu \\
        --dataset_name outputs/magpie_po_cpu/dataset --output_dir outputs/dpo-cpu
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser, get_peft_config  # noqa: E402

from magpie_hf.training import (  # noqa: E402
    RecipeArguments,
    apply_llama3_chat_template,
    filter_long_prompts,
    load_dataset_split,
    parse_recipe_args,
    resize_embeddings_for,
)

PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected"]


@dataclass
class DPORecipeArguments(RecipeArguments):
    max_prompt_length: int | None = field(
        default=1800,
        metadata={"help": "Drop preference pairs whose prompt (chat template + generation prompt) has more tokens."},
    )


RECIPE_DEFAULTS = {"dataset_config": "dpo", "report_to": "none"}

PRESETS = {
    # A few DPO steps on the CPU from the tiny model that `recipes/sft.py --preset cpu` trained.
    "cpu": {
        "model_name_or_path": "outputs/sft-cpu",
        "output_dir": "outputs/dpo-cpu",
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "dataloader_num_workers": 0,
    },
}


def make_parser() -> TrlParser:
    parser = TrlParser((DPORecipeArguments, DPOConfig, ModelConfig))
    parser.set_defaults_with_config(**RECIPE_DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> Path:
    script_args, training_args, model_args = parse_recipe_args(make_parser(), PRESETS, argv)
    set_seed(training_args.seed)
    if not script_args.dataset_name:
        raise ValueError("Pass --dataset_name: a Hub repo id (with --dataset_revision) or the OUTPUT_DIR/dataset "
                         "folder of `recipes/magpie_po.py`.")
    model_path = model_args.model_name_or_path
    if script_args.preset == "cpu" and not Path(model_path).is_dir():
        raise FileNotFoundError(f"No SFT checkpoint at {model_path}: run `python recipes/sft.py --preset cpu "
                                f"--dataset_name ... --output_dir {model_path}` first.")

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )
    if tokenizer.chat_template is None:  # a base model instead of an SFT checkpoint: give it the Llama-3 format
        apply_llama3_chat_template(tokenizer)
        resize_embeddings_for(model, tokenizer)

    def load(split: str):
        dataset = load_dataset_split(script_args.dataset_name, script_args.dataset_config, split,
                                     revision=script_args.dataset_revision)
        missing = [c for c in PREFERENCE_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"The {script_args.dataset_config!r} config has no column(s) {missing} "
                             f"(columns: {dataset.column_names}); expected prompt/chosen/rejected message lists.")
        dataset = dataset.select_columns(PREFERENCE_COLUMNS)
        if script_args.max_prompt_length is not None:
            dataset, removed = filter_long_prompts(dataset, tokenizer, script_args.max_prompt_length)
            print(f"Dropped {removed} of {len(dataset) + removed} preference pairs whose prompt is longer than "
                  f"{script_args.max_prompt_length} tokens ({split} split).")
        return dataset

    train_dataset = load(script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    eval_dataset = load(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None

    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # a frozen copy of the SFT checkpoint (or the adapter switched off with PEFT)
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return Path(training_args.output_dir)


if __name__ == "__main__":
    main()
