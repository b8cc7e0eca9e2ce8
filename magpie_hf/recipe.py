"""What every recipe shares: its typed configuration, presets, the steps it builds, and how it runs.

A recipe script (``recipes/magpie_pro.py`` and friends) declares a :class:`Recipe` (its name, its
paper-scale defaults, what ``--preset cpu`` changes, the argument sections it takes beyond the common
ones), parses a :class:`RecipeConfig` with :func:`parse_recipe` (flags and ``--config FILE.yaml``,
:mod:`magpie_hf.cli_config`), builds its steps from that config with :func:`generation_steps`,
:func:`tagging_steps` and friends, and hands them to :func:`run_recipe`, which handles ``--dry-run``,
the hardware check, the run on the chosen executor, the dataset folder, the card and publishing.

``--preset cpu`` swaps in the embedded SmolLM2-135M-Instruct for every model (``"embedded"``), the
embedded all-MiniLM-L6-v2 for embeddings, the judge as the reward (``"judge"``) and small sizes, so
a recipe finishes on a laptop CPU in minutes.

Example:
    >>> from magpie_hf.recipe import Recipe, parse_recipe
    >>> recipe = Recipe(name="demo", description="", paper={"model": "meta-llama/Meta-Llama-3-8B-Instruct", "num_rows": 1000})
    >>> config = parse_recipe(recipe, ["--preset", "cpu", "--response_temperature", "0.6"])
    >>> config.run.num_rows, config.instructions.model, config.responses.response_temperature
    (40, 'embedded', 0.6)
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from magpie_hf.config import (
    TAGGING_STAGES,
    EngineArguments,
    FilterArguments,
    HubArguments,
    InstructionArguments,
    MultiTurnArguments,
    RayArguments,
    ReasoningArguments,
    ResponseArguments,
    RunArguments,
    TaggingArguments,
    parse_json_object,
    read_task_prompts,
)
from magpie_hf.engines import EngineConfig, resolve_backend
from magpie_hf.hardware import Hardware
from magpie_hf.redaction import redact
from magpie_hf.steps.base import MissingColumnsError, Step, StepChain

if TYPE_CHECKING:
    import datasets

    from magpie_hf.pipeline import Pipeline
    from magpie_hf.task_prompts import TaskMix

logger = logging.getLogger(__name__)

#: the sections every generation recipe takes
COMMON_SECTIONS: tuple[type, ...] = (
    RunArguments,
    InstructionArguments,
    ResponseArguments,
    TaggingArguments,
    EngineArguments,
    RayArguments,
    HubArguments,
)

#: the paper's models and sizes, shared by the recipes (arXiv 2406.08464 Section 3; the official
#: generator's max_tokens 2048 / 4096)
PAPER_DEFAULTS: dict[str, Any] = {
    "engine": "vllm",
    "shard_size": 10_000,
    "instruction_max_tokens": 2048,
    "response_max_tokens": 4096,
    "judge_model": "meta-llama/Meta-Llama-3-8B-Instruct",
    "guard_model": "meta-llama/Meta-Llama-Guard-2-8B",
    "reward_model": "sfairXC/FsfairX-LLaMA3-RM-v0.1",
    "embedding_model": "sentence-transformers/all-mpnet-base-v2",
    "base_model": "meta-llama/Meta-Llama-3-8B",
}

#: what ``--preset cpu`` changes in every recipe: the embedded model everywhere, small sizes
CPU_PRESET: dict[str, Any] = {
    "model": "embedded",
    "gguf_file": None,
    "engine": "transformers",
    "tensor_parallel_size": 1,
    # the paper's T=1.0-1.25 derails the 135M model (see EMBEDDED_MIXTURE)
    "mixture": "embedded",
    "newline_stop": False,
    "instruction_max_tokens": 192,
    "response_max_tokens": 256,
    "shard_size": 40,
    "num_rows": 40,
    "judge_model": "embedded",
    "guard_model": "embedded",
    "reward_model": "judge",
    "embedding_model": "embedded",
    "base_model": "embedded",
    # the 135M judge's explanations are noise; the label alone is a few tokens instead of a hundred
    "judge_explanations": False,
}

#: the ``--filter`` default, and the one under ``--preset cpu``: the 135M judge gives (nearly) every
#: row the same quality and difficulty label, so a preset with a quality condition would keep nothing
DEFAULT_FILTER = "Filter"
EMBEDDED_FILTER = "Filter3"
#: the stand-in name of the embedded models
EMBEDDED = "embedded"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe's identity and defaults.

    Args:
        name: the script's name (``magpie_pro``); the default output folder is ``runs/<name>``.
        description: for ``--help``.
        paper: field -> value at paper scale (over :data:`PAPER_DEFAULTS`).
        cpu: field -> value under ``--preset cpu`` (over :data:`CPU_PRESET`).
        sections: argument sections beyond :data:`COMMON_SECTIONS`.
        stages: the tagging stages it runs by default.
        choose_stages: whether ``--stages`` chooses them (False: the recipe's stages are fixed, ``--stages`` is refused).
    """

    name: str
    description: str
    paper: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cpu: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sections: tuple[type, ...] = ()
    stages: tuple[str, ...] = ()
    choose_stages: bool = True


