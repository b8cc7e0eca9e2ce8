"""One typed configuration per run, the TRL way: dataclasses with help text, parsed from flags and
``--config FILE.yaml`` (flags override the file, the file overrides the preset), every field
settable either way.

The tree is a set of flat dataclasses, one per concern, so that :class:`transformers.HfArgumentParser`
turns every field into a flag (``--response_temperature 0.6`` or ``--response-temperature 0.6``):

- :class:`RunArguments`: preset, sizes, seed, output folder, which stages run, ``--dry-run``;
- :class:`InstructionArguments`: the step-1 model and its sampling (a Table 6 mixture or one
  temperature/top_p), system prompt, pre-query template, newline stop, sanitize, the first-token
  rules, chat-template options, task control and language targeting (``--language``);
- :class:`ResponseArguments`: the step-2 model (another model than step 1 if you like), its sampling and
  chat-template options;
- :class:`ReasoningArguments`: thinking and answer budgets and thinking tags of a reasoning response model
  (``recipes/magpie_reasoning.py``);
- :class:`TaggingArguments`: the judge, guard, reward, embedding and base models;
- :class:`EngineArguments`: backend, dtype, GPU memory, context length, quantization, tensor
  parallelism, server URL;
- :class:`FilterArguments`, :class:`MultiTurnArguments`, :class:`PreferenceArguments`: what only some
  recipes take;
- :class:`RayArguments`, :class:`HubArguments`: where the stages run and where the dataset goes.

Library code receives these objects (or what they build: engine configs, steps, executors), never an
``argparse.Namespace``. :mod:`magpie_hf.recipe.parser` parses them; :mod:`magpie_hf.recipe.builders` turns
them into steps.

Example:
    >>> args = InstructionArguments(temperature=0.8, top_p=1.0)
    >>> args.decoding_mixture()
    (DecodingSetting(temperature=0.8, top_p=1.0, weight=1.0),)
    >>> InstructionArguments(mixture="pro").decoding_mixture()[1]
    DecodingSetting(temperature=1.1, top_p=0.995, weight=300000)
    >>> RunArguments(stages="task_category,language").stage_list()
    ['task_category', 'language']
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from magpie_hf.recipe.parser import parse_json_object
from magpie_hf.steps.generate import (
    AIR_MIXTURE,
    EMBEDDED_MIXTURE,
    PRO_MIXTURE,
    DecodingSetting,
)

#: named step-1 decoding mixtures (``--mixture``)
MIXTURES: dict[str, tuple[DecodingSetting, ...]] = {"pro": PRO_MIXTURE, "air": AIR_MIXTURE, "embedded": EMBEDDED_MIXTURE}

#: the tagging stages a recipe can run (``--stages``), in the order they run
TAGGING_STAGES = ("task_category", "input_quality", "difficulty", "safety", "language", "reward", "neighbors")


def _field(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with help text (as TRL's configs write them)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass
class RunArguments:
    """What to make, how much, and where."""

    preset: str = _field("paper", "'paper': the paper's models and sizes (needs GPUs); 'cpu': the embedded "
                         "SmolLM2-135M-Instruct for every model and small sizes, minutes on a laptop.",
                         choices=["paper", "cpu"])
    num_rows: int | None = _field(None, "Rows to generate (default: the recipe's paper size; under --preset cpu a few dozen).")
    shard_size: int | None = _field(None, "Rows per Parquet shard, the unit of resumption and distribution.")
    seed: int = _field(0, "Run seed: row ids, the mixture assignment and every row's sampling seed derive from it.")
    output_dir: str | None = _field(None, "Where shards and the dataset go (default runs/<recipe>); rerun the same "
                                    "command to resume.")
    instructions_only: bool = _field(False, "Stop after step 1: instructions only, no responses and no tagging.")
    stages: str | None = _field(None, f"Comma-separated tagging stages to run, of {', '.join(TAGGING_STAGES)} "
                                "(default: all the recipe uses); 'none' for none.")
    dry_run: bool = _field(False, "Print the fully resolved configuration (YAML) and the stage plan, then exit "
                           "without loading any model.")
    overwrite: bool = _field(False, "Discard what --output_dir keeps from an earlier run (its shards, settings and "
                             "dataset) and start over; without it a run whose settings would change kept rows is refused.")
    debug: bool = _field(False, "Show the full traceback of an error instead of its one-line message.")

    def stage_list(self) -> list[str] | None:
        """The ``--stages`` asked for (None: the recipe's default), validated."""
        if self.stages is None:
            return None
        names = [] if self.stages.strip().lower() == "none" else [s.strip() for s in self.stages.split(",") if s.strip()]
        unknown = [s for s in names if s not in TAGGING_STAGES]
        if unknown:
            raise ValueError(f"Unknown --stages {unknown}; choose among {', '.join(TAGGING_STAGES)} (or 'none').")
        return names


@dataclasses.dataclass
class InstructionArguments:
    """Magpie step 1: the model that writes the user queries, and how it samples."""

    model: str | None = _field(None, "Chat model (Hub id or folder) that writes the instructions.")
    gguf_file: str | None = _field(None, "GGUF file inside --model (transformers engine).")
    mixture: str | None = _field(None, "Step-1 decoding mixture: 'pro' or 'air' (the paper's Table 6), 'embedded', "
                          "'T:P:W,T:P:W' (temperature:top_p:weight), or in YAML a list of {temperature, top_p, weight}. "
                          "Unset or 'none': one setting, --temperature/--top_p. --temperature/--top_p given above a "
                          "preset's or recipe's mixture replace it (said in the log); given with --mixture at the same "
                          "level (both flags, or both in one file) they are refused.")
    temperature: float | None = _field(None, "Sampling temperature of the instructions (>= 0; unset: 1.0), one setting "
                                       "instead of a mixture.")
    top_p: float | None = _field(None, "Nucleus sampling of the instructions (0 < top_p <= 1; unset: 1.0), one setting "
                                 "instead of a mixture.")
    instruction_max_tokens: int = _field(2048, "Token limit of an instruction (longer ones are dropped and counted).")
    system_prompt: str | None = _field(None, "A system prompt before the user turn (the paper uses none: it lowers "
                                       "quality and difficulty, Appendix C.3).")
    keep_default_system_prompt: bool = _field(True, "Keep the system block a template writes by itself (Llama-3.1's "
                                              "dated block, Qwen2's default prompt); --no_keep_default_system_prompt drops it.")
    pre_query_template: str | None = _field(None, "Raw pre-query text instead of the one derived from the chat "
                                            "template (inspect a model first: magpie-hf template MODEL).")
    newline_stop: bool = _field(False, "A newline also ends an instruction (the official generator's default; some "
                                "models start answering after the first line of the query).")
    sanitize: bool = _field(False, "Post-process instructions as the official Llama-3.x/Gemma-2 runs do: strip a leading "
                            "'1.' and label such as '**Question**:', keep the first question or line (or what comes "
                            "before an answer); queries left empty are dropped and counted.")
    no_markdown_start: bool = _field(False, "The first generated token may not be a markdown heading (#, ##, ###, "
                                     "####), as the official Llama-3.1 runs (a first-token ban on the transformers and "
                                     "vLLM engines; on OpenAI-compatible servers queries opening with '#' are dropped "
                                     "and counted).")
    first_token_temperature_scale: float = _field(1.0, "Sample the first token at this multiple of the temperature "
                                                  "(the official Qwen2.5-Math runs: 1.2; transformers and vLLM engines only).")
    chat_template_kwargs: str | None = _field(None, "JSON options for the instruction model's chat template, e.g. "
                                              "'{\"enable_thinking\": false}' (Qwen3): step 1, follow-up queries, and "
                                              "the responses and judges when they run the same model (else see "
                                              "--response_chat_template_kwargs, --judge_chat_template_kwargs).")
    language: str | None = _field(None, "Steer step 1 toward a language (ISO 639-1, e.g. de, zh): a system prompt in that "
                                  "language (the language's own task prompts with --task), the share of rows lingua "
                                  "tags as that language in the report and card. Languages with a built-in prompt: "
                                  "see magpie_hf.prompts.languages; others need --system_prompt written in the language.")
    keep_language_only: bool = _field(False, "With --language: keep only the instructions lingua tags as that language "
                                      "(before the responses are generated); the rest are removed and counted.")
    task: str | None = _field(None, "Steer every instruction with one task-control system prompt (paper A.2), e.g. math.")
    task_mix: str | None = _field(None, "A weighted mixture of task prompts summing to 1, e.g. math=0.5,coding=0.5.")
    task_prompts: str | None = _field(None, "A JSON file {key: system prompt} adding (or replacing) task prompts.")

    def decoding_mixture(self) -> tuple[DecodingSetting, ...]:
        """The step-1 decoding settings this configuration asks for."""
        value = self.mixture
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return (DecodingSetting(1.0 if self.temperature is None else self.temperature,
                                    1.0 if self.top_p is None else self.top_p),)
        if isinstance(value, str) and value in MIXTURES:
            return MIXTURES[value]
        expected = f"a name ({', '.join(MIXTURES)}), 'none', or T:P:W,T:P:W (temperature:top_p:weight, e.g. 1.0:1.0:3,1.2:0.99:1)"
        if isinstance(value, str):
            settings = []
            for item in value.split(","):
                parts = item.strip().split(":")
                try:
                    if len(parts) != 3:
                        raise ValueError
                    numbers = [float(x) for x in parts]
                except ValueError:
                    raise ValueError(f"--mixture {value!r}: {item.strip()!r} is not T:P:W; expected {expected}") from None
                settings.append(dict(zip(("temperature", "top_p", "weight"), numbers)))
        elif isinstance(value, (list, tuple)):
            settings = list(value)
        else:
            raise ValueError(f"--mixture {value!r}: expected {expected}, or in YAML a list of {{temperature, top_p, weight}}")
        out = []
        for setting in settings:
            if isinstance(setting, DecodingSetting):
                out.append(setting)
                continue
            try:
                out.append(DecodingSetting(**setting))
            except (TypeError, ValueError) as err:
                raise ValueError(f"--mixture {value!r}: the setting {setting} is refused ({err}); each needs "
                                 "temperature >= 0, 0 < top_p <= 1 and weight > 0") from None
        return tuple(out)

    def template_kwargs(self) -> dict[str, Any] | None:
        """``--chat_template_kwargs`` as a dict (or None)."""
        return parse_json_object(self.chat_template_kwargs, "--chat_template_kwargs")

    def target_language(self) -> str | None:
        """``--language`` as a lower-case ISO 639-1 code that lingua knows (or None); ``--keep_language_only``
        needs it.

        Example:
            >>> InstructionArguments(language="DE").target_language()
            'de'
        """
        if self.language is None:
            if self.keep_language_only:
                raise ValueError("--keep_language_only needs --language CODE (e.g. --language de)")
            return None
        from magpie_hf.prompts.languages import check_language

        return check_language(self.language)


@dataclasses.dataclass
class ResponseArguments:
    """Magpie step 2: the model that answers (the instruction model unless you name another) and its sampling."""

    response_model: str | None = _field(None, "Model that writes the responses (default: the instruction model), e.g. "
                                        "a reasoning model as in Magpie-Reasoning.")
    response_gguf_file: str | None = _field(None, "GGUF file inside --response_model.")
    response_temperature: float = _field(0.0, "Sampling temperature of the responses (0: greedy, the paper's).")
    response_top_p: float = _field(1.0, "Nucleus sampling of the responses.")
    response_repetition_penalty: float = _field(1.0, "Repetition penalty of the responses.")
    response_max_tokens: int = _field(4096, "Token limit of a response (magpie_reasoning: thinking_budget + answer_budget).")
    response_chat_template_kwargs: str | None = _field(None, "JSON options for the response model's chat template, e.g. "
                                                       "'{\"enable_thinking\": true}' for Qwen3 answers (default: "
                                                       "--chat_template_kwargs when the response model is the "
                                                       "instruction model, else none).")

    def template_kwargs(self) -> dict[str, Any] | None:
        """``--response_chat_template_kwargs`` as a dict (or None)."""
        return parse_json_object(self.response_chat_template_kwargs, "--response_chat_template_kwargs")


@dataclasses.dataclass
class ReasoningArguments:
    """Responses from a reasoning model (magpie_reasoning): the thinking block goes to ``reasoning``."""

    thinking_budget: int = _field(8192, "Most tokens of a thinking block; a longer one (or one still open at the "
                                  "length limit) is dropped and counted.")
    answer_budget: int = _field(2048, "Tokens for the answer after the thinking; a response may use "
                                "thinking_budget + answer_budget tokens in all (this sets --response_max_tokens).")
    reasoning_tags: str | None = _field(None, "The thinking block's tags as 'OPEN,CLOSE' (in YAML a list), instead of "
                                        "those derived from the response model's chat template (default <think>,</think> "
                                        "when the template names none).")

    def __post_init__(self) -> None:
        if isinstance(self.reasoning_tags, (list, tuple)):
            self.reasoning_tags = ",".join(self.reasoning_tags)

    def tags(self) -> tuple[str, str] | None:
        from magpie_hf.steps.reasoning import parse_reasoning_tags

        return parse_reasoning_tags(self.reasoning_tags)

    def max_tokens(self) -> int:
        """What a response may use in all: thinking plus answer."""
        for name in ("thinking_budget", "answer_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        return self.thinking_budget + self.answer_budget


@dataclasses.dataclass
class TaggingArguments:
    """The models of the tagging stages (paper Section 3): each one selectable."""

    judge_model: str | None = _field(None, "LLM judge for task category, input quality and difficulty "
                                     "(paper: Llama-3-8B-Instruct; --preset cpu: the embedded model).")
    guard_model: str | None = _field(None, "Safety guard (paper: Llama-Guard-2-8B).")
    reward_model: str | None = _field(None, "Sequence-classification reward model (paper: FsfairX-LLaMA3-RM-v0.1); "
                                      "'judge' rates responses 1-10 with the judge model instead.")
    embedding_model: str | None = _field(None, "Sentence-transformers model for neighbour distances "
                                         "(paper: all-mpnet-base-v2; --preset cpu: the embedded all-MiniLM-L6-v2).")
    base_model: str | None = _field(None, "Base model for the reward difference (paper: Llama-3-8B, URIAL-prompted).")
    judge_reward_samples: int = _field(5, "Ratings averaged per response when the judge gives the reward.")
    judge_max_tokens: int | None = _field(None, "Token limit of the judges' JSON answers (default per judge).")
    judge_chat_template_kwargs: str | None = _field(None, "JSON options for the judge model's chat template (task "
                                                    "category, quality, difficulty, judge reward), e.g. "
                                                    "'{\"enable_thinking\": false}' (default: --chat_template_kwargs "
                                                    "when the judge is the instruction model, else none).")
    judge_explanations: bool = _field(True, "Ask the quality and difficulty judges for their free-text fields "
                                      "(quality_explanation, intent, knowledge); --no_judge_explanations answers with "
                                      "the label alone, a few tokens (the CPU preset's choice).")


@dataclasses.dataclass
class EngineArguments:
    """How models are run."""

    engine: str | None = _field(None, "Generation backend: auto (vLLM on a GPU when installed, else transformers; "
                                "openai when --base_url is given), transformers, vllm, openai (a /v1/completions "
                                "server, which step 1 needs). A /v1/chat/completions server cannot write Magpie "
                                "queries: use EngineConfig(backend='openai-chat') for answers and judges in Python.",
                                choices=["auto", "transformers", "vllm", "openai"])
    dtype: str = _field("auto", "Weights dtype (auto: bfloat16 on GPUs, float32 on CPU).")
    gpu_memory_utilization: float = _field(0.9, "vLLM: share of GPU memory for weights and KV cache.")
    max_model_len: int | None = _field(None, "Context length (prompt + completion); longer prompts are null + reason.")
    quantization: str | None = _field(None, "vLLM quantization method (awq, gptq, fp8, ...).")
    tensor_parallel_size: int | None = _field(None, "GPUs per vLLM engine of the generation model.")
    tagging_tensor_parallel_size: int = _field(1, "GPUs per vLLM engine of the judge, guard and base models.")
    base_url: str | None = _field(None, "OpenAI-compatible server for --engine openai/openai-chat, e.g. http://127.0.0.1:8000/v1.")
    max_n_per_request: int | None = _field(None, "OpenAI-compatible servers: most samples per request (llama.cpp: its parallel slots).")
    batch_size: int | None = _field(None, "transformers engine: sequences decoded at once.")
    request_timeout: float = _field(300.0, "OpenAI-compatible servers: seconds to wait for one reply before retrying it "
                                    "(raise it for very long answers on a busy server). A server that does not answer "
                                    "at all is found at start within a minute.")
    max_retries: int = _field(2, "OpenAI-compatible servers: retries of a request that timed out or failed with "
                              "408/409/429/5xx or a dropped connection; the run stops after (1 + max_retries) x "
                              "--request_timeout at most, naming the URL.")
    trust_remote_code: bool = _field(False, "Allow model repositories to run their own code.")


@dataclasses.dataclass
class FilterArguments:
    """The ``filtered`` config (paper Table 4)."""

    filter: str | None = _field(None, "Table 4 preset for the 'filtered' config (Filter, Filter1 ... Filter6); its "
                                "'longest k' cut scales with --num_rows (default: Filter; Filter3 with the embedded judge "
                                "of --preset cpu, which labels every row alike).")
    no_filter: bool = _field(False, "Write only the 'raw' config.")


@dataclasses.dataclass
class MultiTurnArguments:
    """Multi-turn conversations (paper Appendix A.1)."""

    n_turns: int = _field(2, "User turns per conversation (paper: 2).")
    end_with_user: bool = _field(False, "End conversations with a user query, no reply.")
    mt_system_prompt: str | None = _field("default", "System message shown while sampling follow-up queries "
                                          "('default': the built-in one; 'none': no system message, e.g. Gemma).")
    min_turns: int = _field(1, "Drop conversations with fewer user turns.")
    instruction_filters: str = _field("trailing_role_word,system_prompt_echo", "Comma-separated post-processing of "
                                      "queries ('none' for none).")


@dataclasses.dataclass
class PreferenceArguments:
    """Preference pairs for DPO (paper Appendix A.3)."""

    pairs: str = _field("instruct-vs-base", "instruct-vs-base: the paper's A.3; best-of-n: as the published Magpie PO sets.",
                        choices=["instruct-vs-base", "best-of-n"])
    tau: float = _field(0.0, "instruct-vs-base: keep pairs with reward difference > tau.")
    margin: float = _field(0.0, "best-of-n: keep pairs whose best-worst reward gap is > 0 and >= margin.")
    num_responses: int = _field(5, "best-of-n: answers sampled per instruction.")
    sampling_temperature: float = _field(0.8, "best-of-n: temperature of those answers.")
    test_size: float = _field(0.02, "Share of pairs in the test split (at least one).")


@dataclasses.dataclass
class RayArguments:
    """Run the stages on a Ray cluster."""

    ray: str | None = _field(None, "Run on Ray: alone or 'local' (RAY_ADDRESS or a new local cluster), 'auto' (the "
                             "cluster 'ray start' runs here), or 'ray://HEAD:10001'.", nargs="?", const="local")
    ray_replicas: int | None = _field(None, "Actors (model replicas) per stage (default: as many as the cluster fits).")
    ray_num_cpus: float | None = _field(None, "CPUs per actor (default: what the step declares, 1).")
    ray_num_gpus: float | None = _field(None, "GPUs per actor (default: what the step declares: tensor_parallel_size "
                                        "for vLLM, 1 for a model on CUDA, else 0).")
    ray_stage: list[str] = _field([], "Per-stage overrides STEP:KEY=VALUE[,KEY=VALUE] with keys replicas, num_cpus, "
                                  "num_gpus, e.g. responses:replicas=4,num_gpus=2.")
    ray_max_restarts: int = _field(2, "Restarts of a crashed actor (or one whose engine died) before the stage fails.")
    ray_startup_timeout: float = _field(600.0, "Seconds a stage waits for its actors to be scheduled and started "
                                        "(model loading not included) before it fails naming what could not be scheduled.")

    def executor(self) -> Any:
        """The local executor, or a :class:`~magpie_hf.executors.ray.RayExecutor` when ``ray`` is set."""
        from magpie_hf.executors import LocalExecutor

        if self.ray is None:
            return LocalExecutor()
        from magpie_hf.executors.ray import RayExecutor, RayStageResources

        default = RayStageResources(replicas=self.ray_replicas, num_cpus=self.ray_num_cpus, num_gpus=self.ray_num_gpus)
        stages: dict[str, RayStageResources] = {}
        for text in self.ray_stage:
            name, values = parse_stage_resources(text)
            stages[name] = dataclasses.replace(stages.get(name, default), **values)
        return RayExecutor(None if self.ray == "local" else self.ray, default=default, stages=stages,
                           max_restarts=self.ray_max_restarts, max_task_retries=self.ray_max_restarts,
                           startup_timeout_s=self.ray_startup_timeout)


@dataclasses.dataclass
class HubArguments:
    """Publishing to the Hugging Face Hub (without a token, the dataset stays in the output folder)."""

    push_to_hub: str | None = _field(None, "Publish the dataset to this Hub dataset repository (user/name).")
    version: str | None = _field(None, "Semantic version X.Y.Z; the commit is tagged vX.Y.Z (required with --push_to_hub).")
    private: bool = _field(False, "Create the Hub repository private.")
    revision: str | None = _field(None, "Commit to this branch instead of main.")
    force: bool = _field(False, "Move an existing version tag instead of refusing.")
    license: str | None = _field(None, "License of the dataset (a Hub license id); default: the license of the "
                                       "models that wrote the rows (e.g. llama3, apache-2.0).")

    def __post_init__(self) -> None:
        if self.version is not None:
            from magpie_hf.hub.publishing import parse_version

            try:
                self.version = parse_version(self.version)
            except ValueError as err:
                raise ValueError(f"--version: {err}") from None

    def check(self) -> None:
        """Refuse ``push_to_hub`` without ``version``, or with a malformed repo id, before hours of generation, not
        after (the token and the tag are checked when the run starts: :func:`magpie_hf.hub.publishing.check_publish`)."""
        if self.push_to_hub is None:
            return
        from magpie_hf.hub.publishing import _REPO_ID

        if not _REPO_ID.match(self.push_to_hub):
            raise ValueError(f"--push_to_hub {self.push_to_hub!r} is not a Hub repository id: expected 'user/name' "
                             "(letters, digits, '-', '_', '.').")
        if not self.version:
            raise ValueError("--push_to_hub needs --version X.Y.Z (the tag that pins this version, e.g. --version 1.0.0)")


#: the allowed range of each numeric setting, by field name: (low, low inclusive, high, high inclusive); a
#: bound of None is open. :func:`check_limits` holds every section to it, so a bad value stops before any
#: model loads with the flag and its range named.
LIMITS: dict[str, tuple[float | None, bool, float | None, bool]] = {
    **dict.fromkeys(("temperature", "response_temperature", "sampling_temperature"), (0, True, None, False)),
    **dict.fromkeys(("top_p", "response_top_p", "gpu_memory_utilization"), (0, False, 1, True)),
    **dict.fromkeys(("response_repetition_penalty", "first_token_temperature_scale", "request_timeout"),
                    (0, False, None, False)),
    **dict.fromkeys(("num_rows", "shard_size", "instruction_max_tokens", "response_max_tokens", "thinking_budget",
                     "answer_budget", "judge_reward_samples", "judge_max_tokens", "max_model_len",
                     "tensor_parallel_size", "tagging_tensor_parallel_size", "max_n_per_request", "batch_size",
                     "n_turns", "min_turns", "ray_replicas"), (1, True, None, False)),
    **dict.fromkeys(("seed", "max_retries", "ray_max_restarts", "ray_num_cpus", "ray_num_gpus", "margin"),
                    (0, True, None, False)),
    "num_responses": (2, True, None, False),
    "test_size": (0, False, 1, False),
}


def check_limits(section: Any) -> None:
    """Refuse a value of ``section`` outside its :data:`LIMITS`, naming the flag and the range.

    Example:
        >>> check_limits(InstructionArguments(temperature=-0.5))
        Traceback (most recent call last):
        ...
        ValueError: --temperature must be >= 0, got -0.5
    """
    for f in dataclasses.fields(section):
        limit = LIMITS.get(f.name)
        value = getattr(section, f.name)
        if limit is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, low_in, high, high_in = limit
        too_low = low is not None and (value < low if low_in else value <= low)
        too_high = high is not None and (value > high if high_in else value >= high)
        if too_low or too_high or value != value:  # NaN is never in range
            parts = [f"{'>=' if low_in else '>'} {low:g}" if low is not None else "",
                     f"{'<=' if high_in else '<'} {high:g}" if high is not None else ""]
            raise ValueError(f"--{f.name} must be {' and '.join(p for p in parts if p)}, got {value}")


def parse_stage_resources(text: str) -> tuple[str, dict[str, float]]:
    """``"responses:replicas=4,num_gpus=2"`` -> ``("responses", {"replicas": 4, "num_gpus": 2.0})``.

    Example:
        >>> parse_stage_resources("language:replicas=1,num_cpus=2")
        ('language', {'replicas': 1, 'num_cpus': 2.0})
    """
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise ValueError(f"--ray_stage: expected STEP:KEY=VALUE[,KEY=VALUE], got {text!r}")
    values: dict[str, float] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in ("replicas", "num_cpus", "num_gpus"):
            raise ValueError(f"--ray_stage: unknown key {key!r} in {text!r}; use replicas, num_cpus or num_gpus")
        try:
            values[key] = int(value) if key == "replicas" else float(value)
        except ValueError:
            raise ValueError(f"--ray_stage: {key} needs a number, got {value!r} in {text!r}") from None
    return name, values


def read_task_prompts(path: str | None) -> dict[str, str] | None:
    """``--task_prompts FILE.json``: a JSON object of strings."""
    if path is None:
        return None
    try:
        prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read --task_prompts {path}: {err}") from None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ValueError(f"--task_prompts {path} must hold a JSON object of strings {{key: prompt}}")
    return prompts
