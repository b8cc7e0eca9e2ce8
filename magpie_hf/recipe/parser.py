"""Parse a recipe's typed configuration from flags and ``--config FILE.yaml``, TRL style.

Precedence, lowest first: the dataclasses' defaults, the recipe's paper-scale defaults, what
``--preset cpu`` changes, the YAML file, the command line. The YAML file is a flat mapping of field
names to values (the same names as the flags), as TRL's ``--config`` files are; a list of settings
may stand where a flag takes a spec string (``mixture``). Unknown keys are refused with the closest
known name.

Example:
    >>> from magpie_hf.recipe.arguments import RunArguments, InstructionArguments
    >>> parser = ConfigParser((RunArguments, InstructionArguments), defaults={"num_rows": 100})
    >>> run, instructions = parser.parse(["--temperature", "0.7", "--num-rows", "8"])
    >>> run.num_rows, instructions.temperature
    (8, 0.7)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from magpie_hf.errors import ConfigError
from magpie_hf.utils.redaction import redact
from magpie_hf.utils.serialization import jsonable


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` as written: the description keeps its lines (a recipe's usage examples), reST ``double backticks``
    show as `single` ones, and "(default: X)" is added once, only to a help text that does not name its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace("``", "`")
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ConfigParser:
    """:class:`transformers.HfArgumentParser` over ``sections`` plus ``--config FILE.yaml`` and presets.

    Args:
        sections: the argument dataclasses, in the order :meth:`parse` returns them.
        defaults: field defaults that replace the dataclasses' own (a recipe's paper settings).
        presets: ``{name: {field: value}}`` applied over ``defaults`` when ``--preset name`` is given
            (on the command line or in the YAML file).
        prog, description: for ``--help``.
    """

    def __init__(
        self,
        sections: Sequence[type],
        *,
        defaults: Mapping[str, Any] | None = None,
        presets: Mapping[str, Mapping[str, Any]] | None = None,
        prog: str | None = None,
        description: str | None = None,
    ) -> None:
        self.sections = tuple(sections)
        self.defaults = dict(defaults or {})
        self.presets = {name: dict(values) for name, values in (presets or {}).items()}
        self.fields = {f.name: section for section in self.sections for f in dataclasses.fields(section)}
        unknown = sorted(set(self.defaults).union(*self.presets.values()) - set(self.fields))
        if unknown:
            raise ConfigError(f"defaults name fields that no section has: {unknown}")
        self._prog, self._description = prog, description
        self._new_parser()  # a mistake in a section (a field argparse cannot take) shows here

    def _new_parser(self) -> Any:
        """A fresh parser per parse, so defaults set for one command line never leak into the next."""
        from transformers import HfArgumentParser

        description = self._description.replace("``", "`") if self._description else self._description
        parser = HfArgumentParser(self.sections, prog=self._prog, description=description,
                                  formatter_class=HelpFormatter)
        parser.add_argument("--config", default=None, metavar="FILE.yaml",
                            help="YAML file of settings (the flags' names); flags override it")
        return parser

    #: where a value came from, lowest precedence first (:attr:`sources`)
    LEVELS = ("default", "preset", "file", "flag")

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """The section instances for ``argv`` (default: ``sys.argv[1:]``).

        Afterwards :attr:`sources` maps each field to where its value came from (an index into
        :attr:`LEVELS`: 0 default, 1 the preset, 2 the ``--config`` file, 3 a flag). Values from a file or
        a preset are held to the same ``choices`` as flags.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        path = _flag_value(argv, "--config")
        from_file = load_yaml_config(path, self.fields) if path else {}
        preset = _flag_value(argv, "--preset") or from_file.get("preset") or self.defaults.get("preset")
        known = self._preset_names()
        if preset is not None and known and preset not in known:
            where = "--preset" if _flag_value(argv, "--preset") else f"'preset' in --config {path}"
            raise ConfigError(f"{where}: unknown preset {preset!r}; choose among {', '.join(sorted(known))}.")
        values = dict(self.defaults)
        sources = dict.fromkeys(self.fields, 0)
        if preset in self.presets:
            values.update(self.presets[preset])
            sources.update(dict.fromkeys(self.presets[preset], 1))
        values.update(from_file)
        sources.update(dict.fromkeys((k for k in from_file if k in self.fields), 2))
        sources.update(dict.fromkeys(_flag_names(argv, self.fields), 3))
        parser = self._new_parser()
        parser.set_defaults(**values)
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
        self.sources = sources
        sections = tuple(parsed[: len(self.sections)])
        for section in sections:
            check_choices(section)
        return sections

    def _preset_names(self) -> set[str]:
        """The presets ``--preset`` takes: those given to the parser plus the field's own choices and default."""
        names = set(self.presets)
        section = self.fields.get("preset")
        if section is not None:
            field = next(f for f in dataclasses.fields(section) if f.name == "preset")
            names.update(field.metadata.get("choices") or ())
            if isinstance(field.default, str):
                names.add(field.default)
        return names

    def format_help(self) -> str:
        return self._new_parser().format_help()


