"""Typed, validated configuration sections (one dataclass per ``params.yaml`` section).

A stage declares its section as a dataclass; :func:`load_section` rejects unknown or missing keys
and wrong types, and the dataclass's ``__post_init__`` checks ranges with :func:`require`. Errors
name the file, the dotted key, what was expected and what was found, so a stage stops at its
start instead of half-way through a run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ParamsError(ValueError):
    """A ``params.yaml`` value is missing, unknown, of the wrong type or out of range."""


def require(condition: bool, key: str, expected: str, value: Any) -> None:
    """Raise :class:`ParamsError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ParamsError(f"{key}: expected {expected}, got {value!r}")


class FieldError(ParamsError):
    """A dataclass field out of range; :func:`from_dict` names it ``<section>.<field>``."""

    def __init__(self, field: str, expected: str, value: Any) -> None:
        self.field, self.expected, self.value = field, expected, value
        super().__init__(f"{field}: expected {expected}, got {value!r}")


def require_field(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raise :class:`FieldError` for ``field`` unless ``condition`` holds: for a ``__post_init__``
    whose section's name (``train.vdsr``) is known only to the caller of :func:`from_dict`."""
    if not condition:
        raise FieldError(field, expected, value)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        require(value in choices, key, "one of " + ", ".join(map(repr, choices)), value)
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        require(isinstance(value, list), key, "a list", value)
        return [_check_type(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ParamsError:
                continue
        raise ParamsError(f"{key}: expected {annotation}, got {value!r}")
    if annotation is type(None):
        require(value is None, key, "null", value)
        return value
    if annotation is bool:
        require(isinstance(value, bool), key, "true or false", value)
        return value
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if annotation is float:
        if isinstance(value, str) and _looks_numeric(value):  # PyYAML (YAML 1.1) reads 1e-4 as a string
            raise ParamsError(f"{key}: expected a number, got the string {value!r} (write 1.0e-4, not 1e-4)")
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if annotation is str:
        require(isinstance(value, str), key, "a string", value)
        return value
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def from_dict(config_cls: type[T], values: Any, section: str) -> T:
    """Build ``config_cls`` from a mapping, checking keys and types; ranges are checked by the class."""
    require(isinstance(values, dict), section, "a mapping of keys to values", values)
    hints = typing.get_type_hints(config_cls)
    fields = {field.name: field for field in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"{section}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{section}.{name}"
        if name not in values:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            require(has_default, key, "a value (the key is missing)", None)
            continue
        kwargs[name] = _check_type(values[name], hints[name], key)
    try:
        return config_cls(**kwargs)
    except FieldError as error:
        raise ParamsError(f"{section}.{error.field}: expected {error.expected}, got {error.value!r}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last),
    and reads exponent floats without a dot (``1e-05``) as numbers, as YAML 1.2 does. PyYAML follows
    YAML 1.1, where ``1e-05`` is a string; but DVC writes floats that way (``dvc exp run -S
    train.vdsr.min_lr=1.0e-5`` leaves ``min_lr: 1e-05`` in params.yaml)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden: not a repeat
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found key {key!r} twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: yaml.safe_load is unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(path: str | Path) -> Any:
    """A YAML file as params.yaml is read (no repeated keys, ``1e-05`` a number); :class:`ParamsError`
    if it is missing or not YAML, with PyYAML's account of the problem (``in "<file>", line L,
    column C``: the file is read as bytes, so that its marks name it)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:  # bytes: PyYAML names the file in its marks and rejects bad UTF-8
            return yaml.load(file, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as error:
        raise ParamsError(f"{path}: file not found") from error
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from error


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole ``params.yaml`` as a dict; a clear error if it is missing, not YAML or repeats a key."""
    data = read_yaml(path)
    require(isinstance(data, dict), str(path), "a mapping of sections", data)
    return data


def load_section(config_cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """Read ``section`` of ``path`` into ``config_cls``; :class:`ParamsError` names file and key."""
    params = load_params(path)
    if section not in params:
        raise ParamsError(f"{path}: section {section!r} is missing")
    try:
        return from_dict(config_cls, params[section], section)
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