@dataclasses.dataclass
class RecipeConfig:
    """A recipe's resolved configuration: one instance of each argument section."""

    recipe: Recipe
    run: RunArguments
    instructions: InstructionArguments
    responses: ResponseArguments
    tagging: TaggingArguments
    engine: EngineArguments
    ray: RayArguments
    hub: HubArguments
    #: the recipe's own sections, by class
    extra: dict[type, Any] = dataclasses.field(default_factory=dict)
    #: the command line, for provenance (secrets masked)
    command: str = ""

    def section(self, cls: type) -> Any:
        """The recipe-specific section of class ``cls``."""
        return self.extra[cls]

    @property
    def sections(self) -> list[Any]:
        return [self.run, self.instructions, self.responses, self.tagging, self.engine, *self.extra.values(),
                self.ray, self.hub]

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.recipe.name}")

    @property
    def dataset_dir(self) -> Path:
        return self.output_dir / "dataset"

    def stages(self) -> list[str]:
        """The tagging stages this run does (``--stages``, else the recipe's)."""
        chosen = self.run.stage_list()
        return list(self.recipe.stages) if chosen is None else [s for s in TAGGING_STAGES if s in chosen]

    # -- engines -------------------------------------------------------------------------------
    def engine_config(self, model: str, *, gguf_file: str | None = None, tagging: bool = False) -> EngineConfig:
        """The engine config of ``model`` under this run's engine options (``"embedded"``: the embedded model)."""
        e = self.engine
        if model == EMBEDDED:
            # under --engine openai the tagging models run here (see below), so the embedded one is fine
            local = e.engine in (None, "auto", "transformers") or (tagging and e.engine == "openai")
            if not local:
                raise ValueError(f"The embedded model runs with the transformers engine, not --engine {e.engine}; "
                                 "pass --model/--judge_model etc. to use another engine.")
            return EngineConfig.embedded(trust_remote_code=e.trust_remote_code,
                                         **({"batch_size": e.batch_size} if e.batch_size else {}))
        backend = e.engine or "auto"
        if tagging and backend == "openai":  # a completions server rarely serves the helper models too
            backend = "auto"
        kwargs: dict[str, Any] = dict(
            model=model,
            backend=backend,
            gguf_file=gguf_file,
            dtype=e.dtype,
            gpu_memory_utilization=e.gpu_memory_utilization,
            max_model_len=e.max_model_len,
            quantization=e.quantization,
            tensor_parallel_size=(e.tagging_tensor_parallel_size if tagging else e.tensor_parallel_size) or 1,
            # auto picks the server when a URL is given; tagging models run locally unless --engine says openai
            base_url=e.base_url if backend == "openai" or (backend == "auto" and not tagging) else None,
            max_n_per_request=e.max_n_per_request,
            timeout_s=e.request_timeout,
            max_retries=e.max_retries,
            trust_remote_code=e.trust_remote_code,
        )
        if e.batch_size:
            kwargs["batch_size"] = e.batch_size
        if self.needs_first_token_rules():
            # vLLM loads magpie_hf's first-step logits processor (other backends ignore the flag); every
            # engine of the run gets it, so a model shared by two stages stays one engine
            kwargs["first_token_rules"] = True
        return EngineConfig(**kwargs)

    def needs_first_token_rules(self) -> bool:
        """Whether step 1 asks for a first-step logits rule (``--no_markdown_start``,
        ``--first_token_temperature_scale``)."""
        i = self.instructions
        return bool(i.no_markdown_start) or i.first_token_temperature_scale != 1.0

    def instruction_engine(self) -> EngineConfig:
        return self.engine_config(self.instructions.model or EMBEDDED, gguf_file=self.instructions.gguf_file)

    def response_engine(self) -> EngineConfig:
        r = self.responses
        if r.response_model in (None, self.instructions.model) and r.response_gguf_file in (None, self.instructions.gguf_file):
            return self.instruction_engine()
        return self.engine_config(r.response_model or EMBEDDED, gguf_file=r.response_gguf_file)

    def judge_engine(self) -> EngineConfig:
        return self.engine_config(self.tagging.judge_model or EMBEDDED, tagging=True)

    def guard_engine(self) -> EngineConfig:
        return self.engine_config(self.tagging.guard_model or EMBEDDED, tagging=True)

    def base_engine(self) -> EngineConfig:
        return self.engine_config(self.tagging.base_model or EMBEDDED, tagging=True)

    def task_mix(self) -> "TaskMix | None":
        """The task-control mixture asked for (``--task`` / ``--task_mix`` / ``--task_prompts``), or None;
        under ``--language`` its prompts are the language's own (:func:`magpie_hf.languages.localize_task_prompts`)."""
        from magpie_hf.task_prompts import TaskMix

        i = self.instructions
        if i.task and i.task_mix:
            raise ValueError("Give --task KEY or --task_mix KEY=W,..., not both.")
        spec = i.task or i.task_mix
        if spec is None:
            if i.task_prompts is not None:
                raise ValueError("--task_prompts needs --task KEY or --task_mix KEY=W,... to choose among them")
            return None
        mix = TaskMix.from_spec(spec, prompts=read_task_prompts(i.task_prompts))
        language = i.target_language()
        if language is None:
            return mix
        from magpie_hf.languages import localize_task_prompts

        return TaskMix(mix.weights, localize_task_prompts(mix.prompts, language))

    def instruction_system_prompt(self) -> str | None:
        """Step 1's system prompt: ``--system_prompt``, else under ``--language`` (and no task control) the
        language's prompt (:data:`magpie_hf.languages.LANGUAGE_SYSTEM_PROMPTS`), else none (the paper's)."""
        i = self.instructions
        language = i.target_language()
        if i.system_prompt is not None or language is None or i.task or i.task_mix:
            return i.system_prompt
        from magpie_hf.languages import language_system_prompt

        return language_system_prompt(language)

    def to_yaml(self) -> str:
        """The resolved configuration as a file that ``--config`` reads back."""
        from magpie_hf.cli_config import to_yaml

        return to_yaml(*self.sections)


