"""Registries: the decorator files its object unchanged; a failed lookup lists the valid keys."""

from __future__ import annotations

import pytest

from pistill.registry import lookup, register


def test_register_then_lookup():
    table = {}

    @register(table, "b")
    def b():
        return 2

    register(table, "a")(int)
    assert b() == 2 and lookup(table, "b", "thing") is b and lookup(table, "a", "thing") is int


def test_failed_lookup_lists_sorted_keys():
    with pytest.raises(ValueError, match=r"^method 'x' is not supported; supported: a, b$"):
        lookup({"b": 1, "a": 2}, "x", "method")
