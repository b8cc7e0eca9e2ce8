"""The first-step rules of :class:`~magpie_hf.engines.base.SamplingConfig` as a vLLM (0.34) logits processor.

The official Magpie generator passed per-request logits-processor callables to vLLM's old engine
(``exp/gen_ins.py``: ``SamplingParams(logits_processors=[...])``) to ban markdown headings as
Llama-3.1's first token and to sample Qwen2.5-Math's first token at 1.2x the temperature. vLLM's V1
engine has no per-request callables; vLLM 0.34 loads custom :class:`LogitsProcessor` *classes* into
its (V2) model runner and lets each request pass arguments in ``SamplingParams.extra_args``. This
module is that class; :class:`magpie_hf.engines.vllm.VLLMEngine` loads it for
``EngineConfig(first_token_rules=True)`` (``LLM(logits_processors=["magpie_hf.engines.vllm_logits:FirstTokenRules"])``)
and puts each request's rules in ``extra_args["magpie_first_token"]``:
``{"banned_ids": [2, 567, ...], "temperature_scale": 1.2}``.

What it relies on (vLLM 0.34.0 source, ``vllm/v1/worker/gpu/sample/``):

- ``logits_processor/interface.py:92-158``: the interface. ``__init__(vllm_config, req_states)``;
  ``validate_params(sampling_params)`` runs when a request is admitted, in the frontend (a
  ``ValueError`` fails that request); ``add_request(req_idx, sampling_params)`` is called for every
  request entering a slot (slots are reused, so it resets the slot) and returns whether the processor
  changes that request's logits; ``apply_staged_writes()`` runs after new requests are added and
  before the forward pass (``v1/worker/gpu/model_runner.py:1333-1338``); ``apply(logits, ctx)`` gets
  the whole batch's float32 logits, one row per logits row, ``ctx.expanded_idx_mapping`` mapping a
  row to its request slot and ``ctx.pos`` giving the position of the token the row's logits come from.
- ``interface.py:99-103`` and ``sampler.py:244-266``: ``apply()`` runs after logit bias, penalties,
  bad words and the grammar mask, before temperature, min-p and top-k/top-p. So logits divided here
  are then divided by the temperature, which is what the official ``flaming_tokens`` did.
- ``interface.py:40-48`` and ``states.py:43-52,105,121``: ``req_states.prompt_len`` holds each slot's
  prompt length (``.np`` on the host, ``.gpu`` refreshed by ``copy_to_uva``; read it at every step).
  The first generated token is sampled from the logits of the last prompt token, at position
  ``prompt_len - 1``, the same test vLLM's own min-tokens rule makes (``logit_bias.py:93-96,238-242``:
  ``pos + 1 < prompt_len + min_tokens``). A request resumed after preemption re-prefills prompt and
  output, so its later steps have larger positions and are left alone.
- ``sampler.py:96-107``: a request for which ``add_request`` returns True is always processed.

The engine-core process imports this module by name, so it must import on any machine with vLLM; it
imports only vLLM's import-light interface module at the top (``logits_processor/__init__.py``) and
torch and numpy inside the methods.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from magpie_hf.engines.vllm import FIRST_TOKEN_ARGS

#: most banned first tokens one request may carry (a Llama-3 vocabulary has a few dozen '#' runs)
MAX_BANNED_IDS = 256


def parse_first_token_args(extra_args: dict[str, Any] | None) -> tuple[list[int], float] | None:
    """``(banned ids, temperature scale)`` of a request's ``extra_args``, None when it has no rules.

    Raises:
        ValueError: the arguments are malformed (vLLM fails that request with the message).
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


class FirstTokenRules(LogitsProcessor):
    """Bans tokens and divides the logits at each request's first generated token (see the module docstring).

    Per slot it keeps a scale and a row of banned ids, padded with the slot's first banned id, so one
    ``gather``/``scatter`` over ``[rows, MAX_BANNED_IDS]`` applies every row's bans without a host sync.
    """

    def __init__(self, vllm_config: Any, req_states: Any) -> None:
        import numpy as np
        import torch

        self.req_states = req_states
        self.device = req_states.device
        slots = int(req_states.max_num_reqs)
        self.vocab_size = int(req_states.vocab_size)
        #: slots whose request has rules (host copy, to skip batches without any)
        self.has_rule = np.zeros(slots, dtype=bool)
        # per slot, staged on the host and copied to the device in apply_staged_writes()
        self._active = torch.zeros(slots, dtype=torch.bool)  # the request has rules
        self._bans = torch.zeros(slots, dtype=torch.bool)  # ... and bans at least one token
        self._scale = torch.ones(slots, dtype=torch.float32)
        self._banned = torch.zeros((slots, MAX_BANNED_IDS), dtype=torch.int64)
        self._device_state: tuple[Any, Any, Any, Any] | None = None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        parse_first_token_args(sampling_params.extra_args)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        rule = parse_first_token_args(sampling_params.extra_args)
        banned, scale = rule if rule is not None else ([], 1.0)
        banned = [i for i in banned if i < self.vocab_size]
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

    def apply(self, logits: Any, ctx: Any) -> Any:
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
