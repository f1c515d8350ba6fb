"""Options from a YAML file, command-line flags on top, checked against a dataclass."""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import yaml

from tailorgpt.artifacts import UserError

CONVERTERS = {"Path": Path, "str": str, "int": int, "float": float, "bool": bool}


def converter(type_name: str) -> type:
    """The constructor for a dataclass field's annotation, e.g. 'int | None' -> int."""
    return CONVERTERS[type_name.split("|")[0].strip()]


def load_config(path: Path, options: type) -> dict[str, Any]:
    """Read `path` as a mapping of option names to values, converted to the fields' types."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read the config ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: the config must be a mapping of option: value")
    known = {f.name: f for f in fields(options)}
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f": did you mean '{close[0]}'?" if close else f": options are {sorted(known)}"
            raise UserError(f"{path}: unknown option '{name}'{hint}")
        convert = converter(str(known[name].type))
        if convert is bool and not isinstance(value, bool):
            raise UserError(f"{path}: {name}: {value!r} is not true or false")
        try:
            converted[name] = None if value is None else convert(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{path}: {name}: {value!r} is not a valid {convert.__name__}"
            ) from None
    return converted


def merge_options(options: type, config: dict[str, Any], flags: dict[str, Any]) -> Any:
    """Dataclass defaults, then the config file, then the flags given on the command line."""
    values = {**config, **flags}
    missing = [
        f.name
        for f in fields(options)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values
    ]
    if missing:
        names = ", ".join(f"--{name.replace('_', '-')}" for name in missing)
        raise UserError(f"missing {names}: give it on the command line or in --config")
    return options(**values)
