"""Chat-template arithmetic for Magpie: pre-query templates, stop strings and prompts, derived from the tokenizer.

Magpie prompts an aligned model with only the *pre-query template* of its chat format (everything up to
where the user's words start) and lets it write the user's query. Instead of a hand-kept table of
templates, everything here is derived from the tokenizer's own ``chat_template``: render a conversation
whose last user message is a sentinel string and cut at the sentinel.

- ``pre_query``: render ``[user: SENTINEL]`` and keep what comes before the sentinel (plus BOS text when
  the tokenizer, not the template, adds the BOS: engines tokenize with ``add_special_tokens=False``).
- ``query_prompt(history)``: the same cut after a history, for multi-turn generation.
- ``stop_strings``: what always follows a turn. For the user turn that is the common start of the text after
  the sentinel in the generation-prompt rendering and in a rendering that has an assistant reply: its end
  marker (``<|eot_id|>``, ``<|im_end|>``, ``[/INST]``) or, where a user turn has no closing marker, the role
  token that opens the assistant turn (DeepSeek's ``<｜Assistant｜>``, GLM's ``<|assistant|>``, Alpaca's
  ``### Response:``). So a thinking tag that the generation prompt opens (``<｜Assistant｜><think>``) never
  becomes part of a stop. For the assistant turn: its closing marker, or else the role token of the next
  user turn (GLM's ``<|user|>``).
- ``response_prompt(messages)``: ``apply_chat_template(..., add_generation_prompt=True)`` with BOS once.
- ``reasoning``: the thinking-block tags (``<think>``/``</think>``) when the template uses them, and whether
  the generation prompt leaves a block open (DeepSeek-R1: the reply starts inside the reasoning).
- ``chat_template_kwargs`` (``{"enable_thinking": False}``): extra template variables passed to every
  rendering (pre-query, follow-up queries, responses, judges) and recorded with the rest.
- ``keep_default_system_prompt=False``: the block a template writes before the first user turn on its
  own (Llama-3.1's dated block, Qwen2's "You are a helpful assistant.") is found by comparing the
  rendering of the first user turn with that of a later user turn, and removed.

Example:
    >>> from transformers import AutoTokenizer
    >>> from magpie_hf.templates import derive_templates
    >>> tok = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct")  # doctest: +SKIP
    >>> t = derive_templates(tok, keep_default_system_prompt=False)  # doctest: +SKIP
    >>> t.pre_query, t.stop_strings  # doctest: +SKIP
    ('<|im_start|>user\\n', ['<|im_end|>'])
    >>> t.query_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])  # doctest: +SKIP
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n<|im_start|>user\\n'
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

from magpie_hf.errors import ChatTemplateError

logger = logging.getLogger(__name__)

#: message contents that no template rewrites (no whitespace to trim, no markup) and no text contains
USER_SENTINEL = "MagpieUserSentinel7Q3"
SECOND_USER_SENTINEL = "MagpieUserSentinel9K5"
ASSISTANT_SENTINEL = "MagpieAssistantSentinel4W8"
SYSTEM_SENTINEL = "MagpieSystemSentinel2H6"

#: Thinking-block tags of today's reasoning models (DeepSeek-R1 and V3.1, Qwen3, QwQ, GLM-4.5+, SmolLM3). A
#: template uses a pair when its source holds both tags; :class:`ReasoningMarkers` records it.
REASONING_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)

Message = dict[str, str]


_WAY_OUT = (
    "Way out: pass the raw pre-query text yourself: derive_templates(tokenizer, pre_query_template=..., "
    "stop_strings=[...]) (CLI/recipes: --pre-query-template), e.g. "
    "pre_query_template='<|im_start|>user\\n', stop_strings=['<|im_end|>'] for ChatML."
)


@dataclasses.dataclass(frozen=True)
class PreQueryOverride:
    """A correction applied to a derived user-turn prompt where the derived form is known to be worse.

    ``pattern`` is searched at the end of every user-turn prompt (``pre_query`` and ``query_prompt``);
    a match is replaced by ``replacement``.
    """

    name: str
    pattern: str
    replacement: str
    reason: str

    def apply(self, text: str) -> str | None:
        new, count = re.subn(self.pattern, self.replacement, text, count=1)
        return new if count else None


#: Keep this table small: every entry must say why the derived form is worse.
PRE_QUERY_OVERRIDES: tuple[PreQueryOverride, ...] = (
    PreQueryOverride(
        name="inst-trailing-space",
        pattern=r"\[INST\] $",
        replacement="[INST]",
        reason=(
            "Llama-2 and Mistral templates write '[INST] ' + content. Cut at the sentinel, the prompt ends "
            "in a space that SentencePiece tokenizers encode as a lone '▁' token; in training the model only "
            "ever saw '[INST]' followed by a word token that carries its own space ('▁What'), so a prompt "
            "ending in '▁' yields glued or odd first words. Ending the prompt at '[INST]' lets the model "
            "write '▁What' itself; clean() strips the leading space."
        ),
    ),
)

_DEFAULT = object()  # "use the object's system prompt"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` exactly as engines see prompts: without adding special tokens.

    Example:
        >>> encode(tok, "<|im_start|>user\\n")  # doctest: +SKIP
        [1, 4093, 198]
    """
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` (with special tokens) puts a BOS token in front of the text."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not getattr(tokenizer, "bos_token", None):
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos_id and without[:1] != [bos_id]


def _added_tokens(tokenizer: Any) -> list[str]:
    """Added/special token strings, longest first (so '<|im_end|>' wins over a shorter prefix)."""
    tokens: set[str] = set()
    try:
        tokens.update(tokenizer.get_added_vocab())
    except Exception:  # slow or exotic tokenizers
        pass
    tokens.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _first_special(text: str, special_tokens: Sequence[str]) -> tuple[int, str] | None:
    """``(position, token)`` of the first special token in ``text`` (the longest one at that position)."""
    best: tuple[int, str] | None = None
    for token in special_tokens:  # longest first, so a tie keeps the longest
        at = text.find(token)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, token)
    return best


def _end_markers(tail: str, special_tokens: Sequence[str], *, tags: Sequence[str] = ()) -> list[str]:
    """The end-of-turn markers at the start of ``tail`` (the text that follows a message's content).

    The marker is the special token the tail starts with (``<|eot_id|>``, ``<|im_end|>``, ``<｜Assistant｜>``);
    else the plain text up to the end of the line or the first special token (``[/INST]``, ``### Response:``),
    plus that special token when it follows on the same line (GLM without thinking: ``/nothink<|assistant|>``).
    Reasoning ``tags`` are never part of a marker: ``<｜Assistant｜></think>`` gives ``<｜Assistant｜>``.
    Empty when the tail is only whitespace.

    Example:
        >>> _end_markers("<|im_end|>\\n<|im_start|>assistant\\n", ["<|im_end|>", "<|im_start|>"])
        ['<|im_end|>']
        >>> _end_markers(" [/INST]", [])
        ['[/INST]']
        >>> _end_markers("<｜Assistant｜></think>", [], tags=["<think>", "</think>"])
        ['<｜Assistant｜>']
    """
    text = tail.lstrip()
    if not text:
        return []
    hit = _first_special(text, special_tokens)
    if hit is not None and hit[0] == 0 and hit[1] not in tags:
        return [hit[1]]
    plain = (text[: hit[0]] if hit is not None else text).split("\n", 1)[0]
    for tag in tags:
        plain = plain.split(tag, 1)[0]
        # a common prefix may end inside a tag (<｜Assistant｜><think> vs <｜Assistant｜></think>: '<｜Assistant｜><')
        plain = next((plain[:-k] for k in range(len(tag) - 1, 0, -1) if plain.endswith(tag[:k])), plain)
    markers = [plain.rstrip()] if plain.strip() else []
    if hit is not None and hit[1] not in tags and "\n" not in text[: hit[0]] and plain == text[: hit[0]]:
        markers.append(hit[1])
    return markers


def _split_at(text: str, sentinel: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ChatTemplateError(
            f"The chat template did not render the message content verbatim (found the sentinel "
            f"{text.count(sentinel)} times in {text!r}). {_WAY_OUT}"
        )
    before, after = text.split(sentinel)
    return before, after


def _dedupe(items: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(x for x in items if x is not None and x != ""))


def check_chat_template_kwargs(tokenizer: Any, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` as a plain dict after checking it can be passed to every rendering and recorded.

    Keys are template variables (``enable_thinking``, ``thinking``, ``reasoning_effort``); they may not
    name an argument of ``apply_chat_template`` itself, and values must be JSON (they go into the dataset's
    provenance).

    Example:
        >>> check_chat_template_kwargs(tok, {"enable_thinking": False})  # doctest: +SKIP
        {'enable_thinking': False}
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k for k in kwargs):
        raise ChatTemplateError(
            f"chat_template_kwargs must be a mapping of template variable names to values, such as "
            f'{{"enable_thinking": false}}; got {kwargs!r}.'
        )
    apply = getattr(tokenizer, "apply_chat_template", None)
    reserved = {"messages", "conversation"}
    if apply is not None:
        reserved |= {n for n in inspect.signature(apply).parameters if n not in ("self", "kwargs")}
    clash = sorted(set(kwargs) & reserved)
    if clash:
        raise ChatTemplateError(
            f"chat_template_kwargs may not set {clash}: apply_chat_template takes those itself. Pass only the "
            f"template's own variables (for example enable_thinking)."
        )
    try:
        json.dumps(dict(kwargs), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ChatTemplateError(
            f"chat_template_kwargs values must be JSON (strings, numbers, booleans, lists, objects) because they "
            f"are recorded in the provenance: {err}"
        ) from None
    return dict(kwargs)


def _render(
    tokenizer: Any,
    messages: list[Message],
    *,
    add_generation_prompt: bool,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    way_out: str = _WAY_OUT,
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so the "
            f"Magpie pre-query template cannot be derived. {way_out}"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
        )
    except ChatTemplateError:
        raise
    except Exception as err:  # jinja2 TemplateError from raise_exception(), missing roles, ...
        roles = [m.get("role") for m in messages]
        hint = ""
        if roles and roles[0] == "system":
            hint = " This template does not accept a system message: drop the system prompt (system_prompt=None)."
        raise ChatTemplateError(
            f"The chat template of {getattr(tokenizer, 'name_or_path', '')!r} failed on a conversation "
            f"with roles {roles}: {err}.{hint} {way_out}"
        ) from err


def render_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Render ``messages`` with the tokenizer's own chat template, BOS exactly once.

    The one renderer of the steps that prompt a chat model with a full conversation (judges, the safety
    guard, the reward model): engines tokenize prompts without special tokens, so when the tokenizer would
    add a BOS and the template does not write it, it is prepended here. ``chat_template_kwargs`` are the
    template's own variables (``{"enable_thinking": False}``).

    Example:
        >>> render_chat(tok, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    kwargs = check_chat_template_kwargs(tokenizer, chat_template_kwargs)
    way_out = "Use a chat/instruct model for this step, or set tokenizer.chat_template."
    text = _render(
        tokenizer, list(messages), add_generation_prompt=add_generation_prompt, chat_template_kwargs=kwargs,
        way_out=way_out,
    )
    bos = getattr(tokenizer, "bos_token", None)
    if bos and not text.startswith(bos) and tokenizer_adds_bos(tokenizer):
        text = bos + text
    return text


@dataclasses.dataclass(frozen=True)
class ReasoningMarkers:
    """The thinking-block tags a chat template uses, so a later step can split reasoning from the answer.

    ``opened_by_generation_prompt`` is True when the generation prompt leaves a block open (DeepSeek-R1 ends
    it with ``<think>\\n``): the model's reply then starts inside the reasoning and holds ``close`` before the
    answer. With ``{"enable_thinking": False}`` Qwen3 writes an empty block instead, and this is False.
    """

    open: str
    close: str
    opened_by_generation_prompt: bool

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _reasoning_markers(template_text: str | None, generation_tail: str) -> ReasoningMarkers | None:
    for open_tag, close_tag in REASONING_TAGS:
        if template_text and open_tag in template_text and close_tag in template_text:
            opened = generation_tail.rfind(open_tag) > generation_tail.rfind(close_tag)
            return ReasoningMarkers(open_tag, close_tag, opened)
    return None


@dataclasses.dataclass
class ChatTemplates:
    """The pieces of a chat format Magpie needs, derived once from a tokenizer (see :func:`derive_templates`).

    Attributes:
        pre_query: the raw text up to where the user's words start (BOS included when the model needs one).
        stop_strings: end-of-turn markers that end a generated user query or response.
        stop_token_ids: ids of the stop strings that are single (special) tokens, plus the eos id.
        system_prompt: the system prompt in ``pre_query`` and, by default, in every prompt built here.
        keep_default_system_prompt: whether a system block the template injects by itself is kept.
        default_system_block: that injected block as text ('' when the template injects none).
        chat_template_kwargs: extra template variables passed to every rendering (``enable_thinking``).
        reasoning: the template's thinking-block tags, or None (see :class:`ReasoningMarkers`).
    """

    pre_query: str
    stop_strings: list[str]
    stop_token_ids: list[int]
    system_prompt: str | None = None
    keep_default_system_prompt: bool = True
    default_system_block: str = ""
    source: str = "derived"  # "derived" from the chat template, or "explicit" pre_query_template
    overrides: list[str] = dataclasses.field(default_factory=list)
    bos_token: str | None = None
    add_bos_text: bool = False  # BOS text is prefixed because the tokenizer (not the template) adds it
    tokenizer_name: str | None = None
    chat_template_sha256: str | None = None
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    reasoning: ReasoningMarkers | None = None
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)
    lead_text: str = dataclasses.field(default="", repr=False)  # text before the injected block (usually BOS)

    # ---------------------------------------------------------------- prompts
    def query_prompt(self, history: Sequence[Message] = (), system_prompt: Any = _DEFAULT) -> str:
        """Prompt text for the next USER turn after ``history`` (a list of ``{role, content}``).

        It is the template's own rendering of ``history + [user: SENTINEL]`` cut at the sentinel, so
        templates that render the last message differently or write BOS per turn come out right.
        With no history and the object's system prompt it equals ``pre_query``.
        """
        system = self.system_prompt if system_prompt is _DEFAULT else system_prompt
        history = list(history)
        if self.source == "explicit" and not history and system == self.system_prompt:
            return self.pre_query
        return self._user_turn_prompt(history, system)[0]

    def response_prompt(self, messages: Sequence[Message], system_prompt: Any = _DEFAULT) -> str:
        """Prompt text for the assistant's reply to ``messages`` (``add_generation_prompt=True``), BOS once."""
        system = self.system_prompt if system_prompt is _DEFAULT else system_prompt
        full = self._with_system(list(messages), system)
        return self._finish(self._render(full, add_generation_prompt=True), full)

    def clean(self, text: str) -> str:
        """Cut ``text`` at the first stop string, drop trailing special tokens and surrounding whitespace."""
        stops = _dedupe([*self.stop_strings, self.eos_token])
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        specials = _added_tokens(self.tokenizer) if self.tokenizer is not None else []
        previous = None
        while previous != text:
            previous = text
            text = text.strip()
            for token in specials:
                if text.endswith(token):
                    text = text[: -len(token)]
                if text.startswith(token) and token in (self.bos_token, self.eos_token):
                    text = text[len(token) :]
        return text

    @property
    def eos_token(self) -> str | None:
        return getattr(self.tokenizer, "eos_token", None) if self.tokenizer is not None else None

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description for provenance (dataset cards, ``gen_input_configs``)."""
        return {
            "pre_query": self.pre_query,
            "stop_strings": list(self.stop_strings),
            "stop_token_ids": [int(i) for i in self.stop_token_ids],
            "system_prompt": self.system_prompt,
            "keep_default_system_prompt": self.keep_default_system_prompt,
            "default_system_block": self.default_system_block,
            "source": self.source,
            "overrides": list(self.overrides),
            "bos_token": self.bos_token,
            "add_bos_text": self.add_bos_text,
            "tokenizer": self.tokenizer_name,
            "chat_template_sha256": self.chat_template_sha256,
            "chat_template_kwargs": dict(self.chat_template_kwargs),
            "reasoning": self.reasoning.to_record() if self.reasoning is not None else None,
        }

    # ---------------------------------------------------------------- internals
    def _user_turn_prompt(self, history: list[Message], system: str | None) -> tuple[str, list[str]]:
        """Render ``history + [user: SENTINEL]``, cut at the sentinel; returns (text, overrides applied)."""
        messages = self._with_system(history, system) + [{"role": "user", "content": USER_SENTINEL}]
        before, _ = _split_at(self._render(messages, add_generation_prompt=False), USER_SENTINEL)
        before = self._finish(before, messages)
        applied = []
        if self.source == "derived":
            for override in PRE_QUERY_OVERRIDES:
                fixed = override.apply(before)
                if fixed is not None:
                    before, applied = fixed, [*applied, override.name]
        return before, applied

    def _render(self, messages: list[Message], *, add_generation_prompt: bool) -> str:
        return _render(
            self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    @staticmethod
    def _with_system(messages: list[Message], system: str | None) -> list[Message]:
        if system is not None and not (messages and messages[0].get("role") == "system"):
            return [{"role": "system", "content": system}, *messages]
        return messages

    def _finish(self, text: str, messages: Sequence[Message]) -> str:
        """Remove the injected default system block if asked, and make sure BOS text is there once."""
        has_system = bool(messages) and messages[0].get("role") == "system"
        if not self.keep_default_system_prompt and self.default_system_block and not has_system:
            head = self.lead_text + self.default_system_block
            if not text.startswith(head):
                raise ChatTemplateError(
                    f"Cannot remove the template's default system block {self.default_system_block!r}: the "
                    f"rendering {text[:200]!r} does not start with it. Use keep_default_system_prompt=True "
                    f"or an explicit system prompt."
                )
            text = self.lead_text + text[len(head) :]
        if self.add_bos_text and self.bos_token and not text.startswith(self.bos_token):
            text = self.bos_token + text
        return text


def _default_system_block(
    tokenizer: Any,
    first_turn_prefix: str,
    between_turns: str | None,
    assistant_closing: str | None,
    kwargs: Mapping[str, Any],
) -> tuple[str, str] | None:
    """Split the text before the first user turn into ``(lead, injected_block)``; None when it cannot.

    The user-turn header is what precedes a *later* user message once the previous assistant turn's closing
    marker is removed (``between_turns``, from the ``[u, a, u]`` rendering). What precedes the *first* user
    header is either a fixed prefix, when a conversation that has a system message starts with it too (GLM's
    ``[gMASK]<sop>``, a BOS): nothing to remove; or, besides a leading BOS, a block the template injected by
    itself (Llama-3.1's dated system block, Qwen2's default system prompt). Templates that reject system
    messages (Gemma-2) are fine: the rejection is caught.
    """
    if between_turns is None:
        return None
    between = between_turns.lstrip()
    if assistant_closing and between.startswith(assistant_closing):
        between = between[len(assistant_closing) :].lstrip()
    user_header = between
    if not user_header or not first_turn_prefix.endswith(user_header):
        logger.debug("could not find the user header %r at the end of %r", user_header, first_turn_prefix)
        return None
    prefix = first_turn_prefix[: len(first_turn_prefix) - len(user_header)]
    try:
        with_system = _render(
            tokenizer,
            [{"role": "system", "content": SYSTEM_SENTINEL}, {"role": "user", "content": USER_SENTINEL}],
            add_generation_prompt=False,
            chat_template_kwargs=kwargs,
        )
    except ChatTemplateError as err:
        logger.debug("the template rejects a system message: %s", err)
    else:
        if SYSTEM_SENTINEL in with_system and with_system.startswith(prefix):
            return "", ""  # written whatever the system message: a fixed prefix ([gMASK]<sop>, BOS)
    bos = getattr(tokenizer, "bos_token", None)
    # BOS is a lead unless it is the turn-start token itself (SmolLM2's bos is '<|im_start|>')
    lead = bos if bos and prefix.startswith(bos) and not user_header.startswith(bos) else ""
    return lead, prefix[len(lead) :]


def derive_templates(
    tokenizer: Any,
    system_prompt: str | None = None,
    keep_default_system_prompt: bool = True,
    pre_query_template: str | None = None,
    stop_strings: Sequence[str] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> ChatTemplates:
    """Derive the Magpie pieces of ``tokenizer``'s chat format.

    Args:
        tokenizer: a ``transformers`` tokenizer with a ``chat_template``.
        system_prompt: a system message put before the user turn (and into every prompt built here).
        keep_default_system_prompt: with ``False`` and no ``system_prompt``, drop the system block the
            template writes by itself (Llama-3.1, Qwen2/2.5, SmolLM2); a no-op for templates without one.
        pre_query_template: an explicit raw pre-query text; it always wins and is used verbatim. Its stop
            strings are then the tokenizer's eos plus ``stop_strings``.
        stop_strings: extra stop strings, added to the derived (or eos) ones.
        chat_template_kwargs: template variables passed to every rendering, e.g. ``{"enable_thinking": False}``
            for Qwen3 (its generation prompt then holds an empty think block), ``{"thinking": True}`` for
            DeepSeek-V3.1. The stops and the pre-query are derived under them too.

    Raises:
        ChatTemplateError: no chat template, a template that rejects the system prompt, a template that
            does not render content verbatim, or unusable ``chat_template_kwargs``; the message names the
            way out (``pre_query_template=`` for the template problems).

    Example:
        >>> t = derive_templates(tok)  # doctest: +SKIP
        >>> t.pre_query  # doctest: +SKIP
        '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n'
        >>> r1 = derive_templates(deepseek_r1_tokenizer)  # doctest: +SKIP
        >>> r1.pre_query, r1.stop_strings, r1.reasoning.opened_by_generation_prompt  # doctest: +SKIP
        ('<｜begin▁of▁sentence｜><｜User｜>', ['<｜Assistant｜>', '<｜end▁of▁sentence｜>'], True)
    """
    extra_stops = list(stop_strings or [])
    kwargs = check_chat_template_kwargs(tokenizer, chat_template_kwargs)
    chat_template = getattr(tokenizer, "chat_template", None)
    template_text = chat_template if isinstance(chat_template, str) else repr(chat_template) if chat_template else None
    common: dict[str, Any] = dict(
        system_prompt=system_prompt,
        keep_default_system_prompt=keep_default_system_prompt,
        bos_token=getattr(tokenizer, "bos_token", None),
        tokenizer_name=getattr(tokenizer, "name_or_path", None) or None,
        chat_template_sha256=hashlib.sha256(template_text.encode()).hexdigest() if template_text else None,
        chat_template_kwargs=kwargs,
        tokenizer=tokenizer,
    )
    specials = _added_tokens(tokenizer)
    if pre_query_template is not None:
        stops = _dedupe([getattr(tokenizer, "eos_token", None), *extra_stops])
        return ChatTemplates(
            pre_query=pre_query_template,
            stop_strings=stops,
            stop_token_ids=_stop_token_ids(tokenizer, stops, specials),
            source="explicit",
            reasoning=_explicit_reasoning(tokenizer, template_text, kwargs),
            **common,
        )

    turns = _TurnTexts.render(tokenizer, kwargs)
    reasoning = _reasoning_markers(template_text, turns.generation_tail)
    stops, assistant_closing = _derive_stops(turns, specials, extra_stops, getattr(tokenizer, "eos_token", None))
    lead, block = _derive_system_block(
        tokenizer, turns, assistant_closing, kwargs, system_prompt, keep_default_system_prompt
    )
    templates = ChatTemplates(
        pre_query="",
        stop_strings=stops,
        stop_token_ids=_stop_token_ids(tokenizer, stops, specials),
        default_system_block=block,
        source="derived",
        add_bos_text=tokenizer_adds_bos(tokenizer),
        lead_text=lead,
        reasoning=reasoning,
        **common,
    )
    # the pre-query is the first user turn of an empty history: one code path for single and multi-turn
    templates.pre_query, templates.overrides = templates._user_turn_prompt([], system_prompt)
    return templates


def _explicit_reasoning(
    tokenizer: Any, template_text: str | None, kwargs: Mapping[str, Any]
) -> ReasoningMarkers | None:
    """The reasoning markers of a template used with an explicit pre-query (None when it cannot render)."""
    if not template_text:
        return None
    try:
        rendered = _render(tokenizer, [{"role": "user", "content": USER_SENTINEL}], add_generation_prompt=True,
                           chat_template_kwargs=kwargs)
        generation = rendered.split(USER_SENTINEL)[-1]
        return _reasoning_markers(template_text, generation)
    except ChatTemplateError as err:
        logger.debug("no generation prompt rendering: %s", err)
        return None


@dataclasses.dataclass(frozen=True)
class _TurnTexts:
    """What the template writes around sentinel messages (the pieces stops and system block come from)."""

    before: str  # text before the first user message (BOS, default system block, user header)
    closed_tail: str  # after a lone user message, no generation prompt
    generation_tail: str  # after a lone user message, with the generation prompt
    answered_tail: str  # after the user message of a [user, assistant] rendering
    assistant_tail: str  # after the assistant message of a [user, assistant] rendering ("" when it fails)
    between: str | None  # between the assistant message and a second user message (None when it fails)

    @classmethod
    def render(cls, tokenizer: Any, kwargs: Mapping[str, Any]) -> _TurnTexts:
        def render(messages: list[Message], generation_prompt: bool = False) -> str:
            return _render(tokenizer, messages, add_generation_prompt=generation_prompt, chat_template_kwargs=kwargs)

        user = {"role": "user", "content": USER_SENTINEL}
        assistant = {"role": "assistant", "content": ASSISTANT_SENTINEL}
        before, closed_tail = _split_at(render([user]), USER_SENTINEL)
        _, generation_tail = _split_at(render([user], True), USER_SENTINEL)
        try:
            reply = render([user, assistant])
            _, answered_tail = _split_at(reply, USER_SENTINEL)
            _, assistant_tail = _split_at(reply, ASSISTANT_SENTINEL)
        except ChatTemplateError as err:  # a template that wants more than one turn, or rejects assistant turns
            logger.debug("assistant turn rendering failed: %s", err)
            answered_tail, assistant_tail = generation_tail, ""
        try:
            third = render([user, assistant, {"role": "user", "content": SECOND_USER_SENTINEL}])
            between: str | None = third.split(ASSISTANT_SENTINEL, 1)[1].split(SECOND_USER_SENTINEL, 1)[0]
        except (ChatTemplateError, IndexError) as err:
            logger.debug("multi-turn rendering failed: %s", err)
            between = None
        return cls(before, closed_tail, generation_tail, answered_tail, assistant_tail, between)


def _derive_stops(
    turns: _TurnTexts, specials: Sequence[str], extra_stops: Sequence[str], eos_token: str | None
) -> tuple[list[str], list[str]]:
    """The stop strings (end of a user turn, end of an assistant turn, ``extra_stops``; eos when none is
    found) and the assistant turn's closing markers."""
    tags = [tag for pair in REASONING_TAGS for tag in pair]
    # what ALWAYS follows a user turn: the common start of the generation prompt and of an answered turn
    # (<｜Assistant｜><think>\n vs <｜Assistant｜>reply: <｜Assistant｜>), so no thinking tag leaks into the stop
    always_after_user = os.path.commonprefix([turns.generation_tail, turns.answered_tail])
    user_stops = (
        _end_markers(always_after_user, specials, tags=tags)
        or _end_markers(turns.closed_tail, specials, tags=tags)
        or _end_markers(turns.generation_tail, specials, tags=tags)
    )
    # an assistant turn ends with its closing marker, or (GLM: no closing marker) where the next user turn opens
    assistant_closing = _end_markers(turns.assistant_tail, specials, tags=tags)
    assistant_stops = assistant_closing or _end_markers(turns.between or "", specials, tags=tags)
    stops = _dedupe([*user_stops, *assistant_stops, *extra_stops])
    if not stops and eos_token:
        stops = [eos_token]
    return stops, assistant_closing


def _derive_system_block(
    tokenizer: Any,
    turns: _TurnTexts,
    assistant_closing: Sequence[str],
    kwargs: Mapping[str, Any],
    system_prompt: str | None,
    keep_default_system_prompt: bool,
) -> tuple[str, str]:
    """``(lead, default_system_block)`` of the text before the first user turn; ``("", "")`` when the
    user-turn header cannot be located (the whole prefix then stays in the pre-query)."""
    split = _default_system_block(
        tokenizer, turns.before, turns.between, assistant_closing[0] if assistant_closing else None, kwargs
    )
    if split is None and not keep_default_system_prompt and system_prompt is None:
        logger.warning(
            "Could not locate the user-turn header in this chat template, so a default system block (if any) "
            "is kept in %r. Pass system_prompt= or pre_query_template= to control it.",
            turns.before,
        )
    return split or ("", "")

def _stop_token_ids(tokenizer: Any, stops: Sequence[str], specials: Sequence[str]) -> list[int]:
    ids: list[Any] = []
    special_set = set(specials)
    for stop in stops:
        if stop in special_set:
            token_ids = encode(tokenizer, stop)
            if len(token_ids) == 1:
                ids.append(token_ids[0])
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return [int(i) for i in _dedupe(ids)]
