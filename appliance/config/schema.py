"""Strict TOML loading: pydantic models whose errors become one-line :class:`ConfigError`.

Every model forbids unknown keys, coerces nothing (a string is not a number) and refuses
``inf`` and ``nan`` wherever a number is expected. Files are read up to
:data:`MAX_CONFIG_FILE` bytes; deeper nesting or longer numbers than TOML parsing can
take are syntax errors. An error names the file, the dotted key (with the item's id for
array entries, e.g. ``links[3] (4-5).skr_kbps``) and what was expected, including the
allowed keys when a key is unknown.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, ValidationError
from pydantic_core import core_schema

from appliance.errors import ConfigError
from appliance.files import MiB, read_bounded

MAX_CONFIG_FILE = 4 * MiB


class Strict(BaseModel):
    """Base of every configuration model: no unknown keys, no coercion, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


M = TypeVar("M", bound=Strict)


class Lean:
    """Base of a record a file may hold by the ten thousand (SAEs, users, contracts): it is
    validated as its :attr:`entry` model (every check, every error message of a model) and
    kept as a frozen, slotted dataclass of the same fields, its strings interned: about a
    fifth of a model's memory (a pydantic model keeps a ``__dict__`` and a set of the
    fields given per instance). Subclasses are ``@dataclass(frozen=True, slots=True)``."""

    __slots__ = ()
    entry: ClassVar[type[Strict]]

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

        def lean(model: Strict) -> Lean:
            values = {n: getattr(model, n) for n in names}
            return cls(**{n: sys.intern(v) if type(v) is str else v for n, v in values.items()})

        return core_schema.no_info_after_validator_function(
            lean, handler.generate_schema(cls.entry)
        )


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; unreadable or malformed files raise ConfigError."""
    try:
        text = read_bounded(path, MAX_CONFIG_FILE).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "", "no such file", code="CFG-FILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(str(path), "", f"cannot read: {reason}", code="CFG-FILE") from None
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ConfigError(
            str(path), "", "invalid TOML: nested too deep", code="CFG-SYNTAX"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"invalid TOML: {exc}", code="CFG-SYNTAX") from None
    except ValueError:  # an integer with more digits than Python converts
        raise ConfigError(
            str(path), "", "invalid TOML: a number too long", code="CFG-SYNTAX"
        ) from None


def load_model(model: type[M], data: dict[str, Any], file: str) -> M:
    """Validate ``data`` against ``model``; the first problem becomes a ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        key = _describe_loc(data, first["loc"])
        problem, code = _describe_problem(model, first)
        raise ConfigError(file, key, problem + more, code=code) from None


def _describe_loc(data: Any, loc: tuple[int | str, ...]) -> str:
    """``links[3] (4-5).skr_kbps`` for loc ``('links', 3, 'skr_kbps')``."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            label = _item_label(node)
            out += f" ({label})" if label else ""
        else:
            out += ("." if out else "") + part
            node = node.get(part) if isinstance(node, dict) else None
    return out


def _item_label(item: Any) -> str:
    if not isinstance(item, dict):
        return ""
    if "a" in item and "b" in item:
        label = f"{item['a']}-{item['b']}"
    else:
        label = str(item.get("id", item.get("name", "")))
    return label if label.isprintable() else repr(label)  # messages stay one line


def _describe_problem(model: type[BaseModel], err: Any) -> tuple[str, str]:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return f"unknown key (allowed here: {', '.join(allowed)})", "CFG-UNKNOWN-KEY"
    if kind == "missing":
        return "missing required key", "CFG-MISSING"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    if kind == "value_error":  # our own validators say what they expect
        return f"expected {err['ctx']['error']} (got {shown})", "CFG-VALUE"
    msg = err["msg"][0].lower() + err["msg"][1:]
    return f"expected: {msg} (got {shown})", "CFG-VALUE"


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model found by walking ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if _is_model(current) else None
        if field is None:
            return []
        current = _inner_model(field.annotation)
    return sorted(current.model_fields) if _is_model(current) else []


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _inner_model(annotation: Any) -> Any:
    """The model inside ``list[M]``, ``M | None`` or ``M`` (a :class:`Lean` record's model)."""
    if isinstance(annotation, type) and issubclass(annotation, Lean):
        return annotation.entry
    if _is_model(annotation):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            inner = _inner_model(arg)
            if inner is not None:
                return inner
    return None
