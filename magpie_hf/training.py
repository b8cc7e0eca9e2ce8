"""Shared helpers for the TRL recipes ``recipes/sft.py`` and ``recipes/dpo.py``.

The recipes follow TRL 1.16's own ``trl/scripts/sft.py`` and ``trl/scripts/dpo.py``: ``ScriptArguments`` /
``SFTConfig`` (or ``DPOConfig``) / ``ModelConfig`` parsed by ``TrlParser``, the model passed to the trainer by name
with ``model_init_kwargs`` (so DPO's reference model is loaded the same way), ``get_quantization_config`` and
``get_peft_config``, then ``train``, ``save_model``, ``push_to_hub`` and ``end``. What this module adds is what those
scripts lack for Magpie data:

- the dataset is pinned (a Hub dataset needs ``--dataset_revision``) and its config is checked up front, with the
  configs that exist named in the error (:func:`resolve_dataset_config`, :func:`load_dataset_split`);
- ``conversations`` (``{role, content}`` or ShareGPT ``{from, value}``) become TRL's ``messages`` (:func:`to_messages`);
- a base model without a chat template gets TRL's own Llama-3 template file (:func:`use_llama3_template_if_missing`);
- ``--load_in_4bit/8bit`` are refused where they cannot work (:func:`quantization_config`);
- DPO's ``max_prompt_length`` with its pre-1.0 TRL meaning (:func:`cut_long_prompt`, used by ``recipes/dpo.py``);
- where the model and data came from is written into ``config.json`` and the model card (:class:`ProvenanceMixin`);
- a tiny Llama for the ``--preset cpu`` runs (:func:`build_tiny_base_model`) and a chat check (:func:`chat_reply`).

Example:
    >>> from magpie_hf.training import load_dataset_split, to_messages  # doctest: +SKIP
    >>> train = load_dataset_split("Magpie-Align/Magpie-Pro-300K-Filtered", "default", "train",
    ...                            revision="523df96eb7474e97bca6f378b3baa372a4735fcc")  # doctest: +SKIP
    >>> train = to_messages(train)                                   # doctest: +SKIP
    >>> train[0]["messages"][0]["role"]                              # doctest: +SKIP
    'user'
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trl
from trl import ScriptArguments, TrlParser

if TYPE_CHECKING:  # heavy imports stay lazy: tests that only read the YAML recipes import this module
    from datasets import Dataset
    from transformers import BitsAndBytesConfig, PreTrainedTokenizerBase, TrainingArguments
    from trl import ModelConfig

logger = logging.getLogger(__name__)

# --- the Llama-3 chat format ------------------------------------------------------------------------------------------

LLAMA3_EOT = "<|eot_id|>"  # end of turn: the EOS of a chat model
# The special tokens of Meta-Llama-3-8B's tokenizer that its chat template uses (the tiny CPU model gets them too).
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", LLAMA3_EOT, "<|end_of_text|>")
# TRL ships Meta-Llama-3-8B-Instruct's template byte for byte (trl/chat_templates/llama3.jinja, loaded as
# trl.chat_template_utils.llama3_chat_template). With assistant_only_loss=True, SFTTrainer recognises it and trains with
# its {% generation %}-marked twin llama3_training.jinja (trl/chat_template_utils.py:1193, get_training_chat_template;
# sft_trainer.py:941), while the tokenizer, and so the saved checkpoint, keeps this original: TRL recognises the
# trained checkpoint again.
LLAMA3_CHAT_TEMPLATE_PATH = Path(trl.__file__).parent / "chat_templates" / "llama3.jinja"


def use_llama3_template_if_missing(tokenizer: PreTrainedTokenizerBase, training_args: Any) -> str:
    """Point ``training_args.chat_template_path`` at TRL's Llama-3 template when the base model has no chat template.

    SFTTrainer then reads the file (sft_trainer.py:748-752). A tokenizer that has a template keeps it, and an explicit
    ``--chat_template_path`` (a ``.jinja`` file, or a tokenizer to clone with ``trl.clone_chat_template``) wins.
    Returns where the template comes from, for the log.

    Example:
        >>> use_llama3_template_if_missing(AutoTokenizer.from_pretrained("meta-llama/Meta-Llama-3-8B"), args)  # doctest: +SKIP
        'TRL's Llama-3 template (.../trl/chat_templates/llama3.jinja)'
    """
    if training_args.chat_template_path is not None:
        return f"--chat_template_path {training_args.chat_template_path}"
    if tokenizer.chat_template is not None:
        return "the model's own chat template"
    training_args.chat_template_path = str(LLAMA3_CHAT_TEMPLATE_PATH)
    return f"TRL's Llama-3 template ({LLAMA3_CHAT_TEMPLATE_PATH})"


def derive_chat_format(tokenizer: PreTrainedTokenizerBase, training_args: Any) -> str:
    """Fill ``eos_token`` and ``assistant_only_loss`` from the model's chat format where the user left them unset
    (None), after :func:`use_llama3_template_if_missing`; returns what was chosen, for the log.

    - TRL's Llama-3 template (a base model without one): ``<|eot_id|>`` ends a turn, loss on the assistant turns.
    - The model's own template (or ``--chat_template_path``): its own EOS (the tokenizer's: ``<|im_end|>`` for
      Qwen/SmolLM2, ``<end_of_turn>``... TRL's default), and loss on the assistant turns when TRL can mark them (the
      template has ``{% generation %}`` markers, or TRL ships a training twin of it: Llama-3, Qwen2.5/3, Gemma,
      Phi-3, DeepSeek, ...); otherwise on every token, said here rather than failing in the trainer.

    Example:
        >>> args = SFTConfig(output_dir="x", assistant_only_loss=None)                       # doctest: +SKIP
        >>> derive_chat_format(AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct"), args)  # doctest: +SKIP
        "EOS '<|im_end|>' (the model's), loss on the assistant turns (TRL's training twin of the template)"
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    llama3 = training_args.chat_template_path == str(LLAMA3_CHAT_TEMPLATE_PATH)
    if training_args.eos_token is None and llama3:
        training_args.eos_token = LLAMA3_EOT
    eos = training_args.eos_token or tokenizer.eos_token
    eos_from = "given" if training_args.eos_token and not llama3 else ("TRL's Llama-3 template" if llama3 else "the model's")
    if training_args.assistant_only_loss is not None:
        loss = "on the assistant turns" if training_args.assistant_only_loss else "on every token"
        return f"EOS {eos!r} ({eos_from}), loss {loss} (given)"
    template = tokenizer.chat_template
    path = training_args.chat_template_path
    if path is not None and str(path).endswith(".jinja"):
        template = Path(path).read_text()
    elif path is not None:
        training_args.assistant_only_loss = True  # a tokenizer to clone: TRL checks its template itself
        return f"EOS {eos!r} ({eos_from}), loss on the assistant turns"
    if template is not None and has_generation_markers(template):
        why = "the template's {% generation %} markers"
    else:
        try:
            probe = copy.copy(tokenizer)
            probe.chat_template = template
            get_training_chat_template(probe)
            why = "TRL's training twin of the template"
        except ValueError:
            why = None
    training_args.assistant_only_loss = why is not None
    if why is None:
        return (f"EOS {eos!r} ({eos_from}), loss on every token: TRL cannot mark the assistant turns of this chat "
                "template (pass --chat_template_path FILE.jinja with {% generation %} markers for assistant-only loss)")
    return f"EOS {eos!r} ({eos_from}), loss on the assistant turns ({why})"


# --- model loading, as TRL's scripts do it ----------------------------------------------------------------------------


def set_model_init_kwargs(model_args: ModelConfig, training_args: TrainingArguments) -> dict[str, Any]:
    """Fill ``training_args.model_init_kwargs`` from ``model_args``, exactly as trl/scripts/sft.py and dpo.py do.

    The trainer loads the policy from ``model_args.model_name_or_path`` with these kwargs, and DPOTrainer loads its
    reference model from the same path with the same kwargs (dpo_trainer.py:916-927), so both sit at the same
    ``--model_revision``. Values given in ``--model_init_kwargs`` win.
    """
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = kwargs
    return kwargs


def quantization_config(model_args: ModelConfig, training_args: TrainingArguments) -> BitsAndBytesConfig | None:
    """``trl.get_quantization_config(model_args)``, refused with the fix where ``--load_in_4bit/8bit`` cannot work.

    bitsandbytes k-bit weights need a CUDA GPU, and a k-bit model is trained through LoRA adapters (QLoRA):
    transformers refuses to fine-tune "purely quantized models" (trainer_utils.py:133), but only once the whole model
    is loaded.
    """
    from trl import get_quantization_config

    config = get_quantization_config(model_args)
    if config is None:
        return None
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    import torch

    if training_args.use_cpu or not torch.cuda.is_available():
        raise ValueError(
            f"{flag} loads bitsandbytes k-bit weights, which need a CUDA GPU; this run is on the CPU. Drop {flag}, "
            "or run on a GPU after pip install 'magpie-hf[quantization]'."
        )
    if not model_args.use_peft:
        raise ValueError(f"{flag} freezes the k-bit weights; train LoRA adapters on them: add --use_peft (QLoRA).")
    return config


# --- datasets ---------------------------------------------------------------------------------------------------------


def is_local_dataset(name: str) -> bool:
    """True when ``name`` is a folder on disk (a recipe's ``OUTPUT_DIR/dataset``), False for a Hub repo id."""
    return Path(name).expanduser().is_dir()


def _pinned(name: str, revision: str | None) -> tuple[str, str | None]:
    """``(path for datasets, revision)``: a local folder has no revisions, a Hub dataset must have one."""
    if is_local_dataset(name):
        if revision is not None:
            logger.warning("Ignoring dataset revision %r: %s is a local folder, which has no revisions.", revision, name)
        return str(Path(name).expanduser()), None
    if not revision:
        raise ValueError(
            f"Pin the dataset {name!r} to a revision: pass --dataset_revision with a tag (e.g. v1.0.0) or a commit "
            "sha, so the run can be reproduced. (A local folder written by a magpie_hf recipe needs none.)"
        )
    return name, revision


def resolve_dataset_config(name: str, config: str | None, *, revision: str | None) -> str:
    """The config of ``name`` to train on: ``config`` if the dataset has it, else an error naming those it has.

    ``None`` picks the dataset's only config and is refused when there are several (``datasets`` would pick one
    silently). The generation recipes write ``raw`` + ``filtered`` (magpie_pro), ``raw`` (magpie_mt and a
    ``--no-filter`` run) and ``dpo`` + ``raw`` (magpie_po).

    Example:
        >>> resolve_dataset_config("runs/mt/dataset", "filtered", revision=None)  # doctest: +SKIP
        ValueError: runs/mt/dataset has no 'filtered' config; its configs are ['raw']. Pass --dataset_config raw ...
    """
    import datasets

    path, revision = _pinned(name, revision)
    configs = datasets.get_dataset_config_names(path, revision=revision)
    if config in configs or (config is None and len(configs) == 1):
        return config or configs[0]
    choice = f"--dataset_config {configs[0]}" if len(configs) == 1 else f"--dataset_config with one of {configs}"
    if config is None:
        raise ValueError(f"{name} has several configs {configs}: pass {choice}.")
    raise ValueError(
        f"{name} has no {config!r} config; its configs are {configs}. Pass {choice} to train on it (a magpie_pro run "
        "writes 'filtered' unless --no-filter is given or its filter keeps no row; magpie_mt writes only 'raw')."
    )


def load_dataset_split(name: str, config: str | None, split: str, *, revision: str | None) -> Dataset:
    """Load one split of a dataset config, from the Hub at a pinned ``revision`` or from a local dataset folder.

    A Hub dataset without a revision is refused: a training run must name the exact data it saw (a tag such as
    ``v1.0.0`` or a commit sha). A local folder has no revisions, so a revision given for one is ignored with a warning.

    Example:
        >>> load_dataset_split("user/magpie-pro", "filtered", "train", revision="v1.0.0")  # doctest: +SKIP
        >>> load_dataset_split("outputs/pro/dataset", "filtered", "train", revision=None)  # doctest: +SKIP
    """
    import datasets

    path, revision = _pinned(name, revision)
    if revision is None:
        return datasets.load_dataset(path, config, split=split)
    return datasets.load_dataset(path, config, split=split, revision=revision)


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


def to_messages(dataset: Dataset, column: str | None = None, num_proc: int | None = None) -> Dataset:
    """Keep only a ``messages`` column (TRL's conversational format) made from ``column`` (default: ``messages``
    when the dataset has it, as this package's folders do, else ``conversations``).

    Accepts ``{role, content}`` messages and ``{from, value}`` ones (ShareGPT: the published Magpie-Align datasets).
    Rows whose conversation is null or has no assistant turn are dropped, since they carry no loss.
    """
    column = column or ("messages" if "messages" in dataset.column_names else "conversations")
    if column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no {column!r} column (columns: {dataset.column_names}). Use the SFT config of a Magpie "
            "dataset (--dataset_config filtered or raw), not its dpo config."
        )

    def convert(batch: dict[str, list]) -> dict[str, list]:
        return {"messages": [[_normalize_message(m) for m in conversation or []] for conversation in batch[column]]}

    dataset = dataset.map(convert, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc="Formatting conversations")
    return dataset.filter(lambda row: any(m["role"] == "assistant" for m in row["messages"]), num_proc=num_proc,
                          desc="Dropping conversations without a reply")


