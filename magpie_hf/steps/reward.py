"""Response rewards: a sequence-classification reward model, or an instruct model as judge.

The paper scores every response with ``sfairXC/FsfairX-LLaMA3-RM-v0.1`` (``instruct_reward``) and
the base model's response with the same model (``base_reward``), and filters on ``r* > -12`` and
``r* - r_base > 0``. :class:`RewardModelScorer` is the reusable scorer; :class:`RewardModel` is the
step (column names configurable, so the same step writes ``base_reward`` from ``base_output``);
:class:`JudgeReward` asks an instruct model for a 1–10 rating instead, for machines without a
reward model (its scale differs: the paper's thresholds do not apply to it).

Formatting: the RM's own chat template over ``[user: instruction, assistant: response]``, BOS once.
Truncation: a conversation longer than ``max_length`` tokens keeps its beginning (the whole
instruction) and loses the *end of the response*; the template's closing tokens after the response
(e.g. ``<|eot_id|>``) are kept so the reward head still reads an end of turn. Counted in
``stats["truncated"]``.

Example:
    >>> from magpie_hf.steps.reward import RewardModel, RewardModelScorer
    >>> scorer = RewardModelScorer("sfairXC/FsfairX-LLaMA3-RM-v0.1")  # doctest: +SKIP
    >>> scorer.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])  # doctest: +SKIP
    >>> base = RewardModel(response_column="base_output", output_column="base_reward")  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Sequence

from magpie_hf.engines import SamplingConfig
from magpie_hf.hardware import Hardware, Resources
from magpie_hf.seeds import check_samples_per_row
from magpie_hf.steps.base import FLOAT, STRING, Batch, Features, Step, batch_len
from magpie_hf.steps.judges import JudgeError, JudgeStep, quote_text
from magpie_hf.templates import render_chat

logger = logging.getLogger(__name__)

PAPER_REWARD_MODEL = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
ARMORM_REWARD_MODEL = "RLHFlow/ArmoRM-Llama3-8B-v0.1"

Conversation = Sequence[dict]


@dataclasses.dataclass(kw_only=False)
class RewardModelScorer:
    """Score conversations with a Hub sequence-classification reward model (one logit = reward).

    Works with FsfairX-LLaMA3-RM, Skywork/InternLM-style single-logit RMs and, with
    ``trust_remote_code=True``, ArmoRM (its ``score`` output is used). Batches are sorted by
    length and right-padded; results come back in input order.

    Example:
        >>> scorer = RewardModelScorer("sfairXC/FsfairX-LLaMA3-RM-v0.1", batch_size=8)  # doctest: +SKIP
        >>> scorer.load()  # doctest: +SKIP
        >>> scorer.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])  # doctest: +SKIP
    """

    model: str = PAPER_REWARD_MODEL
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = None
    batch_size: int = 8
    #: token limit; None = the smaller of the tokenizer's and the model's limits
    max_length: int | None = None
    trust_remote_code: bool = False
    #: template variables for the reward model's chat template
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self.stats: collections.Counter[str] = collections.Counter()

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kwargs["revision"] = self.revision
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or self.model, **kwargs)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"The reward model tokenizer {self.tokenizer or self.model!r} has no chat_template; "
                "pass `tokenizer=` a tokenizer that has the template the reward model was trained with."
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype: Any = self.dtype
        if dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model = AutoModelForSequenceClassification.from_pretrained(self.model, dtype=dtype, **kwargs).to(device).eval()
        self._model, self._tokenizer, self._device = model, tokenizer, device
        self._pad_id = self._agree_on_pad_id()
        self._limit = self._resolve_max_length()

    def close(self) -> None:
        self._model = None
        self._tokenizer = None

    @property
    def name(self) -> str:
        return self.model

    def _agree_on_pad_id(self) -> int:
        """The id padded rows are filled with: the one the model's pooling skips.

        transformers' sequence-classification heads pool the rightmost token that is not
        ``config.pad_token_id`` and ignore the attention mask (transformers 5.24
        ``modeling_layers.py:174-190``, ``GenericForSequenceClassification.forward``, which
        ``LlamaForSequenceClassification`` uses). Padding with the tokenizer's pad id when the config's
        differs makes a padded row pool a pad position, so a row's score would depend on its batch.
        Pad with the config's id; when it has none (or one outside the vocabulary), set it to the
        tokenizer's.
        """
        config = self._model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        pad_id = getattr(text_config, "pad_token_id", None)
        vocab = getattr(text_config, "vocab_size", None)
        if isinstance(pad_id, int) and 0 <= pad_id and (vocab is None or pad_id < vocab):
            return pad_id
        pad_id = int(self._tokenizer.pad_token_id)
        text_config.pad_token_id = pad_id
        if text_config is not config:
            config.pad_token_id = pad_id
        return pad_id

    def _resolve_max_length(self) -> int:
        if self.max_length:
            return int(self.max_length)
        limits = [getattr(self._model.config, "max_position_embeddings", None), self._tokenizer.model_max_length]
        usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
        return min(usable) if usable else 4096

    # -- work ----------------------------------------------------------------------------------
    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of one conversation in the RM's chat template, truncated to the limit."""
        tok = self._tokenizer
        text = render_chat(tok, conversation, add_generation_prompt=False, chat_template_kwargs=self.chat_template_kwargs)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self._limit:
            return ids
        self.stats["truncated"] += 1
        # keep the template's closing tokens after the last message; cut the end of that message
        last = conversation[-1].get("content") or ""
        cut = text.rfind(last) + len(last) if last and last in text else len(text)
        tail = tok(text[cut:], add_special_tokens=False)["input_ids"] if cut < len(text) else []
        if len(tail) >= self._limit:
            return ids[: self._limit]
        head = tok(text[:cut], add_special_tokens=False)["input_ids"]
        return head[: self._limit - len(tail)] + tail

    def score(
        self, conversations: Sequence[Conversation], *, progress: Callable[[int, int], None] | None = None
    ) -> list[float]:
        """One reward per conversation (a list of ``{role, content}``), in input order.

        ``progress(rows_done, tokens)`` is called after every forward batch (rows scored, their tokens).
        A row's score does not depend on the rows it is batched with (see :meth:`_agree_on_pad_id`).
        """
        import torch

        self.load()
        encoded = [self.encode(c) for c in conversations]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        rewards: list[float] = [0.0] * len(encoded)
        pad_id = self._pad_id
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[r, : len(encoded[i])] = 1
                out = self._model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device))
                values = _reward_values(out, mask)
                for r, i in enumerate(rows):
                    rewards[i] = float(values[r])
                if progress is not None:
                    progress(len(rows), sum(len(encoded[i]) for i in rows))
        return rewards


