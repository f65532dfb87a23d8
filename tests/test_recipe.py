"""Recipes: every shipped recipe validates; bad keys, types, values and paths name the key and the fix."""

from pathlib import Path

import pytest

from pistill import pipeline, recipe
from pistill.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    rec = recipe.load(path)
    assert set(rec.configs) == {s.name for s in pipeline.STAGES}


def test_defaults_round_trip():
    """Every stage's default config survives dict -> recipe -> config unchanged."""
    import dataclasses

    rec = recipe.from_dict({})
    table = {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
             for name, cfg in rec.configs.items()}
    again = recipe.from_dict({name: {k: v for k, v in t.items() if v is not None} for name, t in table.items()})
    assert again.configs == rec.configs


@pytest.mark.parametrize("doc,match", [
    ({"prune": {"ffn_ratoi": 0.5}}, r"\[prune\] unknown key 'ffn_ratoi' \(did you mean 'ffn_ratio'\?\)"),
    ({"pruning": {}}, r"unknown table or key 'pruning' \(did you mean 'prune'\?\)"),
    ({"data": {"block_size": "big"}}, r"\[data\] block_size must be int, got a string"),
    ({"data": {"block_size": True}}, r"\[data\] block_size must be int, got a boolean"),
    ({"data": {"block_size": 0}}, r"\[data\] block_size = 0 must be at least 1"),
    ({"teacher": {"source": "/no/such/model"}}, r"teacher path /no/such/model does not exist"),
    ({"teacher": {"source": "/no/such/model.gguf"}}, r"teacher GGUF file /no/such/model.gguf does not exist"),
    ({"data": {"corpus": "/no/such.txt"}}, r"\[data\] corpus file /no/such.txt does not exist"),
    ({"teacher": "x"}, r"\[teacher\] must be a table"),
    ({"prune": {"vocab": 8192}, "bench": {"speculative": True}},
     r"\[bench\] speculative = true drafts with the student, whose vocabulary \[prune\] vocab = 8192 trims"),
    ({"prune": {"vocab": 1.5}}, r"\[prune\] vocab"),
])
def test_errors_name_the_key(doc, match):
    with pytest.raises(RecipeError, match=match):
        recipe.from_dict(doc)


def test_int_is_accepted_for_float_fields_and_lists_for_tuples():
    rec = recipe.from_dict({"prune": {"ffn_ratio": 1}})
    assert rec.configs["prune"].ffn_ratio == 1.0


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nx=1")
    with pytest.raises(RecipeError, match="not valid TOML"):
        recipe.load(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        recipe.load(tmp_path / "missing.toml")


@pytest.mark.parametrize("value,match", [
    (float("nan"), r"\[distill\] lr = nan must be a finite number"),
    (float("inf"), r"\[distill\] lr = inf must be a finite number"),
    (-float("inf"), r"\[distill\] lr = -inf must be a finite number"),
    (1e300, r"\[distill\] lr = 1e\+300 must be a finite number at most 1e\+15"),
    (10**20, r"\[distill\] lr = 100000000000000000000 must be a finite number"),
])
def test_floats_must_be_finite_and_sane(value, match):
    with pytest.raises(RecipeError, match=match):
        recipe.from_dict({"distill": {"lr": value}})


def test_out_expands_home_and_top_level_keys_are_non_empty(tmp_path):
    import os

    assert recipe.from_dict({"out": "~/runs/x"}).out == os.path.expanduser("~/runs/x")
    with pytest.raises(RecipeError, match="'out' must be a non-empty string"):
        recipe.from_dict({"out": ""})


def test_union_fields_report_the_arm_of_the_values_type():
    with pytest.raises(RecipeError, match=r"\[prune\] target_params = 10000000000000000000 must be a finite"):
        recipe.from_dict({"prune": {"target_params": 10**19}})