# --- provenance: where the model and the data came from ---------------------------------------------------------------

PROVENANCE_KEY = "magpie_hf_training"  # the config.json key


@dataclass
class Provenance:
    """What a trained checkpoint was made from; written into its ``config.json`` and its model card."""

    trainer: str
    base_model: str
    base_model_revision: str | None
    base_model_commit: str | None
    dataset_name: str
    dataset_config: str
    dataset_revision: str | None
    base_model_training: dict[str, Any] | None = None  # the base model's own provenance (DPO from an SFT checkpoint)

    @classmethod
    def from_args(cls, trainer: str, script_args: Any, model_args: ModelConfig, dataset_config: str) -> Provenance:
        """Local folders have no revision (``None``). The commit is filled in once the model is loaded."""
        model = model_args.model_name_or_path
        return cls(
            trainer=trainer,
            base_model=model,
            base_model_revision=None if Path(model).expanduser().is_dir() else model_args.model_revision,
            base_model_commit=None,
            dataset_name=script_args.dataset_name,
            dataset_config=dataset_config,
            dataset_revision=None if is_local_dataset(script_args.dataset_name) else script_args.dataset_revision,
        )

    def pinned_dataset(self) -> str:
        """``'revision v1.0.0'`` or ``'local folder'``, for the log."""
        return _pinned_text(self.dataset_revision).replace("`", "")

    def card_section(self) -> str:
        pinned = _pinned_text
        lines = [
            "## Training data and base model",
            "",
            f"Trained with {self.trainer} by the magpie_hf TRL recipe.",
            "",
            f"- Base model: `{self.base_model}`, {pinned(self.base_model_revision, self.base_model_commit)}",
            f"- Dataset: `{self.dataset_name}`, config `{self.dataset_config}`, {pinned(self.dataset_revision)}",
        ]
        if self.base_model_training:
            base = self.base_model_training
            lines.append(f"- The base model was trained with {base.get('trainer')} on `{base.get('dataset_name')}`, "
                         f"config `{base.get('dataset_config')}`, {pinned(base.get('dataset_revision'))}")
        return "\n".join(lines) + "\n"


