"""Constrained decoding for the transformers engine: JSON schemas and regular expressions (llguidance).

vLLM maps ``SamplingConfig.json_schema`` and ``SamplingConfig.regex`` to its own structured outputs,
with the same grammar settings (:data:`JSON_GRAMMAR`: vLLM's ``guidance`` backend, which is llguidance too).
For the transformers backend this module compiles the same constraints with
`llguidance <https://github.com/guidance-ai/llguidance>`_ (a 3 MB wheel with no dependencies), so both
backends accept the same schemas and patterns and write the same JSON: :class:`GrammarConstraint` masks,
at every step and for every row, the tokens that would break the constraint, and
:class:`GrammarLogitsProcessor` does it inside ``model.generate``. For OpenAI-compatible servers that read
a GBNF grammar instead of a regex (llama.cpp's ``grammar`` field), :func:`regex_to_gbnf` writes the same
pattern as GBNF.

Example:
    >>> from magpie_hf.engines.constrained import json_schema_logits_processor
    >>> schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}
    >>> processor = json_schema_logits_processor(tokenizer, schema, vocab_size=model.config.vocab_size)  # doctest: +SKIP
    >>> model.generate(**enc, logits_processor=[processor], max_new_tokens=32)  # doctest: +SKIP
    >>> print(regex_to_gbnf("safe|unsafe\\nS(1|2)"))
    root ::= ("safe" | "unsafe\\nS" ([12]))

A processor holds per-row grammar state: build a new one for every ``generate`` call (it is cheap:
the tokenizer vocabulary and compiled grammars are cached).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from transformers import LogitsProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "JSON_GRAMMAR",
    "GrammarConstraint",
    "GrammarLogitsProcessor",
    "GrammarRowState",
    "JSONGrammarSettings",
    "JSONRowState",
    "JSONSchemaConstraint",
    "JSONSchemaLogitsProcessor",
    "constrained_decoding_available",
    "json_schema_logits_processor",
    "regex_to_gbnf",
]

_INSTALL_HINT = (
    "Constrained decoding (JSON schemas, regular expressions) with the transformers backend needs llguidance, "
    "a requirement of magpie-hf: reinstall the package (`pip install -e .`) or run `pip install llguidance`."
)


@dataclass(frozen=True)
class JSONGrammarSettings:
    """How a JSON schema becomes a grammar, the same on every backend that constrains decoding.

    Compact JSON, no free whitespace: with free whitespace a model (small ones especially) can pad
    an answer with spaces and newlines up to ``max_tokens`` and end unparseable. No property the schema
    does not list (``additionalProperties: false`` where a schema says nothing). Both engines compile
    with llguidance: the transformers engine with :meth:`llguidance_options` and :meth:`json_schema`, the
    vLLM engine through ``LLM(structured_outputs_config=...)`` = :meth:`vllm_structured_outputs_config`:
    vLLM reads these settings only from its engine-level config (``StructuredOutputsParams.
    disable_any_whitespace`` of a request is not read), and its ``guidance`` backend compiles with
    ``whitespace_flexible = not disable_any_whitespace`` and llguidance's default separators ``,`` and ``:``
    (vllm 0.32 and 0.34 ``v1/structured_output/backend_guidance.py`` ``serialize_guidance_grammar``),
    adding ``additionalProperties: false`` with ``disable_additional_properties``
    (``process_for_additional_properties``), which is what this module does for the transformers engine.

    Example:
        >>> JSON_GRAMMAR.llguidance_options()
        {'whitespace_flexible': False}
        >>> JSON_GRAMMAR.vllm_structured_outputs_config()
        {'backend': 'guidance', 'disable_any_whitespace': True, 'disable_additional_properties': True}
        >>> JSON_GRAMMAR.json_schema({"type": "object", "properties": {"a": {"type": "string"}}})
        {'type': 'object', 'properties': {'a': {'type': 'string'}}, 'additionalProperties': False}
    """

    #: vLLM's ``StructuredOutputsConfig.backend`` (``guidance`` = llguidance, what the transformers engine uses)
    backend: str = "guidance"
    any_whitespace: bool = False
    #: item and key separators of compact JSON
    separators: tuple[str, str] = (",", ":")
    #: allow properties a schema does not list where it does not say (JSON Schema's default); off: strict
    additional_properties: bool = False

    def llguidance_options(self) -> dict[str, Any]:
        """llguidance's JSON compile options (``LLMatcher.grammar_from_json_schema(defaults=...)``): separators
        only where they differ from llguidance's own ``,`` and ``:``, so that the grammar is the very one vLLM's
        guidance backend builds (it passes ``whitespace_flexible`` alone)."""
        options: dict[str, Any] = {"whitespace_flexible": self.any_whitespace}
        if self.separators != (",", ":"):
            options.update(item_separator=self.separators[0], key_separator=self.separators[1])
        return options

    def json_schema(self, schema: dict | str) -> dict:
        """``schema`` as compiled: with ``additionalProperties: false`` on every object that lists properties
        and does not say (unless :attr:`additional_properties`), as vLLM's ``disable_additional_properties``."""
        value = json.loads(schema) if isinstance(schema, str) else schema
        return value if self.additional_properties else _no_additional_properties(value)

    def vllm_structured_outputs_config(self) -> dict[str, Any]:
        """``vllm.LLM(structured_outputs_config=...)`` (fields of vLLM's ``StructuredOutputsConfig``,
        vllm 0.32/0.34 ``config/structured_outputs.py``)."""
        if self.backend != "guidance" or self.separators != (",", ":"):
            raise ValueError(
                "vLLM's guidance backend compiles JSON with llguidance's separators (',', ':') only, as the "
                f"transformers engine does; {self} cannot be given to vLLM."
            )
        return {
            "backend": self.backend,
            "disable_any_whitespace": not self.any_whitespace,
            "disable_additional_properties": not self.additional_properties,
        }

    def vllm_server_args(self) -> list[str]:
        """The flags that give vLLM's OpenAI-compatible server the same grammar: vLLM reads the whitespace
        setting from its engine config only (a request's ``disable_any_whitespace`` is not used), so a server
        started without them answers the judges' schemas with indented JSON, which takes several times the
        tokens and can overrun ``max_tokens``.

        Example:
            >>> JSON_GRAMMAR.vllm_server_args()
            ['--structured-outputs-config', '{"backend":"guidance","disable_any_whitespace":true,"disable_additional_properties":true}']
        """
        return ["--structured-outputs-config", json.dumps(self.vllm_structured_outputs_config(), separators=(",", ":"))]


