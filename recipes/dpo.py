#!/usr/bin/env python
"""DPO of a Magpie SFT checkpoint on Magpie preference pairs with TRL's ``DPOTrainer``.

Built like TRL 1.16's ``trl/scripts/dpo.py``: the policy is passed by name with ``model_init_kwargs``, so the
reference model is loaded from the same path at the same ``--model_revision`` (or, with ``--use_peft``, is the policy
with its adapter switched off); quantization and LoRA come from ``get_quantization_config`` / ``get_peft_config``; the
run ends with ``save_model``, ``push_to_hub`` and ``end``.

Settings of the published Magpie DPO recipe (``dpo_llama3_8b.yaml``): beta 0.01, lr 1e-6, 1 epoch, cosine, warmup
ratio 0.1, max length 2048, max prompt length 1800. ``max_prompt_length`` keeps the meaning it had in TRL up to 0.9,
which that recipe ran on: when prompt + longer reply exceed ``max_length``, the prompt keeps its last 1800 tokens (the
number of pairs cut is printed). The data is the ``dpo`` config (``prompt`` / ``chosen`` / ``rejected`` message
lists; splits train and test) of a dataset from ``recipes/magpie_po.py``, pinned to a revision on the Hub or read
from its local output folder.

Usage:
    accelerate launch --config_file recipes/accelerate/zero3_4gpu.yaml recipes/dpo.py \\
        --config recipes/dpo_llama3_8b.yaml --dataset_name you/magpie-pro-dpo --dataset_revision v1.0.0
    # a few steps on the CPU from the checkpoint of `python recipes/sft.py --preset cpu`
    python recipes/dpo.py --preset cpu --model_name_or_path outputs/sft-cpu \\
        --dataset_name runs/magpie_po/dataset --output_dir outputs/dpo-cpu
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from accelerate import PartialState  # noqa: E402
from transformers import AutoTokenizer, set_seed  # noqa: E402
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser, get_peft_config  # noqa: E402

from magpie_hf.training import (  # noqa: E402
    Provenance,
    ProvenanceMixin,
    RecipeArguments,
    cut_long_prompt,
    load_dataset_split,
    parse_recipe_args,
    quantization_config,
    resolve_dataset_config,
    set_model_init_kwargs,
    train_and_save,
)

PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected"]


@dataclass
class DPORecipeArguments(RecipeArguments):
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "When prompt + longer reply exceed max_length, keep the last N prompt tokens (the meaning "
                          "of TRL <= 0.9's max_prompt_length; must be below max_length). 0 (or null in a YAML): TRL "
                          "1.x's own truncation, which drops pairs whose prompt alone fills max_length."},
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
        "max_length": 512,
        "max_prompt_length": 448,
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


class MagpieDPOTrainer(ProvenanceMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` plus ``max_prompt_length`` (:func:`magpie_hf.training.cut_long_prompt`), cut pairs counted.

    TRL 1.16 tokenizes in ``_prepare_dataset`` and then drops every pair whose prompt alone reaches ``max_length``
    (trl/trainer/dpo_trainer.py:1134-1140). TRL <= 0.9 cut such prompts instead, so with ``max_prompt_length`` set the
    tokenization runs on a copy of the config with ``max_length=None`` (which skips only that filter) and the cut
    follows; every prompt is then at most ``max_prompt_length < max_length`` tokens, so no pair is lost, and the
    collator (``keep_start``) cuts the replies to fit ``max_length`` as before.
    """

    def __init__(self, *args: Any, max_prompt_length: int | None = None, **kwargs: Any) -> None:
        max_length = kwargs["args"].max_length
        if max_prompt_length is not None and (max_length is None or max_prompt_length >= max_length):
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}); "
                             "lower it, or pass --max_prompt_length 0 to keep TRL's own truncation.")
        self.max_prompt_length = max_prompt_length
        self.prompts_cut: dict[str, int] = {}  # dataset name -> pairs whose prompt was cut
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001, ANN202 (TRL's)
        if self.max_prompt_length is None:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        untruncated = copy.copy(args)
        untruncated.max_length = None
        dataset = super()._prepare_dataset(dataset, processing_class, untruncated, dataset_name)
        limits = {"max_length": args.max_length, "max_prompt_length": self.max_prompt_length}

        def cut(row: dict) -> dict:
            prompt = cut_long_prompt(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], **limits)
            return {"prompt_ids": prompt, "prompt_cut": len(prompt) < len(row["prompt_ids"])}

        dataset = dataset.map(cut, num_proc=args.dataset_num_proc, desc=f"Cutting long prompts ({dataset_name})")
        self.prompts_cut[dataset_name] = sum(dataset["prompt_cut"])
        PartialState().print(
            f"Cut the prompt of {self.prompts_cut[dataset_name]} of {len(dataset)} {dataset_name} preference pairs to "
            f"its last {self.max_prompt_length} tokens (prompt + longer reply over max_length {args.max_length}).")
        return dataset.remove_columns("prompt_cut")


