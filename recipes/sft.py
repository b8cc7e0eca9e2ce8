#!/usr/bin/env python
"""Supervised fine-tuning of Llama-3-8B (base) on a Magpie dataset with TRL's ``SFTTrainer`` (paper, Table 7).

Built like TRL 1.16's ``trl/scripts/sft.py``: the model is passed by name with ``model_init_kwargs``, quantization and
LoRA come from ``get_quantization_config`` / ``get_peft_config``, and the run ends with ``save_model``,
``push_to_hub`` and ``end``. On top of it: the dataset is pinned (a Hub dataset needs ``--dataset_revision``), its
``filtered`` config is used by default (the one ``recipes/magpie_pro.py`` writes for training; the run stops and names
the configs that exist when it is missing), ``messages`` (or ``conversations``) are the conversations, a base model
without a chat template gets TRL's Llama-3 template (``trl/chat_templates/llama3.jinja``; the loss covers the assistant
turns only through its ``{% generation %}`` twin) with ``<|eot_id|>`` as EOS, a chat model keeps its own template and
EOS (assistant-only loss where TRL can mark its turns, :func:`magpie_hf.training.derive_chat_format`), and the
dataset and base model with their revisions go into the checkpoint's ``config.json`` and model card.

Usage:
    # the paper's run, 4 GPUs x batch 1 x grad-accum 8 = 32
    accelerate launch --config_file recipes/accelerate/zero3_4gpu.yaml recipes/sft.py \\
        --config recipes/sft_llama3_8b.yaml
    # any YAML value can be overridden on the command line
    python recipes/sft.py --config recipes/sft_llama3_8b.yaml --dataset_name you/magpie-pro --dataset_config filtered \\
        --dataset_revision v1.0.0
    # a few steps of a tiny model on the CPU, on the dataset folder of `recipes/magpie_pro.py --preset cpu`
    python recipes/sft.py --preset cpu --dataset_name runs/magpie_pro/dataset --output_dir outputs/sft-cpu
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import AutoTokenizer, set_seed  # noqa: E402
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config  # noqa: E402

from magpie_hf.training import (  # noqa: E402
    Provenance,
    ProvenanceMixin,
    RecipeArguments,
    build_tiny_base_model,
    derive_chat_format,
    load_dataset_split,
    parse_recipe_args,
    quantization_config,
    resolve_dataset_config,
    set_model_init_kwargs,
    to_messages,
    train_and_save,
    use_llama3_template_if_missing,
)

# Defaults of this recipe whatever the config: the config to train on, and "derive from the model" (None) for the
# loss mask; the EOS is the model's own unless TRL's Llama-3 template stands in (derive_chat_format).
RECIPE_DEFAULTS = {
    "dataset_config": "filtered",
    "assistant_only_loss": None,
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


class MagpieSFTTrainer(ProvenanceMixin, SFTTrainer):
    """``SFTTrainer`` that writes the base model and dataset, with their revisions, into config.json and the card."""


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
                "--attn_implementation flash_attention_2 (pip install 'magpie-hf[flash-attn]') or "
                "kernels-community/flash-attn2, or turn packing off with --packing false."
            )
    if training_args.packing and training_args.packing_strategy == "wrapped":
        raise ValueError("packing_strategy='wrapped' cuts conversations mid-turn; use 'bfd' or --packing false.")


def build_trainer(script_args: RecipeArguments, training_args: SFTConfig, model_args: ModelConfig) -> SFTTrainer:
    """Everything between the parsed arguments and ``trainer.train()``."""
    check_packing(training_args, model_args)
    if not script_args.dataset_name:
        raise ValueError(
            "Pass --dataset_name: a Hub repo id (with --dataset_revision) or the OUTPUT_DIR/dataset folder of a "
            "magpie_hf recipe, e.g. `python recipes/magpie_pro.py --preset cpu` then "
            "--dataset_name runs/<recipe>/dataset."
        )
    quantization = quantization_config(model_args, training_args)
    if model_args.model_name_or_path is None and script_args.preset != "cpu":
        raise ValueError("Pass --model_name_or_path (e.g. meta-llama/Meta-Llama-3-8B).")

    # Data: one pinned config, conversations -> messages.
    config = resolve_dataset_config(script_args.dataset_name, script_args.dataset_config,
                                    revision=script_args.dataset_revision)

    def load(split: str):
        dataset = load_dataset_split(script_args.dataset_name, config, split, revision=script_args.dataset_revision)
        return to_messages(dataset, num_proc=training_args.dataset_num_proc)

    train_dataset = load(script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    eval_dataset = load(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None

    # Model: by name, loaded by the trainer; a base model without a chat template gets TRL's Llama-3 one.
    if model_args.model_name_or_path is None:  # --preset cpu
        model_args.model_name_or_path = str(build_tiny_base_model(Path(training_args.output_dir) / "base_model",
                                                                  seed=training_args.seed))
    set_model_init_kwargs(model_args, training_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    provenance = Provenance.from_args("SFT", script_args, model_args, config)
    print(f"Training on {len(train_dataset)} conversations of {script_args.dataset_name}, config {config!r}, "
          f"split {script_args.dataset_train_split!r} ({provenance.pinned_dataset()}).")
    print(f"Chat template: {use_llama3_template_if_missing(tokenizer, training_args)}; "
          f"{derive_chat_format(tokenizer, training_args)}.")

    return MagpieSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=quantization,
        peft_config=get_peft_config(model_args),
        provenance=provenance,
    )


def main(argv: list[str] | None = None) -> Path:
    script_args, training_args, model_args = parse_recipe_args(make_parser(), PRESETS, argv)
    set_seed(training_args.seed)
    trainer = build_trainer(script_args, training_args, model_args)
    return train_and_save(trainer, training_args, script_args)


if __name__ == "__main__":
    main()
