"""JSON-schema constrained decoding for ``transformers`` ``generate`` (xgrammar under the hood).

vLLM maps ``SamplingConfig.json_schema`` to its own structured outputs, with the same grammar
settings (:data:`JSON_GRAMMAR`). For the transformers
backend this module gives a :class:`transformers.LogitsProcessor` that masks, at every step and for
every row, the tokens that would break the schema. It uses `xgrammar <https://github.com/mlc-ai/xgrammar>`_,
the grammar engine vLLM uses, so both backends accept the same schemas.

Example:
    >>> from magpie_hf.constrained import json_schema_logits_processor
    >>> schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}
    >>> processor = json_schema_logits_processor(tokenizer, schema, vocab_size=model.config.vocab_size)  # doctest: +SKIP
    >>> model.generate(**enc, logits_processor=[processor], max_new_tokens=32)  # doctest: +SKIP

A processor holds per-row grammar state: build a new one for every ``generate`` call (it is cheap:
the tokenizer vocabulary and compiled schemas are cached).
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from transformers import LogitsProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "JSON_GRAMMAR",
    "JSONGrammarSettings",
    "JSONRowState",
    "JSONSchemaConstraint",
    "JSONSchemaLogitsProcessor",
    "constrained_decoding_available",
    "json_schema_logits_processor",
]

_INSTALL_HINT = (
    "Constrained JSON decoding with the transformers backend needs xgrammar. Install it with "
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


# Compilers and compiled schemas per tokenizer object (dropped with the tokenizer). Building the
# tokenizer info and compiling a schema cost tens to hundreds of milliseconds; a processor is per call.
_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def _compiled_schema(tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], schema_json: str) -> Any:
    xgr = _import_xgrammar()
    cache = _CACHE.setdefault(tokenizer, {})
    key = (vocab_size, stop_token_ids)
    if key not in cache:
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        cache[key] = xgr.GrammarCompiler(info)
    if (*key, schema_json) not in cache:
        # compact JSON (no free whitespace): small models otherwise loop on spaces and newlines
        cache[(*key, schema_json)] = cache[key].compile_json_schema(schema_json, **JSON_GRAMMAR.xgrammar_kwargs())
    return cache[(*key, schema_json)]


class JSONRowState:
    """Grammar state of one generated row: feed it each sampled token with :meth:`accept`."""

    __slots__ = ("matcher", "done")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        #: the JSON is complete (stop token accepted) or the row left the grammar; no more masking
        self.done = False

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False (and ``done``) when the grammar cannot take it."""
        if self.done:
            return False
        ok = bool(self.matcher.accept_token(int(token_id)))
        if not ok or self.matcher.is_terminated():
            self.done = True
        return ok


class JSONSchemaConstraint:
    """A JSON schema compiled for one tokenizer; hands out per-row states and masks logits.

    For engines with their own decoding loop (rows joining and leaving the batch)::

        constraint = JSONSchemaConstraint(tokenizer, schema, vocab_size=logits.shape[-1], stop_token_ids=eos_ids)
        row.json = constraint.new_row()                          # when a row is admitted
        scores = constraint.mask(scores, [r.json for r in active])  # before choosing tokens
        row.json.accept(token)                                   # after choosing, for every row
    """

    def __init__(
        self, tokenizer: Any, schema: dict | str, *, vocab_size: int | None = None, stop_token_ids: Sequence[int] = ()
    ) -> None:
        self._xgr = _import_xgrammar()
        schema_json = schema if isinstance(schema, str) else json.dumps(schema)  # key order is the order fields are written
        stops = tuple(sorted({int(t) for t in stop_token_ids}))
        try:
            self._grammar = _compiled_schema(tokenizer, int(vocab_size or len(tokenizer)), stops, schema_json)
        except RuntimeError as err:
            raise ValueError(f"Cannot compile JSON schema for constrained decoding: {err}") from err
        self.vocab_size = self._grammar.tokenizer_info.vocab_size
        self._bitmask: Any = None

    def new_row(self) -> JSONRowState:
        return JSONRowState(self._xgr.GrammarMatcher(self._grammar))

    def mask(self, scores: Any, rows: Sequence[JSONRowState]) -> Any:
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


class JSONSchemaLogitsProcessor(LogitsProcessor):
    """Masks logits so that every row of one ``model.generate`` call decodes JSON valid under a schema.

    Rows are independent; a row whose JSON is complete (stop token accepted) or that was ended by
    something else (a stop string, padding after EOS) is left alone. Use a new instance per call.
    """

    def __init__(self, constraint: JSONSchemaConstraint) -> None:
        self.constraint = constraint
        self.rows: list[JSONRowState] = []
        self._steps = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if not self.rows:
            self.rows = [self.constraint.new_row() for _ in range(input_ids.shape[0])]
        elif input_ids.shape[0] != len(self.rows):
            raise RuntimeError(
                f"JSONSchemaLogitsProcessor was built for {len(self.rows)} rows but got {input_ids.shape[0]}; "
                "create a new processor for every generate() call."
            )
        if self._steps:  # feed every row the token it sampled at the previous step
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                row.accept(token)
        self._steps += 1
        return self.constraint.mask(scores, self.rows)


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
