"""``magpie-hf pro|air|mt|po|reasoning|sft|dpo [ARGS]``: the recipe scripts, run from an installed wheel as TRL runs its
scripts as ``trl sft``.

The scripts are the files of ``recipes/`` (a source checkout) or their copy in the wheel (``magpie_hf/recipes``): the
command runs the same file as ``python recipes/<name>.py ARGS``, with every argument passed through (``--help``
included). ``--config NAME`` also takes the name of a shipped configuration, without its folder or ``.yaml``
(``magpie-hf pro --config qwen2.5-72b-instruct``, ``magpie-hf sft --config sft_llama3_8b``).

Example:
    $ magpie-hf pro --preset cpu
    $ magpie-hf pro --config qwen2.5-72b-instruct --dry_run
    $ magpie-hf sft --preset cpu --dataset_name runs/magpie_pro/dataset
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from magpie_hf.errors import ConfigError

#: command -> script name in recipes/
RECIPES = {
    "pro": "magpie_pro",
    "air": "magpie_air",
    "mt": "magpie_mt",
    "po": "magpie_po",
    "reasoning": "magpie_reasoning",
    "sft": "sft",
    "dpo": "dpo",
}


def recipes_dir() -> Path:
    """``<checkout>/recipes`` in a source checkout (editable installs), else the copy inside the installed package."""
    here = Path(__file__).resolve().parents[1]  # magpie_hf/
    for candidate in (here.parent / "recipes", here / "recipes"):
        if (candidate / "magpie_pro.py").is_file():
            return candidate
    raise FileNotFoundError(f"The recipe scripts are neither in {here.parent / 'recipes'} nor in {here / 'recipes'}; "
                            "reinstall magpie-hf.")


def resolve_config(value: str, script: str, root: Path | None = None) -> str:
    """A ``--config`` value: an existing file as it is, else a shipped configuration of ``script`` by name.

    Example:
        >>> Path(resolve_config("qwen2.5-72b-instruct", "magpie_pro")).relative_to(recipes_dir()).as_posix()
        'configs/magpie_pro/qwen2.5-72b-instruct.yaml'
    """
    if Path(value).is_file():
        return value
    root = root or recipes_dir()
    name = value[:-5] if value.endswith(".yaml") else value
    for candidate in (root / "configs" / script / f"{name}.yaml", root / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    shipped = sorted(p.stem for p in [*(root / "configs" / script).glob("*.yaml"), *root.glob(f"{script}_*.yaml")])
    raise ConfigError(f"--config {value}: no such file, and no shipped configuration of that name for {script}; "
                      f"shipped: {', '.join(shipped) or 'none'}")


def run_recipe_script(script: str, argv: list[str]) -> int:
    """Run ``recipes/<script>.py`` with ``argv`` as ``python recipes/<script>.py ARGV`` would."""
    root = recipes_dir()
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_config(argv[i + 1], script, root)
        elif arg.startswith("--config="):
            argv[i] = "--config=" + resolve_config(arg.split("=", 1)[1], script, root)
    path = root / f"{script}.py"
    saved_argv = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        raise
    finally:
        sys.argv = saved_argv
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    for command, script in RECIPES.items():
        parser = subparsers.add_parser(command, add_help=False, help=f"run recipes/{script}.py (--help for its options)")
        parser.add_argument("args", nargs=argparse.REMAINDER)
        parser.set_defaults(func=lambda args, script=script: run_recipe_script(script, args.args))