def parse_recipe(recipe: Recipe, argv: Sequence[str] | None = None) -> RecipeConfig:
    """Parse and resolve a recipe's configuration; bad values stop here, before any model loads."""
    from magpie_hf.cli_config import ConfigError, ConfigParser

    sections = (*COMMON_SECTIONS[:5], *recipe.sections, *COMMON_SECTIONS[5:])
    parser = ConfigParser(
        sections,
        defaults={**PAPER_DEFAULTS, "output_dir": f"runs/{recipe.name}", **recipe.paper},
        presets={"cpu": {**CPU_PRESET, **recipe.cpu}},
        prog=f"python recipes/{recipe.name}.py",
        description=recipe.description,
    )
    try:
        parsed = parser.parse(argv)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    by_class = dict(zip(sections, parsed))
    config = RecipeConfig(
        recipe=recipe,
        **{name: by_class[cls] for name, cls in zip(
            ("run", "instructions", "responses", "tagging", "engine", "ray", "hub"), COMMON_SECTIONS)},
        extra={cls: by_class[cls] for cls in recipe.sections},
        command=recipe_command(None if argv is None else ["recipes/" + recipe.name + ".py", *argv]),
    )
    try:
        _resolve(config, parser.sources)
    except ValueError as err:
        if config.run.debug:
            raise
        raise SystemExit(f"error: {err}") from None
    return config


def _resolve(config: RecipeConfig, sources: Mapping[str, int] | None = None) -> None:
    """Fill what the flags left to the recipe (every field concrete, so ``--dry-run`` shows the run) and
    check what can be checked before any model loads. ``sources`` says where each value came from
    (:attr:`magpie_hf.cli_config.ConfigParser.sources`: 0 default, 1 preset, 2 file, 3 flag)."""
    from magpie_hf.config import check_limits

    sources = sources or {}
    run, i, r = config.run, config.instructions, config.responses
    for section in config.sections:
        check_limits(section)  # every number in its range, the flag named
    if run.num_rows is None:
        raise ValueError("--num_rows must be >= 1")
    run.shard_size = min(run.shard_size or run.num_rows, run.num_rows)
    run.output_dir = str(config.output_dir)
    _resolve_decoding(i, sources)
    _check_conflicts(config)
    i.model = i.model or EMBEDDED
    r.response_model = r.response_model or i.model
    if r.response_model == i.model and r.response_gguf_file is None:
        r.response_gguf_file = i.gguf_file
    if config.engine.tensor_parallel_size is None:
        config.engine.tensor_parallel_size = 1
    if FilterArguments in config.extra:
        f = config.section(FilterArguments)
        f.filter = f.filter or (EMBEDDED_FILTER if config.tagging.judge_model in (None, EMBEDDED) else DEFAULT_FILTER)
        from magpie_hf.steps.filters import preset_filter

        preset_filter(f.filter)  # an unknown --filter stops here, with the presets named
    if ReasoningArguments in config.extra:
        reasoning = config.section(ReasoningArguments)
        reasoning.tags()
        r.response_max_tokens = reasoning.max_tokens()  # what a response may use in all
    # validations: each raises ValueError with the flag to change
    if config.run.stages is not None and not config.recipe.choose_stages:
        raise ValueError(f"{config.recipe.name} runs fixed stages ({', '.join(config.recipe.stages) or 'no tagging'}); "
                         "drop --stages (tag its output with the tagging steps in Python if you need more).")
    if config.engine.base_url and (config.engine.engine or "auto") not in ("auto", "openai"):
        raise ValueError(f"--base_url is read by --engine openai (or auto), not --engine {config.engine.engine}; "
                         "add --engine openai to send the requests to that server.")
    i.decoding_mixture()
    i.template_kwargs()
    r.template_kwargs()
    judge_chat_template_kwargs(config)
    if i.target_language() is not None and i.pre_query_template is not None:
        raise ValueError("--language puts a system prompt in the chat template, which an explicit --pre_query_template "
                         "bypasses; drop --pre_query_template (or write the language's system block into it and drop --language).")
    config.instruction_system_prompt()
    if config.task_mix() is not None and (i.system_prompt is not None or i.pre_query_template is not None):
        raise ValueError("--task/--task_mix puts a system prompt per task into the chat template; drop "
                         "--system_prompt and --pre_query_template (or write your prompts into --task_prompts FILE.json).")
    config.stages()
    config.hub.check()
    config.ray.executor()  # parses --ray_stage