def _no_additional_properties(schema: Any) -> Any:
    """A copy of ``schema`` with ``additionalProperties: false`` on every object that lists properties and
    says nothing about others (in subschemas too)."""
    if isinstance(schema, dict):
        out = {key: _no_additional_properties(value) for key, value in schema.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_no_additional_properties(value) for value in schema]
    return schema


#: the one JSON grammar setting both backends are built from
JSON_GRAMMAR = JSONGrammarSettings()


def constrained_decoding_available() -> bool:
    """Whether llguidance can be imported (so :func:`json_schema_logits_processor` works)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _import_llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from err
    return llguidance


# llguidance tokenizers and compiled grammars per tokenizer object (dropped with the tokenizer). Reading the
# vocabulary takes about a second (once per tokenizer), a grammar one to a few milliseconds; a processor is per call.
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Any:
    llg = _import_llguidance()
    cache = _CACHE.setdefault(tokenizer, {})
    key = (vocab_size, stop_token_ids)
    if key not in cache:
        try:
            cache[key] = llg.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids) or None
            )
        except ValueError as err:  # a slow (Python) tokenizer
            raise ValueError(
                f"Constrained decoding needs a fast (Rust) tokenizer, as vLLM's does; {type(tokenizer).__name__} "
                f"is not one ({err}). Load the model with its tokenizer.json, or run the step with constrained=False."
            ) from err
    return cache[key]


def _compiled(tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], kind: str, spec: str) -> Any:
    """A fresh-state llguidance ``LLMatcher`` of a JSON schema (``kind="json"``) or a regex (``kind="regex"``),
    to be copied for every row."""
    llg = _import_llguidance()
    ll_tokenizer = _ll_tokenizer(tokenizer, vocab_size, stop_token_ids)
    cache = _CACHE[tokenizer]
    key = (vocab_size, stop_token_ids, kind, spec)
    if key not in cache:
        if kind == "json":
            # compact JSON (no free whitespace): small models otherwise loop on spaces and newlines
            grammar = llg.LLMatcher.grammar_from_json_schema(
                JSON_GRAMMAR.json_schema(spec), defaults=JSON_GRAMMAR.llguidance_options()
            )
        else:
            # what vLLM's guidance backend does with StructuredOutputsParams.regex (serialize_guidance_grammar)
            grammar = llg.grammar_from("regex", spec)
        error = llg.LLMatcher.validate_grammar(grammar, ll_tokenizer)
        if error:
            raise ValueError(error)
        cache[key] = llg.LLMatcher(ll_tokenizer, grammar, log_level=0)
    return cache[key]


class GrammarRowState:
    """Grammar state of one generated row: feed it each sampled token with :meth:`accept`."""

    __slots__ = ("matcher", "done", "stop_token_ids")

    def __init__(self, matcher: Any, stop_token_ids: Sequence[int] = ()) -> None:
        self.matcher = matcher
        self.stop_token_ids = frozenset(stop_token_ids)
        #: the output is complete (stop token accepted) or the row left the grammar; no more masking
        self.done = False

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and ``done``) when the grammar cannot take it."""
        if self.done:
            return False
        token_id = int(token_id)
        ok = bool(self.matcher.consume_token(token_id))
        if not ok or token_id in self.stop_token_ids:
            self.done = True
        return ok


