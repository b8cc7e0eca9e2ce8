"""A recipe's configuration: its identity and presets (:class:`Recipe`), the resolved settings of one run
(:class:`RecipeConfig`), and :func:`parse_recipe`, which reads flags and ``--config FILE.yaml``
(:mod:`magpie_hf.recipe.parser`) into it, fills what the flags left open and refuses bad values before any
model loads (:class:`~magpie_hf.errors.ConfigError`, the flag named).

``--preset cpu`` swaps in the embedded SmolLM2-135M-Instruct for every model (``"embedded"``), the
embedded all-MiniLM-L6-v2 for embeddings, the judge as the reward (``"judge"``) and small sizes, so
a recipe finishes on a laptop CPU in minutes.

Example:
    >>> recipe = Recipe(name="demo", description="", paper={"model": "meta-llama/Meta-Llama-3-8B-Instruct", "num_rows": 1000})
    >>> config = parse_recipe(recipe, ["--preset", "cpu", "--response_temperature", "0.6"])
    >>> config.run.num_rows, config.instructions.model, config.responses.response_temperature
    (40, 'embedded', 0.6)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from magpie_hf.engines import EngineConfig
from magpie_hf.errors import ConfigError
from magpie_hf.recipe.arguments import (
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
    check_limits,
    read_task_prompts,
)
from magpie_hf.recipe.parser import ConfigParser, parse_json_object, recipe_command

if TYPE_CHECKING:
    from magpie_hf.prompts.tasks import TaskMix

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
        under ``--language`` its prompts are the language's own (:func:`magpie_hf.prompts.languages.localize_task_prompts`)."""
        from magpie_hf.prompts.tasks import TaskMix

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
        from magpie_hf.prompts.languages import localize_task_prompts

        return TaskMix(mix.weights, localize_task_prompts(mix.prompts, language))

    def instruction_system_prompt(self) -> str | None:
        """Step 1's system prompt: ``--system_prompt``, else under ``--language`` (and no task control) the
        language's prompt (:data:`magpie_hf.prompts.languages.LANGUAGE_SYSTEM_PROMPTS`), else none (the paper's)."""
        i = self.instructions
        language = i.target_language()
        if i.system_prompt is not None or language is None or i.task or i.task_mix:
            return i.system_prompt
        from magpie_hf.prompts.languages import language_system_prompt

        return language_system_prompt(language)

    def to_yaml(self) -> str:
        """The resolved configuration as a file that ``--config`` reads back."""
        from magpie_hf.recipe.parser import to_yaml

        return to_yaml(*self.sections)


def parse_recipe(recipe: Recipe, argv: Sequence[str] | None = None) -> RecipeConfig:
    """Parse and resolve a recipe's configuration; bad values stop here, before any model loads."""
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
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
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
    except ConfigError:
        raise
    except ValueError as err:  # a value a section or a step refused: the flag is named in the message
        raise ConfigError(str(err)) from err
    return config


def _resolve(config: RecipeConfig, sources: Mapping[str, int] | None = None) -> None:
    """Fill what the flags left to the recipe (every field concrete, so ``--dry-run`` shows the run) and
    check what can be checked before any model loads. ``sources`` says where each value came from
    (:attr:`magpie_hf.recipe.parser.ConfigParser.sources`: 0 default, 1 preset, 2 file, 3 flag)."""
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


