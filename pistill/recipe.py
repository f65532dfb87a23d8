"""Recipes: TOML files that name the teacher and each stage's options, validated before any model loads."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
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

from .compress.vocab import check_corpus
from .errors import UserError
from .pipeline import STAGES, Stage

TOP_LEVEL = {"name": str, "out": str}  # keys allowed outside the stage tables
SEARCH = Stage("search", "pistill.search", "SearchConfig", ())  # [search]: `pistill search`'s options, not a stage
DEPLOY = Stage("deploy", "pistill.device.deploy", "DeployConfig", ())  # [deploy]: `pistill deploy`'s options
OPTIONS = (SEARCH, DEPLOY)  # tables of commands, not stages
MAX_NUMBER = 10**15  # no option needs more; bigger numbers are typos (and floats lose integer precision past 2**53)


class RecipeError(UserError, ValueError):
    """A recipe is unreadable or invalid; the message names the key and the fix."""

    exit_code = 2


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: one config object per stage."""

    name: str
    out: str
    configs: dict[str, Any]
    path: Path | None = None
    search: Any = None  # the [search] table as a SearchConfig (its defaults when the recipe has none)
    deploy: Any = None  # the [deploy] table as a DeployConfig (likewise)

    def with_config(self, stage: str, **changes) -> "Recipe":
        try:
            cfg = dataclasses.replace(self.configs[stage], **changes)
        except ValueError as e:
            raise RecipeError(f"[{stage}] {e}") from None
        return dataclasses.replace(self, configs={**self.configs, stage: cfg})


def load(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        if not path.is_file():  # a folder, or a FIFO that would block the read
            what = "is not a file" if path.exists() else "does not exist"
            raise RecipeError(f"recipe {path} {what}; pass a TOML file such as recipes/default.toml")
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise RecipeError(f"recipe {path} cannot be read ({why}); check that it is a UTF-8 text file you may "
                          "read") from None
    return from_dict(doc, path)


def from_dict(doc: dict, path: Path | None = None) -> Recipe:
    stages = {s.name: s for s in STAGES}
    for key, value in doc.items():
        if key in stages or key in (o.name for o in OPTIONS):
            continue
        if key not in TOP_LEVEL:
            valid = [*stages, *(o.name for o in OPTIONS), *TOP_LEVEL]
            raise RecipeError(f"unknown table or key '{key}'{_hint(key, valid)}; valid: {', '.join(valid)}")
        if not isinstance(value, str) or not value.strip():
            raise RecipeError(f"'{key}' must be a non-empty string, got {_tname(value)} ({value!r})")
    configs = {name: build_config(stage, doc.get(name, {})) for name, stage in stages.items()}
    check_files(configs)
    check_across(configs)
    default_name = path.stem if path else "recipe"
    out = os.path.expanduser(doc.get("out", f"runs/{default_name}"))  # `~/runs/x`, not a folder named ~
    return Recipe(doc.get("name", default_name), out, configs, path, build_config(SEARCH, doc.get(SEARCH.name, {})),
                  build_config(DEPLOY, doc.get(DEPLOY.name, {})))


def check_files(configs: dict) -> None:
    """Every file a table names exists and reads as its stage will read it ([eval] tasks, [data] corpus and prompts,
    [prune] vocab_corpus), so that a bad line fails at load, before any run folder or model, not at stage 10."""
    for name, cfg in configs.items():
        try:
            if hasattr(cfg, "validate_paths"):
                cfg.validate_paths()
            if name == "prune" and cfg.vocab_corpus:  # PruneConfig.validate_paths checks only that it exists
                check_corpus(Path(cfg.vocab_corpus))
        except OSError as e:  # a name too long for the file system, a folder we may not search
            where = str(e.filename or "")
            raise RecipeError(f"[{name}] path {where[:60]}{'...' if len(where) > 60 else ''} cannot be checked "
                              f"({e.strerror or type(e).__name__}); fix the path") from None
        except ValueError as e:
            raise RecipeError(str(e) if str(e).startswith(f"[{name}]") else f"[{name}] {e}") from None


def check_across(configs: dict) -> None:
    """Options of two tables that cannot go together, refused at load."""
    vocab = getattr(configs.get("prune"), "vocab", None)
    if vocab is not None and getattr(configs.get("bench"), "speculative", False):
        raise RecipeError(f"[bench] speculative = true drafts with the student, whose vocabulary [prune] vocab = "
                          f"{vocab} trims: its token ids are not the teacher's, and a draft must share the teacher's "
                          "tokenizer; unset [prune] vocab or set speculative = false")


def dumps(rec: Recipe) -> str:
    """The recipe as TOML: name, out and every stage's table with every option written out (unset ones, None,
    commented out), so that loading it gives the same configs whatever the defaults become."""
    import json

    from .report_table import toml_block

    tables = {st.name: dataclasses.asdict(rec.configs[st.name]) for st in STAGES}
    return f"name = {json.dumps(rec.name)}\nout = {json.dumps(rec.out)}\n\n{toml_block(tables)}\n"


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
        arms = sorted((a for a in args if a is not type(None)),  # the arm of the value's type reports first
                      key=lambda a: not (isinstance(a, type) and isinstance(value, a)))
        for arm in arms:
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
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, _ACCEPTS.get(hint, hint)):
        raise RecipeError(f"{where} must be {hint.__name__}, got {_tname(value)} ({value!r})")
    return _number(value, hint, where) if hint in (int, float) else value


_ACCEPTS = {float: (int, float)}  # an integer is a valid float


def _number(value: int | float, hint: type, where: str) -> int | float:
    """A finite number at most MAX_NUMBER in size (TOML allows nan, inf and any integer); a float for a float field."""
    if abs(value) > MAX_NUMBER or not math.isfinite(value):  # the size first: isfinite overflows on a huge int
        raise RecipeError(f"{where} = {value!r} must be a finite number at most {MAX_NUMBER:.0e} in size; "
                          "fix the value")
    return float(value) if hint is float else value


def _tname(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _hint(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