class GrammarConstraint:
    """A JSON schema or a regular expression compiled for one tokenizer; hands out per-row states and
    masks logits.

    For engines with their own decoding loop (rows joining and leaving the batch)::

        constraint = GrammarConstraint(tokenizer, regex="safe|unsafe", vocab_size=logits.shape[-1], stop_token_ids=eos_ids)
        row.grammar = constraint.new_row()                          # when a row is admitted
        scores = constraint.mask(scores, [r.grammar for r in active])  # before choosing tokens
        row.grammar.accept(token)                                   # after choosing, for every row

    The row may end (take a stop token) only where the JSON or the regex match is complete. Where the
    grammar forces the next characters, llguidance allows only the tokenizer's own split of them.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        json_schema: dict | str | None = None,
        regex: str | None = None,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        if (json_schema is None) == (regex is None):
            raise ValueError("GrammarConstraint takes exactly one of json_schema= or regex=.")
        self._llg = _import_llguidance()
        stops = tuple(sorted({int(t) for t in stop_token_ids}))
        if json_schema is not None:
            # key order is the order fields are written
            kind, spec, what = "json", json_schema if isinstance(json_schema, str) else json.dumps(json_schema), "JSON schema"
        else:
            kind, spec, what = "regex", str(regex), "regex"
        size = max(int(vocab_size or 0), len(tokenizer))  # as vLLM's guidance backend
        try:
            self._matcher = _compiled(tokenizer, size, stops, kind, spec)
        except ValueError as err:
            raise ValueError(f"Cannot compile {what} for constrained decoding: {err}") from err
        ll_tokenizer = _ll_tokenizer(tokenizer, size, stops)  # cached by _compiled
        self.vocab_size = ll_tokenizer.vocab_size
        self.stop_token_ids = tuple(stops) or (ll_tokenizer.eos_token,)
        self._bitmask: Any = None

    def new_row(self) -> GrammarRowState:
        return GrammarRowState(self._matcher.deep_copy(), self.stop_token_ids)

    def mask(self, scores: Any, rows: Sequence[GrammarRowState]) -> Any:
        """Set to -inf, in place, the logits each unfinished row may not take next; returns ``scores``."""
        import torch

        if len(rows) != scores.shape[0]:
            raise ValueError(f"mask() got {len(rows)} row states for {scores.shape[0]} rows of scores")
        active = [i for i, row in enumerate(rows) if not row.done]
        if not active:
            return scores
        if self._bitmask is None or self._bitmask.shape[0] < len(active):
            self._bitmask = torch.full((max(len(active), 8), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        bitmask = self._bitmask[: len(active)]
        self._llg.torch.fill_next_token_bitmask_par(
            _executor(), [(rows[i].matcher, slot) for slot, i in enumerate(active)], bitmask
        )
        allowed = _unpack_bitmask(bitmask, self.vocab_size).to(scores.device)
        width = scores.shape[-1]
        if allowed.shape[-1] < width:  # model vocab padded beyond the tokenizer: never allowed
            pad = torch.zeros(len(active), width - allowed.shape[-1], dtype=torch.bool, device=scores.device)
            allowed = torch.cat([allowed, pad], dim=-1)
        index = torch.tensor(active, device=scores.device)
        scores[index] = scores[index].masked_fill(~allowed[:, :width], float("-inf"))
        return scores


@functools.lru_cache(maxsize=1)
def _executor() -> Any:
    """llguidance's thread pool that computes the masks of a batch's rows in parallel."""
    return _import_llguidance().LLExecutor()


class JSONSchemaConstraint(GrammarConstraint):
    """:class:`GrammarConstraint` of a JSON schema (the schema positional)."""

    def __init__(
        self, tokenizer: Any, schema: dict | str, *, vocab_size: int | None = None, stop_token_ids: Sequence[int] = ()
    ) -> None:
        super().__init__(tokenizer, json_schema=schema, vocab_size=vocab_size, stop_token_ids=stop_token_ids)


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks logits so that every row of one ``model.generate`` call decodes text valid under a constraint.

    Rows are independent; a row whose output is complete (stop token accepted) or that was ended by
    something else (a stop string, padding after EOS) is left alone. Use a new instance per call.
    """

    def __init__(self, constraint: GrammarConstraint) -> None:
        self.constraint = constraint
        self.rows: list[GrammarRowState] = []
        self._steps = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if not self.rows:
            self.rows = [self.constraint.new_row() for _ in range(input_ids.shape[0])]
        elif input_ids.shape[0] != len(self.rows):
            raise RuntimeError(
                f"{type(self).__name__} was built for {len(self.rows)} rows but got {input_ids.shape[0]}; "
                "create a new processor for every generate() call."
            )
        if self._steps:  # feed every row the token it sampled at the previous step
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                row.accept(token)
        self._steps += 1
        return self.constraint.mask(scores, self.rows)


