"""The command line, one module per command: :mod:`~magpie_hf.cli.app` (``magpie-hf`` and its subcommands),
:mod:`~magpie_hf.cli.template` (``magpie-hf template``), :mod:`~magpie_hf.cli.push` (``magpie-hf push``),
:mod:`~magpie_hf.cli.recipes` (``magpie-hf pro|air|mt|po|reasoning|sft|dpo``), and
:mod:`~magpie_hf.cli.command`, which every entry (the recipe scripts' ``main`` too) runs its body in: logging set up
once, a :class:`~magpie_hf.errors.MagpieError` turned into ``error: <message>`` and an exit status.

The library never exits; only this package does.
"""

from magpie_hf.cli.app import build_parser, main
from magpie_hf.cli.command import command_line

__all__ = ["build_parser", "command_line", "main"]