def _resolve_decoding(i: InstructionArguments, sources: Mapping[str, int]) -> None:
    """One step-1 decoding rule: ``--temperature``/``--top_p`` given above the mixture's level (a flag over a
    preset's or recipe's mixture) replace it, said in the log; a mixture given above them wins and they are
    cleared; both at one level (both flags, or both in one file) are refused with the way out. What is left is
    what runs and what the card shows."""
    if isinstance(i.mixture, str) and i.mixture.strip().lower() == "none":
        i.mixture = None
    single = max(sources.get("temperature", 0), sources.get("top_p", 0))
    if i.mixture is not None and single > 0:
        level = sources.get("mixture", 0)
        if single == level:
            where = "flags" if level == 3 else "the same --config file" if level == 2 else "the preset"
            raise ValueError(f"--mixture {i.mixture!r} and --temperature/--top_p are both given (in {where}): use "
                             "--mixture none to sample at one --temperature/--top_p, or drop --temperature/--top_p "
                             "to sample the mixture.")
        if single > level:
            logger.info("--temperature/--top_p replace the %s's step-1 mixture %r (pass --mixture again to keep it)",
                        ("recipe", "preset", "config file")[level], i.mixture)
            i.mixture = None
    if i.mixture is None:
        i.temperature = 1.0 if i.temperature is None else i.temperature
        i.top_p = 1.0 if i.top_p is None else i.top_p
    else:
        i.temperature = i.top_p = None  # the mixture decides; the record shows no unused value


def _check_conflicts(config: RecipeConfig) -> None:
    """Flags that contradict each other are refused, with the one to drop."""
    run = config.run
    if run.instructions_only and run.stages is not None:
        raise ValueError("--instructions_only stops before the tagging stages that --stages chooses; drop one of them.")
    if FilterArguments in config.extra:
        f = config.section(FilterArguments)
        if f.no_filter and f.filter is not None:
            raise ValueError(f"--no_filter writes no 'filtered' config, so --filter {f.filter} would not run; drop one of them.")
        if run.instructions_only and f.filter is not None:
            raise ValueError(f"--instructions_only writes no responses or tags to filter; drop --filter {f.filter}.")
    if MultiTurnArguments in config.extra:
        mt = config.section(MultiTurnArguments)
        if mt.min_turns > mt.n_turns:
            raise ValueError(f"--min_turns {mt.min_turns} is more than --n_turns {mt.n_turns}: every conversation "
                             "would be dropped; lower --min_turns or raise --n_turns.")
    e = config.engine
    if e.engine == "openai" and not e.base_url:
        raise ValueError("--engine openai needs --base_url URL, the server's OpenAI-compatible address "
                         "(e.g. --base_url http://127.0.0.1:8000/v1).")
    _check_output_dir(config.output_dir)
    for flag, model in (("--model", config.instructions.model), ("--response_model", config.responses.response_model),
                        ("--judge_model", config.tagging.judge_model), ("--guard_model", config.tagging.guard_model),
                        ("--base_model", config.tagging.base_model), ("--embedding_model", config.tagging.embedding_model)):
        _check_model(flag, model)
    if config.tagging.reward_model not in (None, "judge"):
        _check_model("--reward_model", config.tagging.reward_model)


def _check_output_dir(path: Path) -> None:
    """``--output_dir`` must be a folder this user can write (or one that can be made)."""
    import os

    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {path} is a file, not a folder; choose a folder (it is made when missing).")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {path}: {parent} is not writable here; choose a folder you can write to.")


def _check_model(flag: str, model: str | None) -> None:
    """A model named as a local path must exist; a Hub id must be well formed (whether it exists is the Hub's
    to say when it loads)."""
    if model in (None, EMBEDDED):
        return
    path = Path(model).expanduser()
    looks_local = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or path.exists()
    if looks_local:
        if not path.exists():
            raise ValueError(f"{flag} {model}: no such folder; give a model folder or a Hub id such as "
                             "meta-llama/Meta-Llama-3-8B-Instruct.")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError as err:
        raise ValueError(f"{flag} {model!r} is neither a folder here nor a valid Hub id ({err})") from None


def recipe_command(argv: Sequence[str] | None = None) -> str:
    """The command line that ran this recipe, for provenance (secrets masked: :func:`magpie_hf.redaction.redact`)."""
    return redact(shlex.join(["python", *(sys.argv if argv is None else argv)]))


def check_hardware(config: RecipeConfig) -> None:
    """Stop early, with the way out, when this machine cannot run the recipe's models (a Ray cluster
    is judged when it starts)."""
    if config.ray.ray is not None:
        return
    hardware = Hardware.local()
    engines = [config.instruction_engine(), config.response_engine()]
    if not any(resolve_backend(e, hardware, log=False) == "vllm" for e in engines):
        return
    engine = engines[0]
    if not hardware.cuda:
        raise SystemExit(
            f"This run uses {engine.model} with vLLM on {engine.tensor_parallel_size} GPU(s), and no CUDA GPU was found.\n"
            f"  Try it on this CPU:    python recipes/{config.recipe.name}.py --preset cpu\n"
            f"  Or pick a model/engine: --model MODEL --engine transformers   (or --engine openai --base_url URL)"
        )
    if not hardware.vllm:
        raise SystemExit("The vLLM engine needs vllm: pip install 'magpie-hf[vllm]'  (or pass --engine transformers)")


