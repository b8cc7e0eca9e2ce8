"""The first-step rules of :class:`~magpie_hf.engines.base.SamplingConfig` as a vLLM logits processor.

The official Magpie generator passed per-request logits-processor callables to vLLM's old engine
(``exp/gen_ins.py``: ``SamplingParams(logits_processors=[...])``) to ban markdown headings as
Llama-3.1's first token and to sample Qwen2.5-Math's first token at 1.2x the temperature. vLLM's V1
engine has no per-request callables: it loads custom logits-processor *classes*
(``LLM(logits_processors=["module:Class"])``) and lets each request pass arguments in
``SamplingParams.extra_args``. :class:`magpie_hf.engines.vllm.VLLMEngine` loads :class:`FirstTokenRules`
for ``EngineConfig(first_token_rules=True)`` and puts each request's rules in
``extra_args["magpie_first_token"]``: ``{"banned_ids": [2, 567, ...], "temperature_scale": 1.2}``.

**Two model runners, two interfaces, one class.** vLLM decides which model runner to use only after
``LLM(...)`` has built its config (``VllmConfig.use_v2_model_runner``, ``vllm/config/vllm.py:703-739`` in
0.32: ``VLLM_USE_V2_MODEL_RUNNER``, else the V1 runner without Triton or for features V2 lacks, else V2),
and each runner's loader accepts only subclasses of its own interface (V1:
``v1/sample/logits_processor/__init__.py:157-158``; V2: ``v1/worker/gpu/sample/logits_processor/loader.py:126-130``).
So :class:`FirstTokenRules` implements both; the runner vLLM picks constructs it through its own
interface and calls only that interface's methods:

- **V1 runner** (vLLM's CPU runner and the V1 GPU runner; ``vllm/v1/sample/logits_processor/interface.py``
  in 0.32): ``__init__(vllm_config, device, is_pin_memory)``; ``update_state(batch_update)`` before each
  forward pass with the requests added (index, params, prompt ids, a live reference to the output ids),
  removed and moved; ``apply(logits)`` on the persistent batch's rows; ``is_argmax_invariant()`` False,
  so it runs with the non-argmax-invariant processors, before penalties and temperature
  (``v1/sample/sampler.py:402-404`` then ``:279``). A request is at its first step while its output ids
  are empty; a request resumed after preemption comes back with its outputs and is left alone.
- **V2 runner** (``vllm/v1/worker/gpu/sample/logits_processor/interface.py:92-158``, the same in 0.32 and
  0.34): ``__init__(vllm_config, req_states)``; ``add_request(req_idx, sampling_params)`` for every request
  entering a slot (slots are reused, so it resets the slot); ``apply_staged_writes()`` after new requests
  are added and before the forward pass; ``apply(logits, ctx)`` on the whole batch's float32 logits,
  ``ctx.expanded_idx_mapping`` mapping a row to its slot and ``ctx.pos`` giving the position of the token
  the row's logits come from. ``apply()`` runs after logit bias, penalties, bad words and the grammar
  mask, before temperature, min-p and top-k/top-p (``interface.py:99-103``, ``sampler.py:244-266`` in
  0.34). ``req_states.prompt_len`` holds each slot's prompt length; the first generated token is sampled
  from the logits at position ``prompt_len - 1`` (vLLM's own min-tokens rule makes the same test,
  ``logit_bias.py:93-96,238-242`` in 0.34).
- Both: ``validate_params(sampling_params)`` runs when a request is admitted, in the frontend (a
  ``ValueError`` fails that request with its message).

On both runners the logits divided here are then divided by the request's temperature, which is what
the official ``flaming_tokens`` did, and what the transformers engine does
(``magpie_hf.engines.transformers._FirstTokenRule``).

The engine-core process imports this module by name, so it must import on any machine with vLLM; it
imports only vLLM's two interface modules at the top, and torch and numpy inside the methods.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from magpie_hf.engines.vllm import FIRST_TOKEN_ARGS

#: most banned first tokens one request may carry (a Llama-3 vocabulary has a few dozen '#' runs)
MAX_BANNED_IDS = 256


def parse_first_token_args(extra_args: dict[str, Any] | None) -> tuple[list[int], float] | None:
    """``(banned ids, temperature scale)`` of a request's ``extra_args``, None when it has no rules.

    Raises:
        ValueError: the arguments are malformed (vLLM fails that request with the message).

    Example:
        >>> parse_first_token_args({"magpie_first_token": {"banned_ids": [9, 2, 9], "temperature_scale": 1.2}})
        ([2, 9], 1.2)
        >>> parse_first_token_args({"magpie_first_token": {"banned_ids": [], "temperature_scale": 1}}) is None
        True
    """
    if not extra_args or FIRST_TOKEN_ARGS not in extra_args:
        return None
    args = extra_args[FIRST_TOKEN_ARGS]
    if not isinstance(args, dict) or set(args) - {"banned_ids", "temperature_scale"}:
        raise ValueError(
            f"extra_args[{FIRST_TOKEN_ARGS!r}] must be a dict with 'banned_ids' (a list of token ids) and "
            f"'temperature_scale' (a number > 0), got {args!r}"
        )
    banned = args.get("banned_ids") or []
    scale = args.get("temperature_scale", 1.0)
    if not isinstance(banned, list) or not all(isinstance(i, int) and i >= 0 for i in banned):
        raise ValueError(f"extra_args[{FIRST_TOKEN_ARGS!r}]['banned_ids'] must be a list of token ids, got {banned!r}")
    if len(banned) > MAX_BANNED_IDS:
        raise ValueError(f"extra_args[{FIRST_TOKEN_ARGS!r}] bans {len(banned)} first tokens; at most {MAX_BANNED_IDS}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"extra_args[{FIRST_TOKEN_ARGS!r}]['temperature_scale'] must be a number > 0, got {scale!r}")
    if not banned and scale == 1:
        return None
    return sorted(set(banned)), float(scale)


class FirstTokenRules(V1LogitsProcessor, V2LogitsProcessor):
    """Bans tokens and divides the logits at each request's first generated token, on vLLM's V1 or V2
    model runner (see the module docstring).

    V2: per slot a scale and a row of banned ids, padded with the slot's first banned id, so one
    ``gather``/``scatter`` over ``[rows, MAX_BANNED_IDS]`` applies every row's bans without a host sync.
    V1: a dict of the batch rows still at their first step (usually none: Magpie prompts ask for short
    answers, so a row spends one step of many here), applied row by row.
    """

    def __init__(self, vllm_config: Any, *runner_args: Any) -> None:
        import numpy as np
        import torch

        if len(runner_args) == 2:  # V1: (device, is_pin_memory)
            self.runner = "v1"
            self.device = runner_args[0]
            self.req_states = None
            #: batch index -> (banned ids, scale, live output ids) of the requests not past their first step
            self.first_steps: dict[int, tuple[list[int], float, list[int]]] = {}
            slots = 0
        else:  # V2: (req_states,)
            (self.req_states,) = runner_args
            self.runner = "v2"
            self.device = self.req_states.device
            slots = int(self.req_states.max_num_reqs)
        #: V2: ids past the vocabulary are dropped when a request is added; V1: when its row is changed
        self.vocab_size = None if self.req_states is None else int(self.req_states.vocab_size)
        #: V2 slots whose request has rules (host copy, to skip batches without any)
        self.has_rule = np.zeros(slots, dtype=bool)
        # V2, per slot, staged on the host and copied to the device in apply_staged_writes()
        self._active = torch.zeros(slots, dtype=torch.bool)  # the request has rules
        self._bans = torch.zeros(slots, dtype=torch.bool)  # ... and bans at least one token
        self._scale = torch.ones(slots, dtype=torch.float32)
        self._banned = torch.zeros((slots, MAX_BANNED_IDS), dtype=torch.int64)
        self._device_state: tuple[Any, Any, Any, Any] | None = None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        parse_first_token_args(sampling_params.extra_args)

    def _rule(self, sampling_params: Any) -> tuple[list[int], float] | None:
        rule = parse_first_token_args(sampling_params.extra_args)
        if rule is None:
            return None
        banned, scale = rule
        return [i for i in banned if self.vocab_size is None or i < self.vocab_size], scale

    # ------------------------------------------------------------------ V1 runner
    def is_argmax_invariant(self) -> bool:
        """Banning a token can change the greedy choice: run before temperature with the processors that can."""
        return False

    def update_state(self, batch_update: Any) -> None:
        # vLLM's own bookkeeping of added, removed and moved rows (what its built-in processors use)
        process_dict_updates(self.first_steps, batch_update, self._first_step)
        # output ids are live references: a request that has sampled its first token leaves
        for index in [i for i, (_, _, output_ids) in self.first_steps.items() if output_ids]:
            del self.first_steps[index]

    def _first_step(self, params: Any, _prompt_ids: Any, output_ids: list[int]) -> tuple[list[int], float, list[int]] | None:
        """A V1 row's entry: its rules and its live output ids; None without rules or when resumed past its first step."""
        rule = self._rule(params)
        return None if rule is None or output_ids else (*rule, output_ids)

    # ------------------------------------------------------------------ V2 runner
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        rule = self._rule(sampling_params)
        banned, scale = rule if rule is not None else ([], 1.0)
        self.has_rule[req_idx] = rule is not None
        self._active[req_idx] = rule is not None
        self._bans[req_idx] = bool(banned)
        self._scale[req_idx] = scale
        # padding repeats a real id of the row (or 0 when it bans nothing): a scatter then writes one
        # value per id, whatever the duplicates
        self._banned[req_idx] = banned[0] if banned else 0
        if banned:
            self._banned[req_idx, : len(banned)] = self._banned.new_tensor(banned)
        self._device_state = None
        return rule is not None

    def apply_staged_writes(self) -> None:
        if self._device_state is None:
            self._device_state = tuple(t.to(self.device) for t in (self._active, self._bans, self._scale, self._banned))

    # ------------------------------------------------------------------ both
    def apply(self, logits: Any, ctx: Any = None) -> Any:
        if ctx is None:  # V1: the rows still at their first step
            for index, (banned, scale, _) in self.first_steps.items():
                banned = [i for i in banned if i < logits.shape[-1]]
                if banned:
                    logits[index, banned] = float("-inf")
                if scale != 1.0:
                    logits[index].div_(scale)
            return logits
        return self._apply_v2(logits, ctx)

    def _apply_v2(self, logits: Any, ctx: Any) -> Any:
        import torch

        if not self.has_rule[ctx.idx_mapping_np].any():
            return logits
        self.apply_staged_writes()
        active, bans, scale, banned = self._device_state  # type: ignore[misc]
        slots = ctx.expanded_idx_mapping.long()
        first = (ctx.pos + 1 == self.req_states.prompt_len.gpu[slots]) & active[slots]
        row_scale = torch.where(first, scale[slots], torch.ones_like(scale[slots]))
        logits.div_(row_scale.unsqueeze(1))
        ids = banned[slots]
        current = logits.gather(1, ids)
        ban = (first & bans[slots]).unsqueeze(1)
        logits.scatter_(1, ids, torch.where(ban, torch.full_like(current, float("-inf")), current))
        return logits