def make_parser() -> TrlParser:
    parser = TrlParser((DPORecipeArguments, DPOConfig, ModelConfig))
    parser.set_defaults_with_config(**RECIPE_DEFAULTS)
    return parser


def build_trainer(script_args: DPORecipeArguments, training_args: DPOConfig, model_args: ModelConfig) -> DPOTrainer:
    """Everything between the parsed arguments and ``trainer.train()``."""
    if not script_args.dataset_name:
        raise ValueError("Pass --dataset_name: a Hub repo id (with --dataset_revision) or the OUTPUT_DIR/dataset "
                         "folder of `recipes/magpie_po.py`.")
    model_path = model_args.model_name_or_path
    if script_args.preset == "cpu" and not Path(model_path).is_dir():
        raise FileNotFoundError(f"No SFT checkpoint at {model_path}: run `python recipes/sft.py --preset cpu "
                                f"--dataset_name ... --output_dir {model_path}` first.")
    quantization = quantization_config(model_args, training_args)
    set_model_init_kwargs(model_args, training_args)  # the policy and the reference model both load with these
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"{model_path} has no chat template: DPO starts from a chat model. Train one with "
                         "recipes/sft.py (it gives a base model TRL's Llama-3 template) and pass its output folder.")

    config = resolve_dataset_config(script_args.dataset_name, script_args.dataset_config,
                                    revision=script_args.dataset_revision)

    def load(split: str):
        dataset = load_dataset_split(script_args.dataset_name, config, split, revision=script_args.dataset_revision)
        missing = [c for c in PREFERENCE_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"The {config!r} config has no column(s) {missing} (columns: {dataset.column_names}); "
                             "expected prompt/chosen/rejected message lists (--dataset_config dpo).")
        return dataset.select_columns(PREFERENCE_COLUMNS)

    train_dataset = load(script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    eval_dataset = load(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None
    provenance = Provenance.from_args("DPO", script_args, model_args, config)
    print(f"Training on {len(train_dataset)} preference pairs of {script_args.dataset_name}, config {config!r}, "
          f"split {script_args.dataset_train_split!r} ({provenance.pinned_dataset()}).")

    trainer = MagpieDPOTrainer(
        model=model_path,  # by name: DPOTrainer loads the reference model with the same model_init_kwargs
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=quantization,
        peft_config=get_peft_config(model_args),
        max_prompt_length=script_args.max_prompt_length or None,  # 0: off (a flag cannot say None)
        provenance=provenance,
    )
    if script_args.ignore_bias_buffers:  # as trl/scripts/dpo.py: torch distributed hack
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


def main(argv: list[str] | None = None) -> Path:
    script_args, training_args, model_args = parse_recipe_args(make_parser(), PRESETS, argv)
    set_seed(training_args.seed)
    trainer = build_trainer(script_args, training_args, model_args)
    return train_and_save(trainer, training_args, script_args)


if __name__ == "__main__":
    main()