def _reward_values(output: Any, mask: Any) -> Any:
    """The scalar reward per row from a model output (ArmoRM ``score`` or the first logit)."""
    score = getattr(output, "score", None)  # ArmoRM (remote code) returns its preference score here
    if score is not None:
        return score.float().reshape(-1).cpu()
    logits = output.logits
    if logits.dim() == 3:  # some remote-code RMs return per-token logits: take the last real token
        last = mask.sum(dim=1) - 1
        logits = logits[range(logits.shape[0]), last.to(logits.device)]
    return logits[:, 0].float().cpu()


@dataclasses.dataclass(kw_only=True)
class RewardModel(Step):
    """Reward of each response under a sequence-classification reward model.

    Writes ``output_column`` (float or null) and ``model_column`` (the RM's name). Rows whose
    instruction or response is missing (None) get null, counted in ``stats["missing_input"]``.

    Example:
        >>> step = RewardModel()                                         # instruct_reward (paper)
        >>> base = RewardModel(response_column="base_output", output_column="base_reward")
    """

    model: str = PAPER_REWARD_MODEL
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_length: int | None = None
    trust_remote_code: bool = False
    instruction_column: str = "instruction"
    response_column: str = "response"
    output_column: str = "instruct_reward"
    model_column: str = "reward_model"
    #: rows per forward pass (``batch_size`` is rows per process() call)
    forward_batch_size: int = 8
    #: template variables for the reward model's chat template
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._scorer: RewardModelScorer | None = None

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.instruction_column, self.response_column)

    def output_features(self) -> Features:
        return {self.output_column: FLOAT, self.model_column: STRING}

    def resources(self, hardware: Hardware | None = None) -> Resources:
        """One GPU when the reward model will sit on CUDA (its ``device``, or CUDA where there is one)."""
        from magpie_hf.engines.loading import on_cuda

        return Resources(gpus=1 if on_cuda(self.device, hardware or Hardware.local()) else 0)

    def load(self) -> None:
        self._scorer = RewardModelScorer(
            self.model,
            tokenizer=self.tokenizer,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            batch_size=self.forward_batch_size,
            max_length=self.max_length,
            trust_remote_code=self.trust_remote_code,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        self._scorer.load()

    def unload(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
        self._scorer = None

    def process(self, batch: Batch, *, seed: int) -> Batch:
        if self._scorer is None:
            self.load()
        assert self._scorer is not None
        n = batch_len(batch)
        instructions, responses = batch[self.instruction_column], batch[self.response_column]
        todo = [i for i in range(n) if isinstance(instructions[i], str) and isinstance(responses[i], str)]
        self.stats["missing_input"] += n - len(todo)
        conversations = [
            [{"role": "user", "content": instructions[i]}, {"role": "assistant", "content": responses[i]}] for i in todo
        ]
        truncated_before = self._scorer.stats["truncated"]
        scores = self._scorer.score(conversations, progress=self.progress_callback) if conversations else []
        self.stats["truncated"] += self._scorer.stats["truncated"] - truncated_before
        rewards: list[float | None] = [None] * n
        for i, s in zip(todo, scores):
            rewards[i] = s
        return {**batch, self.output_column: rewards, self.model_column: [self._scorer.name] * n}


@dataclasses.dataclass(kw_only=True)
class JudgeReward(JudgeStep):
    """An instruct model rates each response from 1 (useless) to 10 (excellent) in JSON -> float.

    A real reward without a reward-model download (the CPU preset uses the embedded model). The
    scale is 1–10, not the RM's logit scale: use thresholds made for it. Columns:
    ``output_column`` (float or null), ``model_column`` (judge name), ``<output_column>_error``.

    With ``num_samples > 1`` the judge samples that many ratings at ``temperature`` and the reward
    is their mean (over the ones that parse). A small judge's greedy rating is nearly binary (the
    embedded 135M model answers 1 or 10); the mean separates responses it would rate the same.

    Example:
        >>> from magpie_hf.engines import EngineConfig
        >>> step = JudgeReward(engine=EngineConfig.embedded(), max_tokens=16, num_samples=5)  # doctest: +SKIP
    """

    response_column: str = "response"
    output_column: str = "instruct_reward"
    model_column: str = "reward_model"
    max_tokens: int = 16
    #: truncate very long responses in the judge prompt (characters)
    max_response_chars: int = 6000
    #: ratings sampled per response and averaged (1: one greedy rating)
    num_samples: int = 1
    #: sampling temperature of the ratings when ``num_samples > 1``
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        check_samples_per_row(self.num_samples)
        SamplingConfig(temperature=self.temperature)  # a temperature no backend takes fails here, not at load

    def sampling(self) -> SamplingConfig:
        greedy = super().sampling()
        if self.num_samples == 1:
            return greedy
        return greedy.replace(temperature=self.temperature, n=self.num_samples)

    def combine(self, parsed: list[dict[str, Any]]) -> dict[str, Any]:
        return {self.output_column: sum(p[self.output_column] for p in parsed) / len(parsed)}

    # columns depend on the configurable names
    @property
    def value_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.output_column,)

    @property
    def generator_column(self) -> str:  # type: ignore[override]
        return self.model_column

    @property
    def error_column(self) -> str:  # type: ignore[override]
        return f"{self.output_column}_error"

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.input_column, self.response_column)

    def output_features(self) -> Features:
        return {**super().output_features(), self.output_column: FLOAT}

    def judged_items(self, batch: Batch) -> list[Any]:
        pairs = zip(batch[self.input_column], batch[self.response_column])
        return [(q, r) if isinstance(q, str) and q.strip() and isinstance(r, str) else None for q, r in pairs]

    def prompt(self, item: tuple[str, str]) -> str:
        instruction, response = item
        if len(response) > self.max_response_chars:
            response = response[: self.max_response_chars] + " [...]"
        return (
            "# Task\nRate how well the assistant's response answers the user's query: is it helpful, "
            "correct, relevant, complete and clearly written? Use a whole number from 1 (useless or "
            "harmful) to 10 (excellent, nothing to improve).\n\n"
            f"## User query\n```\n{quote_text(instruction)}\n```\n\n"
            f"## Assistant response\n```\n{quote_text(response)}\n```\n\n"
            '## Answer format\nReply with JSON only: {"rating": <1-10>}'
        )

    def schema(self) -> dict:
        return {
            "type": "object",
            "properties": {"rating": {"type": "integer", "enum": list(range(1, 11))}},
            "required": ["rating"],
        }

    def parse(self, answer: dict) -> dict[str, Any]:
        value = answer.get("rating")
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise JudgeError(f"rating {value!r} is not a whole number")
        if not 1 <= value <= 10:
            self.stats["out_of_set"] += 1
            raise JudgeError(f"rating {value!r} is outside 1-10")
        return {self.output_column: float(value)}
