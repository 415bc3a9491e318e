"""Config dataclasses to and from plain dicts (and so YAML), with errors that name the dotted field.

A leaf module: the top-level config and the MoE families' configs both build on it, and it imports
nothing of diffmoe.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value.

    ``field``, ``value`` and ``why`` are set for errors about one field (see :func:`check`), so that a
    caller can re-raise them under a longer dotted name (:meth:`within`).
    """

    def __init__(self, message: str, field: str | None = None, value: Any = None, why: str | None = None):
        super().__init__(message)
        self.field, self.value, self.why = field, value, why

    @classmethod
    def invalid(cls, field: str, value: Any, why: str) -> "ConfigError":
        return cls(f"invalid config: {field}={value!r}: {why}", field, value, why)

    def within(self, prefix: str) -> "ConfigError":
        """The same error with the field named ``prefix.field`` (unchanged when it names no field)."""
        return self if self.field is None else ConfigError.invalid(f"{prefix}.{self.field}", self.value, self.why)


def check(cond: bool, field: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` and ``value`` unless ``cond``."""
    if not cond:
        raise ConfigError.invalid(field, value, why)


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def build(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong plain types by their
    dotted path. A field whose default factory is a dataclass is a sub-config, built recursively (by its
    ``from_dict(data, where)`` when it defines one)."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: {where or 'the config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"invalid config: unknown field {name}; known: {', '.join(fields)}")
        sub = fields[key].default_factory
        if dataclasses.is_dataclass(sub):
            value = sub.from_dict(value, name) if hasattr(sub, "from_dict") else build(sub, value, name)
        else:
            _check_type(fields[key], value, name)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain dicts, lists and scalars from a dataclass tree (tuples become lists; an object's own
    ``to_dict`` is used where it defines one)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def fields_dict(obj: Any) -> dict:
    """The fields of one dataclass as plain values (sub-configs included), ignoring its own ``to_dict``."""
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _check_type(f: dataclasses.Field, value: Any, name: str) -> None:
    """Reject a value of the wrong type for a plain ``int | float | bool | str`` field (int is accepted
    for float); fields of other types are checked by the config's ``validate``."""
    type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if _matches(type_name, value) is False:
        raise ConfigError(f"invalid config: {name}={value!r}: expected {type_name}")


_PLAIN = {"int": int, "float": float, "bool": bool, "str": str}


def _matches(type_name: str, value: Any) -> bool | None:
    """Whether ``value`` has the annotated type: plain types, ``X | None``, ``list[X]`` and
    ``tuple[X, ...]`` of plain types (int is accepted for float, bool is not an int); None when the
    annotation is not of that kind (the config's ``validate`` checks it)."""
    results = []
    for alt in (a.strip() for a in type_name.split("|")):
        if alt == "None":
            results.append(value is None)
        elif alt in _PLAIN:
            expected = _PLAIN[alt]
            if isinstance(value, bool):
                results.append(expected is bool)
            else:
                results.append(isinstance(value, (int, float)) if expected is float else isinstance(value, expected))
        elif alt.startswith(("list[", "tuple[")) and alt.endswith("]"):
            inner = [t.strip() for t in alt[alt.index("[") + 1 : -1].split(",")]
            if any(t not in _PLAIN for t in inner):
                return None
            if not isinstance(value, (list, tuple)):
                results.append(False)
            elif alt.startswith("tuple["):
                results.append(len(value) == len(inner) and all(_matches(t, v) for t, v in zip(inner, value)))
            else:
                results.append(all(_matches(inner[0], v) for v in value))
        else:
            return None
    return any(results)
