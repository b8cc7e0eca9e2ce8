"""Constrained decoding for the transformers engine: JSON schemas and regular expressions (xgrammar).

vLLM maps ``SamplingConfig.json_schema`` and ``SamplingConfig.regex`` to its own structured outputs,
with the same grammar settings (:data:`JSON_GRAMMAR`). For the transformers backend this module
compiles the same constraints with `xgrammar <https://github.com/mlc-ai/xgrammar>`_, the grammar
engine vLLM uses, so both backends accept the same schemas and patterns: :class:`GrammarConstraint`
masks, at every step and for every row, the tokens that would break the constraint, and
:class:`GrammarLogitsProcessor` does it inside ``model.generate``. For OpenAI-compatible servers
that read a GBNF grammar instead of a regex (llama.cpp's ``grammar`` field), :func:`regex_to_gbnf`
writes the same pattern as GBNF.

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
    "Constrained decoding (JSON schemas, regular expressions) with the transformers backend needs xgrammar. Install it with "
    "`pip install xgrammar` (on a CPU-only machine `pip install --no-deps xgrammar apache-tvm-ffi` "
    "avoids pulling triton)."
)


@dataclass(frozen=True)
class JSONGrammarSettings:
    """How a JSON schema becomes a grammar, the same on every backend that constrains decoding.

    Compact JSON, no free whitespace: with free whitespace a model (small ones especially) can pad
    an answer with spaces and newlines up to ``max_tokens`` and end unparseable. The transformers
    engine compiles schemas with :meth:`xgrammar_kwargs`; the vLLM engine passes
    :meth:`vllm_structured_outputs_config` as ``LLM(structured_outputs_config=...)``: vLLM reads the
    whitespace setting only from its engine-level config (vllm 0.34 ``v1/structured_output/
    backend_xgrammar.py:39-41``; ``StructuredOutputsParams.disable_any_whitespace`` of a request is
    not read there) and then compiles with ``any_whitespace=False, separators=(",", ":")``
    (``backend_xgrammar.py:144-155``), which is what :meth:`xgrammar_kwargs` gives xgrammar here.

    Example:
        >>> JSON_GRAMMAR.xgrammar_kwargs()
        {'any_whitespace': False, 'separators': (',', ':')}
        >>> JSON_GRAMMAR.vllm_structured_outputs_config()
        {'backend': 'xgrammar', 'disable_any_whitespace': True}
    """

    #: the grammar engine (vLLM's ``StructuredOutputsConfig.backend``; the transformers engine always uses xgrammar)
    backend: str = "xgrammar"
    any_whitespace: bool = False
    #: item and key separators of compact JSON
    separators: tuple[str, str] = (",", ":")

    def xgrammar_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``xgrammar.GrammarCompiler.compile_json_schema``."""
        return {"any_whitespace": self.any_whitespace, "separators": self.separators}

    def vllm_structured_outputs_config(self) -> dict[str, Any]:
        """``vllm.LLM(structured_outputs_config=...)`` (fields of vLLM's ``StructuredOutputsConfig``,
        vllm 0.34 ``config/structured_outputs.py:18-35``)."""
        if self.backend != "xgrammar" or (not self.any_whitespace and self.separators != (",", ":")):
            raise ValueError(
                "vLLM compiles whitespace-free JSON with xgrammar and separators (',', ':') only; "
                f"{self} cannot be given to vLLM."
            )
        return {"backend": self.backend, "disable_any_whitespace": not self.any_whitespace}

    def vllm_server_args(self) -> list[str]:
        """The flags that give vLLM's OpenAI-compatible server the same grammar: vLLM reads the whitespace
        setting from its engine config only (``v1/structured_output/backend_xgrammar.py:38-40,110-120`` in
        0.32; a request's ``disable_any_whitespace`` is not used), so a server started without them answers
        the judges' schemas with indented JSON, which takes several times the tokens and can overrun
        ``max_tokens``.

        Example:
            >>> JSON_GRAMMAR.vllm_server_args()
            ['--structured-outputs-config', '{"backend":"xgrammar","disable_any_whitespace":true}']
        """
        return ["--structured-outputs-config", json.dumps(self.vllm_structured_outputs_config(), separators=(",", ":"))]


#: the one JSON grammar setting both backends are built from
JSON_GRAMMAR = JSONGrammarSettings()