# -- steps -------------------------------------------------------------------------------------
def instruction_filters(config: RecipeConfig, extra: Sequence[Any] = ()) -> tuple[Any, ...]:
    """Post-processing of instructions: ``--sanitize``'s filters (the official Llama-3.x / Gemma-2 rules,
    chosen by the instruction model's name) plus ``extra``."""
    from magpie_hf.postprocess import sanitize_family, sanitize_filters

    i = config.instructions
    filters = [*(sanitize_filters(sanitize_family(i.model)) if i.sanitize else ()), *extra]
    return tuple({f.name: f for f in filters}.values())


def instruction_step(config: RecipeConfig, *, postprocess: Sequence[Any] = ()) -> Step:
    """Magpie step 1 with the run's model, mixture, lengths, stops (``--newline_stop``), first-token rules
    (``--no_markdown_start``, ``--first_token_temperature_scale``), task control and post-processing
    (``--sanitize``)."""
    from magpie_hf.steps import MagpieInstructions

    i = config.instructions
    kwargs: dict[str, Any] = dict(
        engine=config.instruction_engine(),
        num_rows=config.run.num_rows,
        mixture=i.decoding_mixture(),
        max_tokens=i.instruction_max_tokens,
        system_prompt=config.instruction_system_prompt(),
        keep_default_system_prompt=i.keep_default_system_prompt,
        pre_query_template=i.pre_query_template,
        chat_template_kwargs=i.template_kwargs(),
        newline_stop=i.newline_stop,
        no_markdown_start=i.no_markdown_start,
        first_token_temperature_scale=i.first_token_temperature_scale,
        seed=config.run.seed,
    )
    task = config.task_mix()
    filters = instruction_filters(config, postprocess)
    if task is not None or filters:
        from magpie_hf.task_prompts import TaskControlledInstructions

        return TaskControlledInstructions(task=task, postprocess=filters, **kwargs)
    return MagpieInstructions(**kwargs)


def _template_kwargs(config: RecipeConfig, own: str | None, flag: str, model: str | None) -> dict[str, Any] | None:
    """A stage's own ``flag`` options; else ``--chat_template_kwargs`` when the stage runs the instruction model."""
    if own is not None:
        return parse_json_object(own, flag)
    return config.instructions.template_kwargs() if (model or EMBEDDED) == (config.instructions.model or EMBEDDED) else None


def response_chat_template_kwargs(config: RecipeConfig) -> dict[str, Any] | None:
    """``--response_chat_template_kwargs``; else ``--chat_template_kwargs`` when one model writes both sides."""
    r = config.responses
    return _template_kwargs(config, r.response_chat_template_kwargs, "--response_chat_template_kwargs", r.response_model)


def judge_chat_template_kwargs(config: RecipeConfig) -> dict[str, Any] | None:
    """``--judge_chat_template_kwargs``; else ``--chat_template_kwargs`` when the judge is the instruction model."""
    t = config.tagging
    return _template_kwargs(config, t.judge_chat_template_kwargs, "--judge_chat_template_kwargs", t.judge_model)


def response_step(config: RecipeConfig) -> Step:
    """Magpie step 2 with the run's response model and sampling; a reasoning recipe (one with
    :class:`~magpie_hf.config.ReasoningArguments`) splits the thinking off (:class:`~magpie_hf.steps.reasoning.ReasoningResponses`)."""
    from magpie_hf.steps import Responses

    r = config.responses
    kwargs: dict[str, Any] = dict(
        engine=config.response_engine(),
        temperature=r.response_temperature,
        top_p=r.response_top_p,
        repetition_penalty=r.response_repetition_penalty,
        chat_template_kwargs=response_chat_template_kwargs(config),
    )
    if ReasoningArguments in config.extra:
        from magpie_hf.steps.reasoning import ReasoningResponses

        reasoning = config.section(ReasoningArguments)
        return ReasoningResponses(thinking_budget=reasoning.thinking_budget, answer_budget=reasoning.answer_budget,
                                  reasoning_tags=reasoning.tags(), **kwargs)
    return Responses(max_tokens=r.response_max_tokens, **kwargs)


def language_steps(config: RecipeConfig) -> StepChain:
    """Under ``--language``: tag the instructions' language (counting the target's rows), and with
    ``--keep_language_only`` keep only the target's rows, before any response is generated."""
    from magpie_hf.steps import Condition, Filter, Language

    language = config.instructions.target_language()
    if language is None:
        return StepChain()
    chain = StepChain([Language(target=language)])
    if config.instructions.keep_language_only:
        chain = chain >> Filter(conditions=[Condition("language", "==", language)], name="keep_language")
    return chain


def generation_steps(config: RecipeConfig, *, postprocess: Sequence[Any] = (), responses: bool = True) -> StepChain:
    """Magpie step 1, the ``--language`` tag (and filter), and step 2 (not with ``--instructions_only`` or
    ``responses=False``)."""
    chain = StepChain([instruction_step(config, postprocess=postprocess)]) >> language_steps(config)
    return chain if config.run.instructions_only or not responses else chain >> response_step(config)


