"""Command-line options from dataclasses, and from YAML.

Each field is an option as transformers' HfArgumentParser makes it (`--name` and
`--name-with-dashes`, `--flag` or `--flag false` for a bool), built with plain argparse:
importing transformers takes seconds, and the command line should answer at once.

A field's metadata holds its help text and its other spellings ("aliases"); a field with a
"positional" metavar is given without a flag. `--config FILE.yaml` stands for the options in
the file, written before the flags given, which therefore override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from artifacts import UserError

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with its default where it has one (a help text says what an option left
    unset does); the spellings of an option share one metavar: `--output_dir, --output DIR`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, []) or action.required:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"


def parse_bool(text: str) -> bool:
    """`--flag yes` and `--flag no`, in HfArgumentParser's spellings."""
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {text} but expected one of yes/no, true/false, t/f, y/n, "
        "1/0 (case insensitive)."
    )


def field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def option_arguments(field: dataclasses.Field, kind: Any) -> dict[str, Any]:
    """add_argument()'s keywords for an option: its type, default and how many values."""
    default = field_default(field)
    arguments = {k: v for k, v in field.metadata.items() if k != "aliases"}
    if default is dataclasses.MISSING:
        arguments["required"] = True
    else:
        arguments["default"] = default
    if kind in (bool, bool | None):
        arguments["type"] = parse_bool
        if default is not None:  # `--flag` alone means true
            arguments.update(nargs="?", const=True)
        return arguments
    values = [value for value in get_args(kind) if value is not type(None)]
    if get_origin(kind) in (types.UnionType, Union) and len(values) == 1:
        kind = values[0]  # X | None: an option left unset is None
    if get_origin(kind) is Literal:
        arguments["choices"] = get_args(kind)
    elif get_origin(kind) is list:
        arguments.update(type=get_args(kind)[0], nargs="+")
    else:
        arguments["type"] = kind
    return arguments


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its dataclasses' fields, positional ones included, and --config."""

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any) -> None:
        # No abbreviations: `--conf` would pass for --config without reading the file, and an
        # abbreviation that works today turns ambiguous when an option is added.
        kwargs.update(formatter_class=HelpFormatter, allow_abbrev=False)
        super().__init__(**kwargs)
        self.dataclass_types = list(dataclass_types)
        for options in self.dataclass_types:
            kinds = get_type_hints(options)
            for field in dataclasses.fields(options):
                self.add_field(field, kinds[field.name])
        self.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="read these options from a YAML file (option: value); flags given override it",
        )

    def add_field(self, field: dataclasses.Field, kind: Any) -> None:
        metavar = field.metadata.get("positional")
        if metavar is None:
            spellings = [f"--{field.name}"]
            if "_" in field.name:
                spellings.append(f"--{field.name.replace('_', '-')}")
            spellings += field.metadata.get("aliases", [])
            self.add_argument(*spellings, **option_arguments(field, kind))
            return
        nargs = None
        if get_origin(kind) is list:
            (kind,), nargs = get_args(kind), "+"
        help_text = field.metadata["help"]
        self.add_argument(field.name, type=kind, nargs=nargs, metavar=metavar, help=help_text)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """`--config FILE` replaced by the file's options, first, so that flags override them."""
        finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        finder.add_argument("--config", type=Path)
        found, rest = finder.parse_known_args(args)
        if found.config:
            rest = config_arguments(found.config, self.dataclass_types) + rest
        return super().parse_known_args(rest, namespace)


def as_options(options: type[T], args: argparse.Namespace) -> T:
    """The dataclass `options` filled from the parsed arguments."""
    return options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options)})


def option_names(options: Sequence[type]) -> dict[str, str]:
    """Every spelling of every option (without dashes, `-` read as `_`) -> its field name."""
    names = {}
    for kind in options:
        for field in dataclasses.fields(kind):
            if "positional" not in field.metadata:
                for spelling in [field.name, *field.metadata.get("aliases", [])]:
                    names[spelling.lstrip("-").replace("-", "_")] = field.name
    return names


def config_arguments(path: Path, options: Sequence[type]) -> list[str]:
    """The options in a YAML file, as the flags they stand for; a null value is left unset."""
    names = option_names(options)
    arguments = []
    for key, value in read_mapping(path).items():
        name = names.get(str(key).replace("-", "_"))
        if name is None:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"options are {sorted(names)}"
            raise UserError(f"{path}: unknown option '{key}': {hint}")
        if isinstance(value, dict):
            raise UserError(f"{path}: {key}: give a value or a list, not a mapping")
        if value is not None:
            arguments += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return arguments


def read_mapping(path: Path) -> dict[Any, Any]:
    import yaml  # only a --config needs it

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read the config ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: the config must be a mapping of option: value")
    return values
