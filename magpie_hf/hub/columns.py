"""The published columns: what stock tools read from a Magpie config as it is.

A config with conversations (an SFT-shaped one: ``raw``, ``filtered``) is written with:

- ``messages``: every turn as ``{role, content}`` (TRL's conversational format: ``trl sft --dataset_name DIR
  --dataset_config filtered`` trains on it unchanged);
- ``conversations``: the same turns in the official ShareGPT form, ``{"from": "human"|"gpt"|"system", "value"}``
  (the official Magpie datasets and scripts, Axolotl's ``sharegpt`` loader);
- ``instruction_length`` and ``response_length``: characters of ``instruction`` and ``response``, as the official
  filter notebook computes ``len(example['response'])``;
- ``model``: the model that wrote the instruction (``gen_input_configs.input_generator``), as the published sets;
- ``language``: the ISO 639-1 code in upper case (``EN``), as the official ``unitag.py`` writes
  ``iso_code_639_1.name``.

Inside a run the steps keep ``conversations`` as ``{role, content}`` (what chat templates take); the change is made
once, when the dataset folder is written (:func:`magpie_hf.hub.save_dataset_folder`). Other configs (``dpo``: TRL's
explicit-prompt form) are written as they are.

Example:
    >>> import datasets
    >>> rows = datasets.Dataset.from_list([{"instruction": "Hi?", "response": "Hello.", "language": "en",
    ...     "conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}])
    >>> row = stock_columns(rows)[0]
    >>> row["messages"][1], row["conversations"][0], row["response_length"], row["language"]
    ({'role': 'assistant', 'content': 'Hello.'}, {'from': 'human', 'value': 'Hi?'}, 6, 'EN')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

#: ShareGPT speaker names of the chat roles (the official ``convert_to_sharegpt``; FastChat's names)
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
CHAT_ROLES = {v: k for k, v in SHAREGPT_ROLES.items()}

def is_sft_shaped(dataset: "datasets.Dataset") -> bool:
    """Whether ``dataset`` holds conversations (``conversations`` or ``instruction`` + ``response``)."""
    names = set(dataset.column_names)
    return "conversations" in names or {"instruction", "response"} <= names


def _turns(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The row's turns as ``{role, content}`` (from either form of ``conversations``, else instruction/response)."""
    conversation = row.get("conversations")
    if conversation:
        return [
            {"role": m.get("role") or CHAT_ROLES.get(m.get("from"), m.get("from")),
             "content": m.get("content") if m.get("content") is not None else m.get("value")}
            for m in conversation
        ]
    if "conversations" in row:  # null: the response failed (the reason is in response_error)
        return None
    instruction, response = row.get("instruction"), row.get("response")
    if instruction is None or response is None:
        return None
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


def _add_columns(batch: dict[str, list], names: set[str]) -> dict[str, list]:
    needed = [c for c in ("conversations", "instruction", "response") if c in batch]
    rows = [dict(zip(needed, values)) for values in zip(*(batch[c] for c in needed))]
    turns = [_turns(row) for row in rows]
    out: dict[str, list] = {
        "messages": turns,
        "conversations": [
            None if t is None else [{"from": SHAREGPT_ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in t]
            for t in turns
        ],
    }
    if "instruction" in names:
        out["instruction_length"] = [None if v is None else len(v) for v in batch["instruction"]]
    if "response" in names:
        out["response_length"] = [None if v is None else len(v) for v in batch["response"]]
    if "gen_input_configs" in names:
        out["model"] = [(c or {}).get("input_generator") for c in batch["gen_input_configs"]]
    if "language" in names:
        out["language"] = [None if v is None else str(v).upper() for v in batch["language"]]
    return out


def stock_columns(dataset: "datasets.Dataset") -> "datasets.Dataset":
    """``dataset`` with the published columns (see the module docstring); a config without conversations, or
    one already converted, is returned as it is."""
    import datasets

    if not is_sft_shaped(dataset):
        return dataset
    names = set(dataset.column_names)
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = dataset.features.copy()
    features["messages"] = datasets.List(message)
    features["conversations"] = datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")})
    for column, present in (("instruction_length", "instruction"), ("response_length", "response")):
        if present in names:
            features[column] = datasets.Value("int64")
    if "gen_input_configs" in names:
        features["model"] = datasets.Value("string")
    if "language" in names:
        features["language"] = datasets.Value("string")
    return dataset.map(_add_columns, batched=True, fn_kwargs={"names": names}, features=features,
                       desc="published columns")
