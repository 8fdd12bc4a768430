"""Options from dataclasses: command-line flags and YAML files from one definition.

Each command declares its options as a dataclass whose fields carry ``help`` metadata.
``add_options`` turns the fields into ``--kebab-case`` flags (defaults shown in ``--help``);
``resolve`` layers, for every command alike::

    built-in defaults (the dataclass)  <  preset (a :class:`Preset`)  <  YAML file (--config)  <  flags

so a value set in the YAML file or on the command line always wins over a preset (the embedded
default run's settings, the online command's built-in task settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from miopt.errors import MioptError

T = TypeVar("T")


class ConfigError(MioptError, ValueError):
    """Bad option value or config file; the message names the file and the key."""


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text (shown in ``--help``)."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: default.copy(), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) for annotations like ``int``, ``str | None``, ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _owner_groups(parser: argparse.ArgumentParser, schema: type) -> dict[str, argparse._ArgumentGroup]:
    """One ``--help`` section per dataclass in ``schema``'s hierarchy, most specific first."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for cls in schema.__mro__:
        if not dataclasses.is_dataclass(cls):
            continue
        doc = cls.__dict__.get("__doc__") or ""
        if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses puts where no docstring is
            doc = ""
        title = (doc or "options").strip().splitlines()[0].rstrip(".").replace("``", "")
        group = parser.add_argument_group(title)
        for name in cls.__dict__.get("__annotations__", {}):
            groups.setdefault(name, group)
    return groups


def finite_float(text: str) -> float:
    """argparse type of float options: a finite number (NaN and infinity are refused up front)."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_finite_floats(options: Any) -> None:
    """Every float option of the dataclass ``options`` is finite (flags, YAML and code alike)."""
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        kind, is_list = _base_type(hints[field.name])
        value = getattr(options, field.name)
        if kind is not float or value is None:
            continue
        for item in value if is_list else [value]:
            if isinstance(item, int | float) and not math.isfinite(item):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {item!r}")


def add_options(parser: argparse.ArgumentParser, schema: type) -> None:
    """Add one flag per field of the dataclass ``schema``; defaults are SUPPRESSed so that only
    flags actually given reach ``resolve`` (that is how flags win over the YAML file)."""
    hints = typing.get_type_hints(schema)
    parser.add_argument(
        "--config", default=argparse.SUPPRESS, help="YAML file of options (flags win). Default: none"
    )
    groups = _owner_groups(parser, schema)
    for field in dataclasses.fields(schema):
        kind, is_list = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        text = f"{field.metadata.get('help', '')} Default: {default!r}"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "dest": field.name}
        for key in ("choices", "nargs", "const"):
            if key in field.metadata:
                kwargs[key] = field.metadata[key]
        target = groups.get(field.name, parser)
        kind = finite_float if kind is float else kind
        if kind is bool:
            target.add_argument(flag, type=_parse_bool, nargs="?", const=True, metavar="BOOL", **kwargs)
        elif is_list:
            kwargs.setdefault("nargs", "+")
            target.add_argument(flag, type=kind, **kwargs)
        else:
            target.add_argument(flag, type=kind, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


class Preset(Mapping[str, Any]):
    """Option values that replace some of a schema's built-in defaults (one layer of :func:`resolve`).

    Checked against ``schema`` when made: every name must be one of its fields and every value must
    read as the field's type (so a typo in a preset fails at import, not in the middle of a run).
    A preset of a schema applies to its subclasses too (``miopt online``'s options extend
    ``miopt train``'s)."""

    def __init__(self, schema: type, **values: Any) -> None:
        names = {field.name for field in dataclasses.fields(schema)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"preset of {schema.__name__}: unknown option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(schema)
        self.schema = schema
        self._values = {
            key: _coerce(value, hints[key], f"preset of {schema.__name__}: option {key!r}")
            for key, value in values.items()
        }

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Preset({self.schema.__name__}, {self._values!r})"


def resolve(
    schema: type[T], args: argparse.Namespace | dict[str, Any] | None = None, preset: Preset | None = None
) -> T:
    """Build the options: built-in defaults < ``preset`` < the YAML file named by ``config`` < flags."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    config_path = given.pop("config", None)
    given = {key: value for key, value in given.items() if not key.startswith("_")}
    names = {field.name for field in dataclasses.fields(schema)}
    values: dict[str, Any] = {}
    if preset is not None:
        if not issubclass(schema, preset.schema):
            raise TypeError(f"a preset of {preset.schema.__name__} cannot set {schema.__name__}")
        values.update(preset)
    if config_path:
        from_file = load_yaml(config_path)
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise ConfigError(f"{config_path}: unknown option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(schema)
        for key, value in from_file.items():
            values[key] = _coerce(value, hints[key], f"{config_path}: option {key!r}")
    values.update({key: value for key, value in given.items() if key in names})
    options = schema(**values)
    check_finite_floats(options)
    return options


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    kind, is_list = _base_type(annotation)
    if value is None:
        return None
    try:
        if is_list:
            items = value if isinstance(value, list) else [value]
            return [kind(item) for item in items]
        if kind is bool and isinstance(value, str):
            return _parse_bool(value)
        if kind is float and isinstance(value, int | float | str):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str:
            return str(value)
        if isinstance(value, kind):
            return value
        return kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(kind, '__name__', kind)}") from error


def as_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)