def constrained_decoding_available() -> bool:
    """Whether xgrammar can be imported (so :func:`json_schema_logits_processor` works)."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def _import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from err
    return xgrammar


# Compilers and compiled grammars per tokenizer object (dropped with the tokenizer). Building the
# tokenizer info and compiling a grammar cost tens to hundreds of milliseconds; a processor is per call.
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def _compiled(tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], kind: str, spec: str) -> Any:
    """The xgrammar ``CompiledGrammar`` of a JSON schema (``kind="json"``) or a regex (``kind="regex"``)."""
    xgr = _import_xgrammar()
    cache = _CACHE.setdefault(tokenizer, {})
    key = (vocab_size, stop_token_ids)
    if key not in cache:
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        cache[key] = xgr.GrammarCompiler(info)
    if (*key, kind, spec) not in cache:
        if kind == "json":
            # compact JSON (no free whitespace): small models otherwise loop on spaces and newlines
            compiled = cache[key].compile_json_schema(spec, **JSON_GRAMMAR.xgrammar_kwargs())
        else:
            # what vLLM does with StructuredOutputsParams.regex (vllm 0.34 v1/structured_output/backend_xgrammar.py:162-165)
            compiled = cache[key].compile_regex(spec)
        cache[(*key, kind, spec)] = compiled
    return cache[(*key, kind, spec)]


class GrammarRowState:
    """Grammar state of one generated row: feed it each sampled token with :meth:`accept`."""

    __slots__ = ("matcher", "done")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        #: the output is complete (stop token accepted) or the row left the grammar; no more masking
        self.done = False

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and ``done``) when the grammar cannot take it."""
        if self.done:
            return False
        ok = bool(self.matcher.accept_token(int(token_id)))
        if not ok or self.matcher.is_terminated():
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

    The row may end (take a stop token) only where the JSON or the regex match is complete.
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
        self._xgr = _import_xgrammar()
        stops = tuple(sorted({int(t) for t in stop_token_ids}))
        if json_schema is not None:
            # key order is the order fields are written
            kind, spec, what = "json", json_schema if isinstance(json_schema, str) else json.dumps(json_schema), "JSON schema"
        else:
            kind, spec, what = "regex", str(regex), "regex"
        try:
            self._grammar = _compiled(tokenizer, int(vocab_size or len(tokenizer)), stops, kind, spec)
        except RuntimeError as err:
            raise ValueError(f"Cannot compile {what} for constrained decoding: {err}") from err
        self.vocab_size = self._grammar.tokenizer_info.vocab_size
        self._bitmask: Any = None

    def new_row(self) -> GrammarRowState:
        return GrammarRowState(self._xgr.GrammarMatcher(self._grammar))

    def mask(self, scores: Any, rows: Sequence[GrammarRowState]) -> Any:
        """Set to -inf, in place, the logits each unfinished row may not take next; returns ``scores``."""
        import torch

        if len(rows) != scores.shape[0]:
            raise ValueError(f"mask() got {len(rows)} row states for {scores.shape[0]} rows of scores")
        active = [i for i, row in enumerate(rows) if not row.done]
        if not active:
            return scores
        if self._bitmask is None or self._bitmask.shape[0] < len(active):
            self._bitmask = self._xgr.allocate_token_bitmask(max(len(active), 8), self.vocab_size)
        for slot, i in enumerate(active):
            rows[i].matcher.fill_next_token_bitmask(self._bitmask, slot)
        allowed = _unpack_bitmask(self._bitmask[: len(active)], self.vocab_size).to(scores.device)
        width = scores.shape[-1]
        if allowed.shape[-1] < width:  # model vocab padded beyond the tokenizer: never allowed
            pad = torch.zeros(len(active), width - allowed.shape[-1], dtype=torch.bool, device=scores.device)
            allowed = torch.cat([allowed, pad], dim=-1)
        index = torch.tensor(active, device=scores.device)
        scores[index] = scores[index].masked_fill(~allowed[:, :width], float("-inf"))
        return scores


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
    """xgrammar's packed int32 bitmask ``[rows, ceil(V/32)]`` -> bool ``[rows, V]`` (any device)."""
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
        tokenizer: the model's Hugging Face tokenizer.
        schema: a JSON schema (dict or JSON string).
        vocab_size: the model's logits width (``model.config.vocab_size``); defaults to ``len(tokenizer)``.
        stop_token_ids: tokens that end a row once the JSON is complete (the ids passed as
            ``eos_token_id``); defaults to the tokenizer's EOS.

    Raises:
        ImportError: xgrammar is not installed.
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
    whole output, as for vLLM's and SGLang's ``regex``. ``.`` is any character (newlines too, as xgrammar reads it), ``\\d``
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
        return "[\\x00-\\U0010FFFF]"  # any character, as xgrammar (vLLM, SGLang) reads "."
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
