"""Shared helpers for the TRL recipes ``recipes/sft.py`` and ``recipes/dpo.py``.

One idea each: load a Magpie dataset config at a pinned revision, turn its ``conversations`` column into the
``messages`` column TRL expects, give a base model the Llama-3 chat template (with ``{% generation %}`` markers so
that ``assistant_only_loss=True`` masks exactly the assistant turns), drop preference pairs whose prompt is too long,
build a tiny CPU model for the ``--preset cpu`` runs, and ask a saved model a chat question.

Example:
    >>> from magpie_hf.training import load_dataset_split, to_messages  # doctest: +SKIP
    >>> train = load_dataset_split("Magpie-Align/Magpie-Pro-300K-Filtered", None, "train",
    ...                            revision="523df96eb7474e97bca6f378b3baa372a4735fcc")  # doctest: +SKIP
    >>> train = to_messages(train)                                   # doctest: +SKIP
    >>> train[0]["messages"][0]["role"]                              # doctest: +SKIP
    'user'
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import ScriptArguments, TrlParser

if TYPE_CHECKING:  # heavy imports stay lazy: the module is imported by tests that only read YAML
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# --- the Llama-3 chat format ------------------------------------------------------------------------------------------

LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOT = "<|eot_id|>"  # end of turn: the EOS of a chat model
LLAMA3_END_OF_TEXT = "<|end_of_text|>"  # the base model's EOS; never rendered by the chat template, so a safe pad
LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>")
LLAMA3_SPECIAL_TOKENS = (LLAMA3_BOS, *LLAMA3_HEADER_TOKENS, LLAMA3_EOT, LLAMA3_END_OF_TEXT)

# Renders exactly like Meta-Llama-3-8B-Instruct's official template (BOS once, then per message
# "<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>"), and wraps every assistant reply together
# with its <|eot_id|> in {% generation %} so `return_assistant_tokens_mask=True` marks the tokens the model must learn
# to produce, the stop token included.
LLAMA3_TRAINING_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# The same template without the markers, saved with the trained model for inference engines that do not know them.
LLAMA3_CHAT_TEMPLATE = LLAMA3_TRAINING_CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")


def apply_llama3_chat_template(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give ``tokenizer`` the Llama-3 chat template, ``<|eot_id|>`` as EOS and ``<|end_of_text|>`` as pad.

    Llama-3-8B (base) has all five special tokens but no chat template and ``<|end_of_text|>`` as EOS. Any other
    tokenizer (the embedded SmolLM2 one in ``--preset cpu``) gets the missing tokens added as special tokens; the
    caller must then resize the model's embeddings (:func:`resize_embeddings_for`).

    Returns the tokens that were added (empty for a Llama-3 tokenizer).

    Example:
        >>> added = apply_llama3_chat_template(tokenizer)  # doctest: +SKIP
        >>> tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +SKIP
        '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>'
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in LLAMA3_SPECIAL_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.bos_token = LLAMA3_BOS
    tokenizer.eos_token = LLAMA3_EOT
    tokenizer.pad_token = LLAMA3_END_OF_TEXT
    tokenizer.chat_template = LLAMA3_TRAINING_CHAT_TEMPLATE
    return missing


def resize_embeddings_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the model's embeddings when the tokenizer has more tokens than rows; set its special-token ids."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config.get_text_config(), model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id


# --- datasets ---------------------------------------------------------------------------------------------------------


def is_local_dataset(name: str) -> bool:
    """True when ``name`` is a folder on disk (a recipe's ``OUTPUT_DIR/dataset``), False for a Hub repo id."""
    return Path(name).expanduser().is_dir()


def load_dataset_split(name: str, config: str | None, split: str, *, revision: str | None) -> Dataset:
    """Load one split of a dataset config, from the Hub at a pinned ``revision`` or from a local dataset folder.

    A Hub dataset without a revision is refused: a training run must name the exact data it saw (a tag such as
    ``v1.0.0`` or a commit sha). A local folder has no revisions, so a revision given for one is ignored with a warning.

    Example:
        >>> load_dataset_split("user/magpie-pro", "sft", "train", revision="v1.0.0")  # doctest: +SKIP
        >>> load_dataset_split("outputs/pro/dataset", "sft", "train", revision=None)  # doctest: +SKIP
    """
    import datasets

    if is_local_dataset(name):
        if revision is not None:
            logger.warning("Ignoring dataset revision %r: %s is a local folder, which has no revisions.", revision, name)
        return datasets.load_dataset(str(Path(name).expanduser()), config, split=split)
    if not revision:
        raise ValueError(
            f"Pin the dataset {name!r} to a revision: pass --dataset_revision with a tag (e.g. v1.0.0) or a commit "
            "sha, so the run can be reproduced. (A local folder written by a magpie_hf recipe needs none.)"
        )
    return datasets.load_dataset(name, config, split=split, revision=revision)


# ShareGPT-style roles used by the published Magpie-Align datasets ({"from": "human", "value": ...}).
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _normalize_message(message: dict[str, Any]) -> dict[str, str]:
    if "role" in message and "content" in message:
        return {"role": message["role"], "content": message["content"]}
    if "from" in message and "value" in message:
        role = _SHAREGPT_ROLES.get(message["from"])
        if role is None:
            raise ValueError(f"Unknown ShareGPT speaker {message['from']!r}; expected one of {sorted(_SHAREGPT_ROLES)}.")
        return {"role": role, "content": message["value"]}
    raise ValueError(f"A message needs role/content (or from/value) keys, got {sorted(message)}.")


def to_messages(dataset: Dataset, column: str = "conversations", num_proc: int | None = None) -> Dataset:
    """Keep only a ``messages`` column (TRL's conversational format) made from ``column``.

    Accepts ``{role, content}`` messages (this package's pipeline) and ``{from, value}`` ones (the published
    Magpie-Align datasets). Rows whose conversation has no assistant turn are dropped, since they carry no loss.
    """
    if column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no {column!r} column (columns: {dataset.column_names}). Use the SFT config of a Magpie "
            "dataset (e.g. --dataset_config sft) or pass --messages_column."
        )

    def convert(batch: dict[str, list]) -> dict[str, list]:
        return {"messages": [[_normalize_message(m) for m in conversation] for conversation in batch[column]]}

    dataset = dataset.map(convert, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc="Formatting conversations")
    return dataset.filter(lambda row: any(m["role"] == "assistant" for m in row["messages"]), num_proc=num_proc,
                          desc="Dropping conversations without a reply")


