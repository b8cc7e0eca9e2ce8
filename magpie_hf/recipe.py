"""What every recipe shares: flags, presets, hardware checks and provenance.

A recipe script (``recipes/magpie_pro.py`` and friends) declares its paper defaults as a
:class:`RecipeDefaults`, parses the shared flags with :func:`recipe_parser`, and turns them into
:class:`RecipeSettings` with :func:`resolve_settings`. ``--preset cpu`` swaps in the embedded
SmolLM2-135M-Instruct and small sizes so the recipe finishes on a laptop CPU in minutes.

Example:
    >>> from magpie_hf.recipe import RecipeDefaults, recipe_parser, resolve_settings
    >>> defaults = RecipeDefaults(name="magpie_pro", model="meta-llama/Meta-Llama-3-70B-Instruct", num_rows=1_000_000)
    >>> args = recipe_parser(defaults).parse_args(["--preset", "cpu", "--output-dir", "/tmp/run"])
    >>> resolve_settings(args, defaults).num_rows
    120
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from magpie_hf.engines import EngineConfig
from magpie_hf.steps.base import Step, StepChain
from magpie_hf.steps.generate import EMBEDDED_MIXTURE, PRO_MIXTURE, DecodingSetting

if TYPE_CHECKING:
    from magpie_hf.pipeline import Pipeline

logger = logging.getLogger(__name__)

PRESETS = ("paper", "cpu")


@dataclasses.dataclass(frozen=True)
class RecipeDefaults:
    """The paper-scale defaults of one recipe."""

    name: str
    model: str
    num_rows: int
    #: rows under ``--preset cpu``
    cpu_num_rows: int = 120
    engine: str = "vllm"
    tensor_parallel_size: int = 4
    mixture: tuple[DecodingSetting, ...] = PRO_MIXTURE
    instruction_max_tokens: int = 2048
    response_max_tokens: int = 4096
    shard_size: int = 10_000
    #: judge model for the LLM taggers (task category, quality, difficulty)
    judge_model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    reward_model: str = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
    guard_model: str = "meta-llama/Meta-Llama-Guard-2-8B"
    embedding_model: str = "sentence-transformers/all-mpnet-base-v2"
    base_model: str = "meta-llama/Meta-Llama-3-8B"
    source_model_license: str = "llama3"


#: what ``--preset cpu`` changes, whatever the recipe (besides the recipe's own ``cpu_num_rows``)
CPU_PRESET = {
    "shard_size": 40,
    "instruction_max_tokens": 192,
    "response_max_tokens": 256,
}


@dataclasses.dataclass
class RecipeSettings:
    """Resolved settings of one recipe run."""

    name: str
    preset: str
    engine: EngineConfig
    num_rows: int
    shard_size: int
    seed: int
    output_dir: Path
    mixture: tuple[DecodingSetting, ...]
    instruction_max_tokens: int
    response_max_tokens: int
    judge: EngineConfig
    base: EngineConfig
    reward_model: str | None
    guard_model: str | None
    embedding_model: str
    source_model_license: str
    command: str
    args: argparse.Namespace

    @property
    def dataset_dir(self) -> Path:
        return self.output_dir / "dataset"

    @property
    def is_cpu_preset(self) -> bool:
        return self.preset == "cpu"

    def pipeline(self, steps: "StepChain | Sequence[Step]") -> "Pipeline":
        """The run's pipeline over ``steps``: local, or on Ray when ``--ray`` was given."""
        from magpie_hf.ray import pipeline_from_args

        return pipeline_from_args(self.args, steps, self.output_dir, self.shard_size, self.seed)