def _pinned_text(revision: str | None, commit: str | None = None) -> str:
    if revision is None:
        return "local folder"
    return f"revision `{revision}`" + (f" (commit `{commit}`)" if commit and commit != revision else "")


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit sha ``revision`` resolved to when the model was downloaded (read from the HF cache, offline).

    Example:
        >>> _cached_commit("meta-llama/Meta-Llama-3-8B", "main")  # doctest: +SKIP
        '<the 40-hex-digit commit of main when it was downloaded>'
    """
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils import extract_commit_hash

    try:
        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # HFValidationError: not a repo id (e.g. a local path that does not exist)
        return None
    return extract_commit_hash(path, None) if isinstance(path, str) else None


class ProvenanceMixin:
    """Mix into a TRL trainer: ``provenance=`` goes into the model's ``config.json`` and into every model card.

    TRL writes the card in ``create_model_card`` (base_trainer.py:146), called by ``_save_checkpoint`` and by
    ``push_to_hub``; this adds the base model and dataset with their revisions to it.

    Example:
        >>> class MagpieSFTTrainer(ProvenanceMixin, SFTTrainer): ...  # doctest: +SKIP
        >>> trainer = MagpieSFTTrainer(model=..., args=..., train_dataset=..., provenance=provenance)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, provenance: Provenance, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if provenance.base_model_revision is not None:  # a Hub model, now in the cache
            provenance.base_model_commit = _cached_commit(provenance.base_model, provenance.base_model_revision)
        config = self.model.config  # a PeftModel forwards .config to its base model
        previous = getattr(config, PROVENANCE_KEY, None)
        if isinstance(previous, dict):
            provenance.base_model_training = {k: v for k, v in previous.items() if k != "base_model_training"}
        self.provenance = provenance
        setattr(config, PROVENANCE_KEY, asdict(provenance))

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        super().create_model_card(model_name=model_name, dataset_name=dataset_name or self.provenance.dataset_name,
                                  tags=tags)
        if not self.is_world_process_zero():
            return
        from huggingface_hub import ModelCard

        path = Path(self.args.output_dir) / "README.md"
        card = ModelCard.load(path)
        for key in ("base_model_revision", "dataset_config", "dataset_revision"):
            setattr(card.data, key, getattr(self.provenance, key))
        card.text = card.text.rstrip("\n") + "\n\n" + self.provenance.card_section()
        card.save(path)


