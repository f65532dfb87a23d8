"""Registries: plain dicts filled by a decorator, and the one lookup whose error lists the valid keys."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def register(table: dict, name: str) -> Callable[[T], T]:
    """A decorator that files its function or class in `table` under `name` and returns it unchanged."""
    def deco(obj: T) -> T:
        table[name] = obj
        return obj
    return deco


def lookup(table: dict, name: str, what: str):
    """`table[name]`, or a ValueError naming the valid keys: "<what> 'x' is not supported; supported: a, b"."""
    if name not in table:
        raise ValueError(f"{what} '{name}' is not supported; supported: {', '.join(sorted(table))}")
    return table[name]