def prompt_lengths(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, column: str = "prompt") -> list[int]:
    """Token count of every conversational prompt, rendered with the generation prompt as DPO sees it."""
    return [
        len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        for prompt in dataset[column]
    ]


def filter_long_prompts(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int, column: str = "prompt"
) -> tuple[Dataset, int]:
    """Drop preference pairs whose prompt is longer than ``max_prompt_length`` tokens; return them and the count.

    TRL 1.x has no ``max_prompt_length`` any more (only ``max_length`` on prompt + completion), so the Magpie DPO
    recipe's 1800-token prompt cap is applied here, before training.
    """
    keep = [i for i, n in enumerate(prompt_lengths(dataset, tokenizer, column)) if n <= max_prompt_length]
    return dataset.select(keep), len(dataset) - len(keep)


# --- the tiny CPU model -----------------------------------------------------------------------------------------------


@dataclass
class TinyLlamaConfig:
    """Size of the randomly initialised Llama built for ``--preset cpu`` (about 3.3M parameters with SmolLM2's
    49k-token vocabulary, almost all of them the tied embedding)."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of the embedded SmolLM2-135M-Instruct (read from its GGUF file; nothing is downloaded)."""
    from transformers import AutoTokenizer

    from magpie_hf.embedded import embedded_chat_model

    directory, gguf_file = embedded_chat_model()
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def build_tiny_base_model(output_dir: str | Path, *, seed: int = 0, size: TinyLlamaConfig | None = None) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` plus the embedded tokenizer to ``output_dir``, like a base model.

    The tokenizer keeps its own (ChatML) chat template; the SFT recipe replaces it with the Llama-3 template, adds
    the Llama-3 special tokens and grows the embeddings, exactly as it does for any base model without them.

    Example:
        >>> path = build_tiny_base_model("outputs/tiny-base")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path).num_parameters()  # doctest: +SKIP
        3312384
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = size or TinyLlamaConfig()
    tokenizer = embedded_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=size.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# --- checking a trained model -----------------------------------------------------------------------------------------


def chat_reply(model_dir: str | Path, messages: list[dict[str, str]], *, max_new_tokens: int = 32) -> str:
    """Reload a saved chat model and answer ``messages`` through its own chat template (greedy decoding).

    Example:
        >>> chat_reply("outputs/sft-cpu", [{"role": "user", "content": "Name a colour."}])  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# --- command line ------------------------------------------------------------------------------------------------------


@dataclass
class RecipeArguments(ScriptArguments):
    """TRL's ``ScriptArguments`` plus what the Magpie recipes add: a pinned dataset revision and presets."""

    dataset_revision: str | None = field(
        default=None,
        metadata={"help": "Tag, branch or commit sha of the Hub dataset (required for a Hub dataset; a local "
                          "folder written by a magpie_hf recipe has no revisions)."},
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "'cpu': a few steps of a tiny model on the CPU, for trying the recipe and for tests.",
                  "choices": ["cpu"]},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows (quick trials)."}
    )


def parse_recipe_args(
    parser: TrlParser, presets: dict[str, dict[str, Any]], argv: list[str] | None = None
) -> tuple[Any, ...]:
    """Parse ``argv`` into the parser's dataclasses; precedence: command line > ``--config`` YAML > preset > defaults.

    Example:
        >>> parser = TrlParser((RecipeArguments, SFTConfig, ModelConfig))       # doctest: +SKIP
        >>> script_args, sft_args, model_args = parse_recipe_args(parser, {"cpu": {"max_steps": 8}},
        ...                                                       ["--preset", "cpu"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = None
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(presets)}.")
        unknown = parser.set_defaults_with_config(**presets[preset])
        if unknown:
            raise ValueError(f"Preset {preset!r} sets unknown arguments: {unknown[::2]}")
    return parser.parse_args_and_config(args=argv)