#: the names this module had when it constrained JSON only
JSONRowState = GrammarRowState
JSONSchemaLogitsProcessor = GrammarLogitsProcessor


def _unpack_bitmask(bitmask: Any, vocab_size: int) -> Any:
    """A packed int32 token bitmask ``[rows, ceil(V/32)]`` (llguidance's, as vLLM's) -> bool ``[rows, V]``."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def json_schema_logits_processor(
    tokenizer: Any,
    schema: dict | str,
    *,
    vocab_size: int | None = None,
    stop_token_ids: Sequence[int] = (),
) -> JSONSchemaLogitsProcessor:
    """A fresh logits processor that constrains every row of one ``model.generate`` call to ``schema``.

    Args:
        tokenizer: the model's Hugging Face tokenizer (a fast one).
        schema: a JSON schema (dict or JSON string).
        vocab_size: the model's logits width (``model.config.vocab_size``); defaults to ``len(tokenizer)``.
        stop_token_ids: tokens that end a row once the JSON is complete (the ids passed as
            ``eos_token_id``); defaults to the tokenizer's EOS.

    Raises:
        ImportError: llguidance is not installed.
        ValueError: the schema cannot be compiled.
    """
    constraint = JSONSchemaConstraint(tokenizer, schema, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    return JSONSchemaLogitsProcessor(constraint)


# ---------------------------------------------------------------------- regex -> GBNF (llama.cpp)
@functools.lru_cache(maxsize=64)
def regex_to_gbnf(pattern: str) -> str:
    """``pattern`` (a full-match regular expression) as a one-rule GBNF grammar for llama.cpp's ``grammar`` field.

    llama.cpp's server takes a GBNF grammar, not a regex (``tools/server/server-common.cpp``
    ``oaicompat_chat_params_parse``, ``server-task.cpp`` ``params_from_json_cmpl``). The pattern is parsed
    by Python's own regex parser and written with GBNF's literals, character classes, groups,
    alternation and repetition (``*``, ``+``, ``?``, ``{m,n}``). Anchors, lookarounds, backreferences
    and inline flags have no GBNF form and raise ``ValueError``; the pattern already has to match the
    whole output, as for vLLM's and SGLang's ``regex``. ``.`` is any character but a newline (as llguidance reads it: the
    transformers engine and vLLM's guidance backend; SGLang's xgrammar takes newlines too), ``\\d``
    ``[0-9]``, ``\\s`` ASCII whitespace and ``\\w`` ``[a-zA-Z0-9_]`` (ASCII only).

    Example:
        >>> print(regex_to_gbnf("[ \\\\n]{0,2}(safe|unsafe\\\\nS(1|10)(,S(1|10)){0,1})"))
        root ::= [ \\n]{0,2} (("safe" | "unsafe\\nS" ("1" ("" | "0")) (",S" ("1" ("" | "0")))?))
    """
    try:  # Python 3.11+ (the same modules were sre_constants / sre_parse before)
        import re._constants as c
        import re._parser as parser
    except ImportError:  # Python 3.10
        import sre_constants as c  # type: ignore[no-redef]
        import sre_parse as parser  # type: ignore[no-redef]

    try:
        tree = parser.parse(pattern)
    except re.error as err:
        raise ValueError(f"Cannot parse regex {pattern!r}: {err}") from err
    return "root ::= " + _gbnf_sequence(tree, c, pattern)


def _gbnf_sequence(items: Any, c: Any, pattern: str) -> str:
    """GBNF for a sequence of parsed regex items, consecutive literals merged into one quoted string."""
    parts: list[str] = []
    text: list[str] = []
    for op, av in items:
        if op is c.LITERAL:
            text.append(chr(av))
            continue
        if text:
            parts.append(_gbnf_literal("".join(text)))
            text = []
        parts.append(_gbnf_item(op, av, c, pattern))
    if text:
        parts.append(_gbnf_literal("".join(text)))
    return " ".join(parts) if parts else '""'


def _gbnf_item(op: Any, av: Any, c: Any, pattern: str) -> str:
    if op is c.NOT_LITERAL:
        return _gbnf_class([(c.NEGATE, None), (c.LITERAL, av)], c, pattern)
    if op is c.ANY:
        return "[^\\n]"  # any character but a newline, as llguidance (the transformers engine, vLLM) reads "."
    if op is c.IN:
        return _gbnf_class(av, c, pattern)
    if op is c.CATEGORY:
        return _gbnf_class([(c.CATEGORY, av)], c, pattern)
    if op is c.BRANCH:
        return "(" + " | ".join(_gbnf_sequence(branch, c, pattern) for branch in av[1]) + ")"
    if op is c.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise ValueError(f"regex {pattern!r}: inline flags have no GBNF form; write the pattern without them.")
        return "(" + _gbnf_sequence(sub, c, pattern) + ")"
    if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)):
        low, high, sub = av
        body = _gbnf_sequence(sub, c, pattern)
        single = len(sub) == 1 and sub[0][0] in (c.IN, c.ANY, c.NOT_LITERAL, c.CATEGORY, c.BRANCH, c.SUBPATTERN)
        atom = body if single or (len(sub) == 1 and sub[0][0] is c.LITERAL) else f"({body})"
        if high == c.MAXREPEAT:
            return atom + ("*" if low == 0 else "+" if low == 1 else f"{{{low},}}")
        if (low, high) == (0, 1):
            return atom + "?"
        return atom + (f"{{{low}}}" if low == high else f"{{{low},{high}}}")
    raise ValueError(
        f"regex {pattern!r} uses {str(op).lower()}, which has no GBNF form (anchors, lookarounds, backreferences "
        "and the like); the pattern always matches the whole output, so write it without them."
    )


_CATEGORY_RANGES = {
    "CATEGORY_DIGIT": (False, [(0x30, 0x39)]),
    "CATEGORY_NOT_DIGIT": (True, [(0x30, 0x39)]),
    "CATEGORY_SPACE": (False, [(0x20, 0x20), (0x09, 0x0D)]),
    "CATEGORY_NOT_SPACE": (True, [(0x20, 0x20), (0x09, 0x0D)]),
    "CATEGORY_WORD": (False, [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]),
    "CATEGORY_NOT_WORD": (True, [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]),
}


def _gbnf_class(items: Any, c: Any, pattern: str) -> str:
    negate = False
    ranges: list[tuple[int, int]] = []
    negated_categories = 0
    for op, av in items:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            ranges.append((av, av))
        elif op is c.RANGE:
            ranges.append(av)
        elif op is c.CATEGORY and str(av) in _CATEGORY_RANGES:
            inverted, spans = _CATEGORY_RANGES[str(av)]
            negated_categories += inverted
            ranges.extend(spans)
        else:
            raise ValueError(f"regex {pattern!r}: {str(op).lower()} {av} in a character class has no GBNF form.")
    if negated_categories:
        if negated_categories != 1 or len(items) != 1 or negate:
            raise ValueError(f"regex {pattern!r}: \\D, \\S or \\W combined with other class items has no GBNF form.")
        negate = True
    # a \xHH escape goes last: xgrammar's EBNF reader would take a hex digit after it as part of it
    # (llama.cpp reads exactly two digits)
    members = [_gbnf_class_char(a) if a == b else f"{_gbnf_class_char(a)}-{_gbnf_class_char(b)}" for a, b in ranges]
    members.sort(key=lambda m: "\\x" in m or "\\u" in m or "\\U" in m)
    return f"[{'^' if negate else ''}{''.join(members)}]"


#: escapes llama.cpp's grammar parser reads in a class (``parse_char``: \\ \" \[ \] \n \r \t \x \u \U)
_CLASS_ESCAPES = {"\\": "\\\\", "]": "\\]", "[": "\\[", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _gbnf_class_char(code: int) -> str:
    """A character inside a GBNF class: printable ASCII as it is (``\\``, ``]``, ``[``, ``"`` and the
    three whitespace controls escaped), ``-``, ``^`` and anything else as ``\\xHH`` / ``\\uHHHH``."""
    char = chr(code)
    if char in _CLASS_ESCAPES:
        return _CLASS_ESCAPES[char]
    if 0x20 <= code <= 0x7E and char not in "-^":
        return char
    return f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def _gbnf_literal(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
