"""Recipes: TOML files that name the teacher and each stage's options, validated before any model loads."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .pipeline import STAGES, Stage

TOP_LEVEL = {"name": str, "out": str}  # keys allowed outside the stage tables


class RecipeError(ValueError):
    """A recipe is unreadable or invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: one config object per stage."""

    name: str
    out: str
    configs: dict[str, Any]
    path: Path | None = None

    def with_config(self, stage: str, **changes) -> "Recipe":
        try:
            cfg = dataclasses.replace(self.configs[stage], **changes)
        except ValueError as e:
            raise RecipeError(f"[{stage}] {e}") from None
        return dataclasses.replace(self, configs={**self.configs, stage: cfg})


def load(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; pass a TOML file such as recipes/default.toml")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {path} is not valid TOML: {e}") from None
    return from_dict(doc, path)


def from_dict(doc: dict, path: Path | None = None) -> Recipe:
    stages = {s.name: s for s in STAGES}
    for key, value in doc.items():
        if key in stages:
            continue
        if key not in TOP_LEVEL:
            raise RecipeError(f"unknown table or key '{key}'{_hint(key, [*stages, *TOP_LEVEL])}; "
                              f"valid: {', '.join([*stages, *TOP_LEVEL])}")
        if not isinstance(value, str):
            raise RecipeError(f"'{key}' must be a string, got {type(value).__name__}")
    configs = {name: build_config(stage, doc.get(name, {})) for name, stage in stages.items()}
    for name, cfg in configs.items():
        if hasattr(cfg, "validate_paths"):
            try:
                cfg.validate_paths()
            except ValueError as e:
                raise RecipeError(f"[{name}] {e}") from None
    default_name = path.stem if path else "recipe"
    return Recipe(doc.get("name", default_name), doc.get("out", f"runs/{default_name}"), configs, path)


def build_config(stage: Stage, table: Any):
    """Check a recipe table against the stage's config dataclass and build it."""
    if not isinstance(table, dict):
        raise RecipeError(f"[{stage.name}] must be a table, got {type(table).__name__}")
    cls = stage.config_class()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise RecipeError(f"[{stage.name}] unknown key '{key}'{_hint(key, fields)}; "
                              f"valid: {', '.join(sorted(fields))}")
        values[key] = coerce(value, hints[key], f"[{stage.name}] {key}")
    try:
        return cls(**values)
    except ValueError as e:
        raise RecipeError(f"[{stage.name}] {e}") from None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a TOML value against a field's type; lists become tuples for tuple fields."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {_tname(value)} ({value!r})")
        item = args[0] if args else Any
        items = [coerce(v, item, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise RecipeError(f"{where} must be {hint.__name__}, got {_tname(value)} ({value!r})")
    return value


def _tname(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _hint(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