def load_yaml_config(path: str | Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A flat YAML mapping of field names to values; unknown names are refused with the closest one."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read --config {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a YAML mapping of settings, e.g. 'temperature: 0.8'")
    unknown = [key for key in data if key not in fields and key != "preset"]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(fields), n=1) for k in unknown}
        named = ", ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
        raise ConfigError(f"--config {path} has unknown settings {named}; see --help for the names.")
    return data


def check_choices(section: Any) -> None:
    """Refuse a value outside a field's ``choices`` (argparse checks those of flags only, not those of a
    ``--config`` file or a preset)."""
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--{f.name} {value!r} is not one of the choices: {', '.join(map(str, choices))}.")


def _flag_names(argv: Sequence[str], fields: Mapping[str, Any]) -> set[str]:
    """The fields ``argv`` sets (``--name``, ``--name=V``, ``--name-with-dashes``, ``--no_name`` of a boolean)."""
    names = set()
    for item in argv:
        if not item.startswith("--"):
            continue
        name = item[2:].split("=", 1)[0].replace("-", "_")
        if name in fields:
            names.add(name)
        elif name.startswith("no_") and name[3:] in fields:
            names.add(name[3:])
    return names


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag VALUE`` or ``--flag=VALUE``; the last one wins, as in
    argparse), removing every occurrence when it is ``--config``."""
    value, i = None, 0
    while i < len(argv):
        item, width = argv[i], 0
        if item == flag and i + 1 < len(argv):
            value, width = argv[i + 1], 2
        elif item.startswith(flag + "="):
            value, width = item.split("=", 1)[1], 1
        if width and flag == "--config":
            del argv[i : i + width]
            continue
        i += width or 1
    return value


def to_yaml(*sections: Any) -> str:
    """The resolved configuration as a YAML file that ``--config`` reads back (one comment per section)."""
    blocks = []
    for section in sections:
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        body = yaml.safe_dump(jsonable(values), sort_keys=False, allow_unicode=True, width=120)
        blocks.append(f"# {type(section).__name__}\n{body}")
    return "\n".join(blocks)


def parse_json_object(text: str | dict | None, flag: str) -> dict[str, Any] | None:
    """A JSON object given on the command line (or already a dict from YAML); None stays None. The one parser of
    JSON-object flags (``--chat_template_kwargs`` and friends, ``magpie-hf template --chat-template-kwargs``).

    Example:
        >>> parse_json_object('{"enable_thinking": false}', "--chat_template_kwargs")
        {'enable_thinking': False}
        >>> parse_json_object("[1]", "--chat_template_kwargs")
        Traceback (most recent call last):
        ...
        ValueError: --chat_template_kwargs must be a JSON object such as '{"enable_thinking": false}', got '[1]'
    """
    if text is None or isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"enable_thinking\": false}}': {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}")
    return value


def recipe_command(argv: Sequence[str] | None = None) -> str:
    """The command line that ran this recipe, for provenance (secrets masked: :func:`magpie_hf.utils.redaction.redact`)."""
    return redact(shlex.join(["python", *(sys.argv if argv is None else argv)]))