def tagging_steps(config: RecipeConfig, *, reward_difference: bool = False) -> StepChain:
    """The paper's dataset analysis, the stages of :meth:`RecipeConfig.stages` in order: task category,
    quality, difficulty, safety, language, reward (and, with ``reward_difference``, base responses and
    the reward difference), minimum-neighbour distance."""
    from magpie_hf.steps import (
        BaseResponses,
        Difficulty,
        InputQuality,
        Language,
        LlamaGuard,
        Neighbors,
        RewardDifference,
        TaskCategory,
    )

    stages = config.stages()
    judge_options: dict[str, Any] = {"explanations": config.tagging.judge_explanations,
                                     "chat_template_kwargs": judge_chat_template_kwargs(config)}
    if config.tagging.judge_max_tokens:
        judge_options["max_tokens"] = config.tagging.judge_max_tokens
    chain = StepChain()
    if "task_category" in stages:
        chain = chain >> TaskCategory(engine=config.judge_engine(), **judge_options)
    if "input_quality" in stages:
        chain = chain >> InputQuality(engine=config.judge_engine(), **judge_options)
    if "difficulty" in stages:
        chain = chain >> Difficulty(engine=config.judge_engine(), **judge_options)
    if "safety" in stages:
        chain = chain >> LlamaGuard(engine=config.guard_engine())  # taxonomy from the model name (Guard 2 or 3)
    if "language" in stages and config.instructions.language is None:  # --language tags right after step 1
        chain = chain >> Language()
    if "reward" in stages or reward_difference:
        chain = chain >> reward_step(config, name="instruct_reward")
    if reward_difference:
        chain = (
            chain
            >> BaseResponses(engine=config.base_engine(), max_tokens=config.responses.response_max_tokens)
            >> reward_step(config, name="base_reward", response_column="base_output",
                           output_column="base_reward", model_column="base_reward_model")
            >> RewardDifference()
        )
    if "neighbors" in stages:
        model = config.tagging.embedding_model or EMBEDDED
        chain = chain >> (Neighbors.embedded() if model == EMBEDDED else Neighbors(model=model))
    return chain


def reward_step(config: RecipeConfig, *, name: str, **columns: str) -> Step:
    """The reward step: the ``--reward_model`` (a sequence-classification RM), or with ``"judge"`` the
    judge model rating responses 1-10 (``JudgeReward``, the mean of ``--judge_reward_samples`` ratings).

    ``columns`` renames the columns it reads and writes (``response_column``, ``output_column``,
    ``model_column``), e.g. to score ``base_output`` into ``base_reward``.
    """
    from magpie_hf.steps import JudgeReward, RewardModel

    model = config.tagging.reward_model or "judge"
    if model == "judge":
        return JudgeReward(engine=config.judge_engine(), num_samples=config.tagging.judge_reward_samples,
                           chat_template_kwargs=judge_chat_template_kwargs(config), name=name, **columns)
    return RewardModel(model=model, trust_remote_code=config.engine.trust_remote_code, name=name, **columns)


def filter_step(config: RecipeConfig, steps: Sequence[Step] = ()) -> Step:
    """The ``--filter`` preset, its length cut scaled by this run's size against the paper's, after the
    conditions every trainable config needs on the columns ``steps`` write
    (:func:`~magpie_hf.steps.filters.hygiene_conditions`: no error, no truncated response, guard-safe)."""
    from magpie_hf.steps.filters import hygiene_conditions, preset_filter

    paper_rows = config.recipe.paper.get("num_rows") or config.run.num_rows
    columns = [c for step in steps for c in step.output_features()]
    return preset_filter(config.section(FilterArguments).filter, scale=config.run.num_rows / paper_rows,
                         before=hygiene_conditions(columns))


def hygiene_step(steps: Sequence[Step]) -> Step:
    """For a recipe without a ``--filter`` preset (magpie_mt, magpie_reasoning): a filter of only
    :func:`~magpie_hf.steps.filters.hygiene_conditions` on the columns ``steps`` write, which makes the ``filtered``
    config (no errored, truncated or guard-unsafe row)."""
    from magpie_hf.steps.filters import Filter, hygiene_conditions

    return Filter(conditions=hygiene_conditions([c for step in steps for c in step.output_features()]), name="filtered")