def recipe_parser(defaults: RecipeDefaults, description: str | None = None) -> argparse.ArgumentParser:
    """The flags every recipe takes (the publishing flags included)."""
    parser = argparse.ArgumentParser(
        prog=f"python recipes/{defaults.name}.py",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("run")
    group.add_argument("--preset", choices=PRESETS, default="paper",
                       help="'paper': the paper's models and sizes (needs GPUs); 'cpu': the embedded SmolLM2-135M-Instruct, small sizes")
    group.add_argument("--num-rows", type=int, default=None, help=f"rows to generate (paper: {defaults.num_rows:,}; --preset cpu: {defaults.cpu_num_rows})")
    group.add_argument("--shard-size", type=int, default=None, help="rows per Parquet shard, the unit of resumption")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--output-dir", type=Path, default=Path(f"runs/{defaults.name}"),
                       help="where shards go; rerun with the same flags to resume")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help=f"chat model id or path (paper: {defaults.model})")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model (transformers engine)")
    group.add_argument("--engine", choices=("auto", "transformers", "vllm", "openai"), default=None,
                       help=f"generation backend (paper: {defaults.engine})")
    group.add_argument("--tensor-parallel-size", type=int, default=None,
                       help=f"GPUs per vLLM engine (paper: {defaults.tensor_parallel_size})")
    group.add_argument("--base-url", default=None, help="OpenAI-compatible server for --engine openai (e.g. http://127.0.0.1:8000/v1)")
    group.add_argument("--batch-size", type=int, default=None, help="prompts per generation batch (transformers engine)")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")
    group.add_argument("--pre-query-template", default=None,
                       help="raw pre-query text to use instead of the one derived from the chat template "
                            "(inspect a model first with: magpie-hf template MODEL)")
    from magpie_hf.hub import add_publish_args
    from magpie_hf.ray import add_ray_args

    add_publish_args(parser)
    add_ray_args(parser)
    return parser


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def recipe_command(argv: list[str] | None = None) -> str:
    """The command line that ran this recipe, for provenance (token-looking values masked)."""
    argv = list(sys.argv if argv is None else argv)
    masked = []
    hide_next = False
    for item in argv:
        if hide_next or item.startswith("hf_"):
            masked.append("***")
            hide_next = False
            continue
        if item in ("--token", "--hub-token"):
            hide_next = True
        masked.append(item)
    return shlex.join(["python", *masked])


def resolve_settings(args: argparse.Namespace, defaults: RecipeDefaults) -> RecipeSettings:
    """Apply the preset and overrides; fail early, clearly, when the hardware cannot run it."""
    if hasattr(args, "push_to_hub"):
        from magpie_hf.hub import validate_publish_args

        validate_publish_args(args)
    cpu = args.preset == "cpu"
    sizes = {**dataclasses.asdict(defaults), **(CPU_PRESET if cpu else {})}
    num_rows = args.num_rows if args.num_rows is not None else (defaults.cpu_num_rows if cpu else defaults.num_rows)
    shard_size = args.shard_size if args.shard_size is not None else min(sizes["shard_size"], max(num_rows, 1))
    if num_rows < 1 or shard_size < 1:
        raise SystemExit("--num-rows and --shard-size must be >= 1")

    extra: dict[str, Any] = {}
    if args.batch_size:
        extra["batch_size"] = args.batch_size
    if cpu and args.model is None:
        engine = EngineConfig.embedded(trust_remote_code=args.trust_remote_code, **extra)
        if args.engine not in (None, "auto", "transformers"):
            raise SystemExit("--preset cpu runs the embedded GGUF model with the transformers engine; drop --engine or pass --model.")
    else:
        backend = args.engine or ("auto" if cpu else defaults.engine)
        engine = EngineConfig(
            model=args.model or defaults.model,
            backend=backend,
            gguf_file=args.gguf_file,
            tensor_parallel_size=args.tensor_parallel_size or (1 if cpu else defaults.tensor_parallel_size),
            base_url=args.base_url,
            trust_remote_code=args.trust_remote_code,
            **extra,
        )
    _check_hardware(engine, defaults)

    # the helper models: the paper's, or the embedded chat model standing in under --preset cpu
    judge = engine if cpu else EngineConfig(model=defaults.judge_model, backend=engine.backend if engine.backend != "openai" else "auto")
    base = engine if cpu else EngineConfig(model=defaults.base_model, backend=judge.backend)
    return RecipeSettings(
        name=defaults.name,
        preset=args.preset,
        engine=engine,
        num_rows=num_rows,
        shard_size=shard_size,
        seed=args.seed,
        output_dir=args.output_dir,
        # the paper's mixture derails the 135M embedded model (see EMBEDDED_MIXTURE)
        mixture=EMBEDDED_MIXTURE if cpu and args.model is None else defaults.mixture,
        instruction_max_tokens=sizes["instruction_max_tokens"],
        response_max_tokens=sizes["response_max_tokens"],
        judge=judge,
        base=base,
        reward_model=None if cpu else defaults.reward_model,
        guard_model=None if cpu else defaults.guard_model,
        embedding_model="embedded" if cpu else defaults.embedding_model,
        source_model_license="apache-2.0" if cpu and args.model is None else defaults.source_model_license,
        command=recipe_command(),
        args=args,
    )