# --- DPO: max_prompt_length with its pre-1.0 TRL meaning --------------------------------------------------------------


def cut_long_prompt(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], *, max_length: int,
                    max_prompt_length: int) -> list[int]:
    """Keep the last ``max_prompt_length`` prompt tokens when the prompt plus the longer reply exceeds ``max_length``.

    TRL 1.x has no ``max_prompt_length``. Up to TRL 0.9 (the version the published Magpie DPO recipe ran),
    ``DPOTrainer.tokenize_row`` did this with the default ``truncation_mode="keep_end"``, then cut the replies to fit
    ``max_length``; TRL 1.16's ``DataCollatorForPreference`` (``keep_start``) does that last cut.

    Example:
        >>> cut_long_prompt([1, 2, 3, 4, 5, 6], [7, 8], [9], max_length=6, max_prompt_length=3)
        [4, 5, 6]
        >>> cut_long_prompt([1, 2, 3], [7, 8], [9], max_length=6, max_prompt_length=2)
        [1, 2, 3]
    """
    if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length:
        return prompt_ids[-max_prompt_length:]
    return prompt_ids


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

    from magpie_hf.utils.embedded import embedded_chat_model

    directory, gguf_file = embedded_chat_model()
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def build_tiny_base_model(
    output_dir: str | Path, *, seed: int = 0, size: TinyLlamaConfig | None = None, chat: bool = False
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` and a tokenizer laid out like Meta-Llama-3-8B's to ``output_dir``.

    The tokenizer is the embedded SmolLM2 one with the Llama-3 special tokens added, ``<|begin_of_text|>`` as BOS,
    ``<|end_of_text|>`` as EOS and no chat template, as a base model has: the SFT recipe then treats it exactly like
    Meta-Llama-3-8B (TRL's Llama-3 template, ``<|eot_id|>`` as EOS, no tokens added, no embeddings resized).
    With ``chat=True`` the tokenizer is SmolLM2's as it is (its ChatML template, ``<|im_end|>`` as EOS): a chat
    model of another family, as stock ``trl sft`` takes one.

    Example:
        >>> path = build_tiny_base_model("outputs/tiny-base")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path).num_parameters()  # doctest: +SKIP
        3312704
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = size or TinyLlamaConfig()
    tokenizer = embedded_tokenizer()
    if not chat:
        tokenizer.add_tokens([t for t in LLAMA3_SPECIAL_TOKENS if t not in tokenizer.get_vocab()], special_tokens=True)
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|begin_of_text|>", "<|end_of_text|>", None
        tokenizer.chat_template = None
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


#: project-only settings that a shipped YAML keeps under TRL's ``env:`` key, so that stock ``trl sft|dpo --config`` loads
#: the same file (TRL exports ``env`` as environment variables, which nothing in TRL reads): variable -> (field, type).
#: The recipes read them from the YAML (not from the environment), where the flag is unset.
YAML_ENV_SETTINGS: dict[str, tuple[str, type]] = {
    "MAGPIE_HF_DATASET_REVISION": ("dataset_revision", str),
    "MAGPIE_HF_MAX_PROMPT_LENGTH": ("max_prompt_length", int),
}


def _yaml_env(argv: list[str]) -> dict[str, Any]:
    """The ``env:`` mapping of the ``--config`` YAML in ``argv`` ({} without one)."""
    import yaml

    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path is not None:
            config = yaml.safe_load(Path(path).read_text()) or {}
            return dict(config.get("env") or {}) if isinstance(config, dict) else {}
    return {}


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
    parsed = parser.parse_args_and_config(args=argv)
    env = _yaml_env(argv)
    for variable, (name, kind) in YAML_ENV_SETTINGS.items():
        for section in parsed:
            if variable in env and hasattr(section, name) and getattr(section, name) is None:
                setattr(section, name, kind(env[variable]))
    return parsed


def train_and_save(trainer: Any, training_args: TrainingArguments, script_args: RecipeArguments) -> Path:
    """Train, then end as TRL's ``trl/scripts/sft.py`` and ``dpo.py`` do (``save_model``, ``push_to_hub``, ``end``),
    plus ``trainer_state.json`` (the loss curve) and a model card for a local run too; returns the output folder."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.create_model_card(model_name=Path(training_args.output_dir).name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers and destroy the process group (transformers >= 5.18)
    return Path(training_args.output_dir)