def filtered_and_raw(pipeline: "Pipeline", last: "datasets.Dataset", extra: dict[str, Any] | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dataset configs of a run whose last stage is a filter: ``filtered`` (the default, first) and ``raw`` (the
    stage before it), with the filter report. An empty ``filtered`` is left out with a warning (``datasets`` cannot
    load an empty split)."""
    report = filter_report(pipeline.manifest()["stages"][-1])
    configs = {"filtered": last, "raw": pipeline.stage_dataset(len(pipeline.steps) - 2)}
    if len(last) == 0:
        del configs["filtered"]
        logger.warning("The filter removed every row (%s); writing only the 'raw' config.",
                       ", ".join(f"{r['condition']}: {r['removed']}" for r in report))
    return configs, {**(extra or {}), "filter_report": report}


def filter_needs_reward_difference(name: str) -> bool:
    from magpie_hf.steps.filters import FILTER_PRESETS

    return any(c.column == "reward_difference" for c in FILTER_PRESETS[name].conditions)


def filter_report(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{condition, removed}]`` of a finished filter stage, from its manifest counts (in order)."""
    prefix = "removed: "
    return [{"condition": k[len(prefix):], "removed": v} for k, v in stage.get("stats", {}).items() if k.startswith(prefix)]


# -- running -----------------------------------------------------------------------------------
#: what a recipe returns after its pipeline ran: the dataset's configs and extra provenance
Finish = Callable[["Pipeline", "datasets.Dataset"], tuple[dict[str, Any], dict[str, Any]]]


def run_recipe(config: RecipeConfig, steps: StepChain, finish: Finish | None = None) -> int:
    """Run ``steps`` as ``config`` says and write (and maybe publish) the dataset.

    ``finish(pipeline, last_stage)`` returns the dataset's configs (``{"raw": ...}``) and extra
    provenance for the card; by default the last stage is the ``raw`` config.
    """
    try:
        return _run_recipe(config, steps, finish)
    except user_errors() as err:
        if config.run.debug:
            raise
        raise SystemExit(f"error: {err}\n(rerun with --debug for the traceback)") from None


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user's settings, files, servers or Hub cause: a recipe ends them in one ``error: ...``
    message and a non-zero status (``--debug`` shows the traceback)."""
    from magpie_hf.embedded import EmbeddedModelMissing
    from magpie_hf.engines.openai import OpenAIServerError
    from magpie_hf.hub.publishing import PublishError
    from magpie_hf.layout import PipelineMismatchError, RunLockedError
    from magpie_hf.templates import ChatTemplateError

    return (PipelineMismatchError, RunLockedError, OpenAIServerError, PublishError, ChatTemplateError,
            EmbeddedModelMissing)


def _run_recipe(config: RecipeConfig, steps: StepChain, finish: Finish | None) -> int:
    from magpie_hf.pipeline import Pipeline

    pipeline = Pipeline(steps, config.output_dir, shard_size=config.run.shard_size, seed=config.run.seed,
                        overwrite=config.run.overwrite)
    try:
        pipeline.check_columns()
    except MissingColumnsError as err:
        raise SystemExit(f"error: {err}\nIn a recipe: add the stages that write them to --stages, or, when the "
                         "filter needs them, choose another --filter or pass --no_filter.") from None
    executor = config.ray.executor()
    if config.run.dry_run:
        import yaml

        print(dataclasses.replace(config, run=dataclasses.replace(config.run, dry_run=False)).to_yaml())
        print("# stage plan (nothing was loaded)")
        print(yaml.safe_dump({"stages": pipeline.plan(executor)}, sort_keys=False, allow_unicode=True, width=120))
        return 0
    check_hardware(config)
    if config.hub.push_to_hub:  # token, repo and tag, before hours of generation (the Hub, when reachable)
        from magpie_hf.hub.publishing import check_publish

        check_publish(config.hub.push_to_hub, config.hub.version or "", force=config.hub.force)
    last = pipeline.run(executor=executor)
    configs, extra = finish(pipeline, last) if finish else ({"raw": last}, {})

    from magpie_hf.hub import save_dataset_folder

    info = run_info(config, pipeline.manifest(), **extra)
    # the card's license: --license, else the license of the models that wrote the rows (info["models"])
    folder = save_dataset_folder(config.dataset_dir, configs, info, license=config.hub.license)
    print(f"Wrote {', '.join(f'{name}: {_rows(ds)} rows' for name, ds in configs.items())} to {folder}")
    result = publish_or_hint(config.hub, folder)
    if config.hub.push_to_hub and (result is None or not result.pushed):
        print(f"error: the dataset was not pushed to {config.hub.push_to_hub} (see above); it is kept at {folder}.",
              file=sys.stderr)
        return 1  # the request was not met: a scheduler must not see success
    return 0


def language_report(config: RecipeConfig, stages: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Under ``--language``: the target, its system prompt and the share of step-1 rows lingua tagged as
    it (from the first ``Language`` stage), and how many rows ``--keep_language_only`` removed."""
    i = config.instructions
    language = i.target_language()
    if language is None:
        return None
    report: dict[str, Any] = {"language": language, "system_prompt": config.instruction_system_prompt(),
                              "keep_language_only": i.keep_language_only}
    tagged = next((s for s in stages if s.get("step") == "Language"), None)
    if tagged is not None:
        rows, hits = tagged.get("rows_in", 0), tagged.get("stats", {}).get("target_language_rows", 0)
        report.update(rows_tagged=rows, rows_in_language=hits, share=round(hits / rows, 4) if rows else None)
    kept = next((s for s in stages if s.get("stage", "").endswith("keep_language")), None)
    if kept is not None:
        report["rows_removed"] = kept.get("rows_in", 0) - kept.get("rows_out", 0)
    return report


def reproducibility_report(backends: Iterable[str], stages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the run's seed guarantees, for the card: per engine backend used, and whether vLLM ran
    batch-invariant (``vllm_batch_invariant`` in the stages' provenance, recorded where each stage ran).

    Example:
        >>> report = reproducibility_report(["vllm"], [{"provenance": {"vllm_batch_invariant": False}}])
        >>> report["vllm_batch_invariant"], report["statements"][0][:33]
        (False, 'Every row owns its sampling seeds')
    """
    used = sorted(set(backends))
    flags = {s["provenance"]["vllm_batch_invariant"] for s in stages if "vllm_batch_invariant" in (s.get("provenance") or {})}
    invariant = None if not flags else (flags == {True})
    statements = [
        "Every row owns its sampling seeds (from the run seed, its stage and its row; recorded in the row), so a "
        "resumed, re-sharded or distributed run draws the same random numbers for every row. It redraws the same "
        "text only where the model also computes the same logits for that row:"
    ]
    if "transformers" in used:
        statements.append(
            "transformers: each completion samples from its own generator, so its draws do not depend on its batch; "
            "its logits can (padding and batch shape change floating-point sums, most in bf16 on GPU). A rerun with "
            "the same shard and batch sizes, hardware and library versions redraws the same text; a re-sharded one "
            "can differ in some rows."
        )
    if "vllm" in used or invariant is not None:
        if invariant:
            statements.append(
                "vLLM ran batch-invariant (VLLM_BATCH_INVARIANT=1): a row's logits do not depend on the other requests "
                "in its batch, so a rerun with the same model, vLLM version, GPU type and tensor parallelism redraws "
                "the same text."
            )
        else:
            statements.append(
                "vLLM ran without batch invariance: a row's logits depend on which requests were batched with it, so a "
                "resumed or re-sharded run can draw different text from the same seeds. VLLM_BATCH_INVARIANT=1 (beta; "
                "compute capability 9.0+ GPUs such as H100/H200) makes them independent of the batch."
            )
    if {"openai", "openai-chat"} & set(used):
        statements.append(
            "OpenAI-compatible server: each request carries its row's seed; whether the server honours it and batches "
            "invariantly is the server's."
        )
    return {"backends": used, "vllm_batch_invariant": invariant, "statements": statements}


def reasoning_report(stages: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """For a reasoning run: the thinking tags and budgets, and how many responses had, lacked or lost a
    thinking block (from the ``ReasoningResponses`` stage)."""
    stage = next((s for s in stages if s.get("step") == "ReasoningResponses"), None)
    if stage is None:
        return None
    counts = stage.get("stats", {})
    keys = ("with_reasoning", "without_reasoning", "dropped_cut_reasoning", "dropped_unclosed_reasoning",
            "dropped_reasoning_over_budget", "dropped_empty_answer")
    return {**(stage.get("provenance") or {}).get("reasoning", {}), **{k: counts.get(k, 0) for k in keys}}


def _rows(dataset: Any) -> int:
    return sum(len(split) for split in dataset.values()) if isinstance(dataset, dict) else len(dataset)


def publish_or_hint(hub: HubArguments, folder: Path) -> Any:
    """Publish ``folder`` when ``--push_to_hub`` was given (the :class:`~magpie_hf.hub.PublishResult`); otherwise
    print how to load and push it (None)."""
    from magpie_hf.hub import finish_recipe

    return finish_recipe(folder, repo_id=hub.push_to_hub, version=hub.version, private=hub.private,
                  revision=hub.revision, force=hub.force)


def run_info(config: RecipeConfig, manifest: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Provenance for the dataset card: models, templates, sampling, seeds, stage counts, the resolved
    configuration and the command."""
    from magpie_hf import __version__

    stages = manifest.get("stages", [])
    provenance = stages[0].get("provenance", {}) if stages else {}
    models = {"instruct": config.instruction_engine().describe()}
    engines = [config.instruction_engine()]
    if not config.run.instructions_only:
        engines.append(config.response_engine())
    if config.responses.response_model != config.instructions.model:
        models["response"] = config.response_engine().describe()
    chosen = config.stages()
    if {"task_category", "input_quality", "difficulty"} & set(chosen):
        models["judge"] = config.judge_engine().describe()
        engines.append(config.judge_engine())
    if "safety" in chosen:
        models["guard"] = config.guard_engine().describe()
        engines.append(config.guard_engine())
    if "reward" in chosen:
        reward = config.tagging.reward_model or "judge"
        models["reward"] = f"{config.judge_engine().describe()} as a 1-10 judge" if reward == "judge" else reward
    info: dict[str, Any] = {
        "recipe": config.recipe.name,
        "preset": config.run.preset,
        "command": config.command,
        "configuration": config.to_yaml(),
        "package_version": __version__,
        "seed": config.run.seed,
        "num_rows_requested": config.run.num_rows,
        "models": models,
        "engine": config.instruction_engine().backend,
        "pre_query_template": provenance.get("pre_query"),
        "decoding_mixture": [
            {"temperature": m.temperature, "top_p": m.top_p, "weight": m.weight}
            for m in config.instructions.decoding_mixture()
        ],
        "stage_stats": stages,
        "reproducibility": reproducibility_report(
            (e.backend if e.backend != "auto" else resolve_backend(e, log=False) for e in engines), stages
        ),
    }
    if not config.run.instructions_only:
        r = config.responses
        info["response_sampling"] = {"temperature": r.response_temperature, "top_p": r.response_top_p,
                                     "repetition_penalty": r.response_repetition_penalty, "max_tokens": r.response_max_tokens}
    language = language_report(config, stages)
    if language is not None:
        info["language_target"] = language
    reasoning = reasoning_report(stages)
    if reasoning is not None:
        info["reasoning"] = reasoning
    task = config.task_mix()
    if task is not None:
        info["task_control"] = {"weights": dict(task.weights), "prompts": dict(task.prompts)}
    template_kwargs = {
        s.get("name") or s["step"]: s["chat_template_kwargs"]
        for s in manifest.get("steps", [])
        if s.get("chat_template_kwargs")
    }
    if template_kwargs:
        info["chat_template_kwargs"] = template_kwargs
    models.update(extra.pop("models", {}))
    info.update(extra)
    return info