def _check_hardware(engine: EngineConfig, defaults: RecipeDefaults) -> None:
    from magpie_hf.engines import resolve_backend

    try:  # the auto rule lives in resolve_backend only; it also refuses GGUF with vLLM
        backend = resolve_backend(engine)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if backend == "vllm":
        if not _has_cuda():
            raise SystemExit(
                f"This recipe's paper settings run {engine.model} with vLLM on "
                f"{engine.tensor_parallel_size} GPU(s), and no CUDA GPU was found.\n"
                f"  Try it on this CPU:    python recipes/{defaults.name}.py --preset cpu\n"
                f"  Or pick a model/engine: --model MODEL --engine transformers   (or --engine openai --base-url URL)"
            )
        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("The vLLM engine needs vllm: pip install 'magpie-hf[vllm]'  (or pass --engine transformers)")


def run_info(settings: RecipeSettings, manifest: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Provenance for the dataset card: models, templates, sampling, seeds, stage counts, command."""
    from magpie_hf import __version__

    steps = {s["step"]: s for s in manifest.get("steps", [])}
    info: dict[str, Any] = {
        "recipe": settings.name,
        "preset": settings.preset,
        "command": settings.command,
        "package_version": __version__,
        "seed": settings.seed,
        "num_rows_requested": settings.num_rows,
        "models": {"instruct": settings.engine.describe()},
        "engine": settings.engine.backend,
        "decoding_mixture": [
            {"temperature": m.temperature, "top_p": m.top_p, "weight": m.weight} for m in settings.mixture
        ],
        "stage_stats": manifest.get("stages", []),
    }
    if "Responses" in steps:
        r = steps["Responses"]
        info["response_sampling"] = {k: r.get(k) for k in ("temperature", "top_p", "repetition_penalty", "max_tokens")}
    info.update(extra)
    return info


def generation_steps(settings: RecipeSettings, *, task: Any = None, postprocess: Sequence[Any] = ()) -> StepChain:
    """Magpie steps 1 and 2 with the recipe's model, mixture and lengths.

    ``task`` (a :class:`~magpie_hf.task_prompts.TaskMix`) steers instructions with domain system
    prompts and ``postprocess`` filters them (:mod:`magpie_hf.postprocess`).
    """
    from magpie_hf.steps import MagpieInstructions, Responses

    kwargs: dict[str, Any] = dict(
        engine=settings.engine,
        num_rows=settings.num_rows,
        mixture=settings.mixture,
        max_tokens=settings.instruction_max_tokens,
        seed=settings.seed,
        pre_query_template=settings.args.pre_query_template,
    )
    if task is not None or postprocess:
        from magpie_hf.task_prompts import TaskControlledInstructions

        instructions: Step = TaskControlledInstructions(task=task, postprocess=tuple(postprocess), **kwargs)
    else:
        instructions = MagpieInstructions(**kwargs)
    return instructions >> Responses(engine=settings.engine, max_tokens=settings.response_max_tokens)


#: the ``--filter`` default: the paper's, and the one for the embedded model under ``--preset cpu``,
#: whose 135M judge gives (nearly) every row the same quality and difficulty label, so that a preset
#: with a quality condition would keep nothing; Filter3 keeps to neighbour distance and reward
DEFAULT_FILTER = "Filter"
EMBEDDED_FILTER = "Filter3"


def add_filter_args(parser: argparse.ArgumentParser) -> None:
    """``--filter``: one of the paper's Table 4 presets for the ``filtered`` config (see :func:`filter_name`)."""
    from magpie_hf.steps.filters import FILTER_PRESETS

    parser.add_argument("--filter", default=None, choices=sorted(FILTER_PRESETS),
                        help=f"Table 4 preset for the 'filtered' config; its 'longest k' cut scales with --num-rows "
                             f"(default: {DEFAULT_FILTER}; {EMBEDDED_FILTER} under --preset cpu, whose small judge "
                             "labels every row alike)")
    parser.add_argument("--no-filter", action="store_true", help="write only the 'raw' config")


def filter_name(args: argparse.Namespace) -> str:
    """The ``--filter`` preset asked for, or the default for this run's model."""
    if args.filter:
        return args.filter
    return EMBEDDED_FILTER if args.preset == "cpu" and args.model is None else DEFAULT_FILTER


def tagging_steps(settings: RecipeSettings, *, reward_difference: bool = False) -> StepChain:
    """The paper's dataset analysis: task category, quality, difficulty, safety, language, reward,
    (optionally base responses and reward difference) and minimum-neighbour distance.

    Under ``--preset cpu`` the embedded chat model stands in for every judge, the guard and the
    base model, a generative judge gives the reward, and all-MiniLM-L6-v2 embeds.
    """
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

    cpu = settings.is_cpu_preset
    judge = settings.judge
    guard = settings.engine if cpu else EngineConfig(model=settings.guard_model, backend=judge.backend)
    chain = (
        TaskCategory(engine=judge)
        >> InputQuality(engine=judge)
        >> Difficulty(engine=judge)
        >> LlamaGuard(engine=guard, taxonomy="llama-guard-2")
        >> Language()
    )

    chain = chain >> reward_step(settings, name="instruct_reward")
    if reward_difference:
        base_tokens = min(settings.response_max_tokens, 128) if cpu else settings.response_max_tokens
        chain = (
            chain
            >> BaseResponses(engine=settings.base, max_tokens=base_tokens)
            >> reward_step(settings, name="base_reward", response_column="base_output",
                           output_column="base_reward", model_column="base_reward_model")
            >> RewardDifference()
        )
    neighbors = Neighbors.embedded() if settings.embedding_model == "embedded" else Neighbors(model=settings.embedding_model)
    return chain >> neighbors


#: ratings averaged per response by the generative judge reward (a small judge's greedy rating is
#: nearly binary; the mean of 5 breaks most ties between instruct and base responses)
JUDGE_REWARD_SAMPLES = 5


def reward_step(settings: RecipeSettings, *, name: str, reward_model: str | None = None, **columns: str) -> Step:
    """The reward step: a sequence-classification reward model (``reward_model`` or the recipe's), or,
    under ``--preset cpu`` where there is none, the judge model rating responses 1-10 (``JudgeReward``,
    the mean of :data:`JUDGE_REWARD_SAMPLES` sampled ratings).

    ``columns`` renames the columns it reads and writes (``response_column``, ``output_column``,
    ``model_column``), e.g. to score ``base_output`` into ``base_reward``.
    """
    from magpie_hf.steps import JudgeReward, RewardModel

    model = reward_model or settings.reward_model
    if model is None:
        return JudgeReward(engine=settings.judge, num_samples=JUDGE_REWARD_SAMPLES, name=name, **columns)
    return RewardModel(model=model, trust_remote_code=settings.engine.trust_remote_code, name=name, **columns)


def filter_step(settings: RecipeSettings, defaults: RecipeDefaults) -> Step:
    """The ``--filter`` preset, its length cut scaled by this run's size against the paper's."""
    from magpie_hf.steps.filters import preset_filter

    return preset_filter(settings.args.filter, scale=settings.num_rows / defaults.num_rows)


def filter_needs_reward_difference(name: str) -> bool:
    from magpie_hf.steps.filters import FILTER_PRESETS

    return any(c.column == "reward_difference" for c in FILTER_PRESETS[name].conditions)


def filter_report(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{condition, removed}]`` of a finished filter stage, from its manifest counts (in order)."""
    prefix = "removed: "
    return [{"condition": k[len(prefix):], "removed": v} for k, v in stage.get("stats", {}).items() if k.startswith(prefix)]
