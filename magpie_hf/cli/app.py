"""The ``magpie-hf`` command.

Each subcommand is a module of :mod:`magpie_hf.cli` (``template``, ``push``, the recipes) that exposes
``register_cli(subparsers)``, which adds its parser and sets ``func`` to the function that runs it. A
:class:`~magpie_hf.errors.MagpieError` ends as one ``error:`` line (:func:`magpie_hf.cli.command.command_line`).

Example:
    $ magpie-hf template HuggingFaceTB/SmolLM2-135M-Instruct
    $ magpie-hf push runs/pro/dataset me/magpie-pro --version 1.0.0
    $ magpie-hf pro --preset cpu            # recipes/magpie_pro.py; also air, mt, po, reasoning, sft, dpo
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from magpie_hf import __version__
    from magpie_hf.cli import push, recipes, template

    parser = argparse.ArgumentParser(prog="magpie-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"magpie-hf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (template, push, recipes):
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from magpie_hf.cli.command import command_line
    from magpie_hf.cli.recipes import RECIPES, run_recipe_script

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RECIPES:  # every argument after it, --help included, belongs to the recipe
        with command_line(logs=False):  # the script sets up its own
            return run_recipe_script(RECIPES[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    with command_line(logging.DEBUG if args.verbose else logging.INFO):
        return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
