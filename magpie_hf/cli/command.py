"""What every command-line entry (``magpie-hf``, a recipe script's ``main``) does around its body, once: set up
logging, and turn a :class:`~magpie_hf.errors.MagpieError` into one ``error: <message>`` line on stderr and exit
status 1 (``--debug``: the traceback instead).

Library code raises; only this turns an error into an exit. A recipe script reads::

    def main(argv=None) -> int:
        with command_line() as cli:
            config = parse_recipe(RECIPE, argv)
            cli.debug = config.run.debug          # from here on, --debug shows the traceback
            return run_recipe(config, build(config), outputs(config))

Example:
    >>> from magpie_hf.errors import ConfigError
    >>> with command_line(logs=False) as cli:
    ...     raise ConfigError("--num_rows must be >= 1")
    Traceback (most recent call last):
    ...
    SystemExit: error: --num_rows must be >= 1
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator

from magpie_hf.errors import MagpieError

#: added to a run's error (once the configuration was read, so that --debug can be given)
DEBUG_HINT = "\n(rerun with --debug for the traceback)"


@dataclasses.dataclass
class CommandLine:
    """The state of one command: ``debug`` is None until its configuration was read, then ``--debug``."""

    debug: bool | None = None


@contextlib.contextmanager
def command_line(level: int = logging.INFO, *, logs: bool = True) -> Iterator[CommandLine]:
    """Set up logging (:func:`magpie_hf.utils.logs.setup_logging` at ``level``; ``logs=False`` leaves it) and end a
    :class:`~magpie_hf.errors.MagpieError` raised in the body as ``SystemExit("error: <message>")``: Python prints
    the message on stderr and exits with status 1. After ``cli.debug`` is set, the message adds how to see the
    traceback, and with ``cli.debug`` true the error propagates as it is."""
    if logs:
        from magpie_hf.utils.logs import setup_logging

        setup_logging(level)
    cli = CommandLine()
    try:
        yield cli
    except MagpieError as err:
        if cli.debug:
            raise
        raise SystemExit(f"error: {err}{'' if cli.debug is None else DEBUG_HINT}") from None
