"""Recipes: every shipped recipe validates; bad keys, types, values, paths and files name the key and the fix."""

import json
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
    ({"data": {"prompts": " "}}, r"\[data\] prompts is empty; name a file, or \"default\""),
    ({"data": {"prompts": "hf:x/y"}}, r"\[data\] prompts file hf:x/y does not exist"),  # only a corpus may be hf:
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


# --- files the recipe names are read at load: a bad line fails here, before any run folder or model ---------------

ITEM = b'{"query": "Question: 2 + 2?", "choices": ["4", "5"], "gold": 0}\n'
TABLES = {"t.jsonl": ("eval", "tasks"), "c.txt": ("data", "corpus"), "c.jsonl": ("data", "corpus"),
          "p.txt": ("data", "prompts"), "v.txt": ("prune", "vocab_corpus"), "v.jsonl": ("prune", "vocab_corpus")}


def doc_naming(path) -> dict:
    """A recipe whose table names `path` under the key its file name stands for (TABLES)."""
    table, key = TABLES[path.name]
    value = [str(path)] if key == "tasks" else str(path)
    return {table: {key: value, **({"vocab": 0.5} if table == "prune" else {})}}


@pytest.mark.parametrize("name, body, match", [
    ("t.jsonl", ITEM + b'{"query": \n', r"\[eval\] .*t.jsonl line 2 is not JSON \(Expecting value at column 11\)"),
    ("t.jsonl", ITEM + b"\n" + ITEM.replace(b"2 + 2", b"2 \xff 2"),
     r"\[eval\] .*t.jsonl line 3 is not UTF-8 \(byte 0xff at column 24\)"),
    ("t.jsonl", ITEM.replace(b'"gold": 0', b'"gold": 5'), r"t.jsonl line 1: gold 5 is not an index of its 2 choices"),
    ("t.jsonl", ITEM.replace(b'["4", "5"]', b'"45"'), r"t.jsonl line 1: 'choices' must be a list of strings"),
    ("t.jsonl", ITEM.replace(b'"gold": 0', b'"gold": 0.5'), r"line 1: 'gold' = 0.5 is not the index of a choice"),
    ("t.jsonl", ITEM.replace(b'"Question: 2 + 2?"', b"7"), r"line 1: 'query' is a JSON int, not a string"),
    ("t.jsonl", b'{"question": "q"}\n', r"t.jsonl line 1: multiple-choice row with keys \['question'\] has neither"),
    ("t.jsonl", b"\n \n", r"\[eval\] task file .*t.jsonl holds no item"),
    ("c.txt", b"one\n\ntwo \xe9t\xe9\n", r"\[data\] corpus file .*c.txt line 3 is not UTF-8 \(byte 0xe9 at column 5\)"),
    ("c.txt", b" \n\n\t\n", r"\[data\] corpus file .*c.txt holds no text"),
    ("c.jsonl", b'{"text": "a"}\n\n[1]\n', r"\[data\] .*c.jsonl line 3 is a JSON list, not an object"),
    ("c.jsonl", b'{"body": "a"}\n', r"\[data\] .*c.jsonl line 1 has no field 'text'"),
    ("c.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"\[data\] corpus file .*c.jsonl line 2 is not UTF-8"),
    ("p.txt", b"Write a haiku.\n\x80\n", r"\[data\] prompts file .*p.txt line 2 is not UTF-8 \(byte 0x80"),
    ("p.txt", b"\n", r"\[data\] prompts file .*p.txt holds no text"),
    ("v.txt", b"fine\n\xc3\x28\n", r"\[prune\] vocab_corpus .*v.txt line 2 is not UTF-8 \(byte 0xc3 at column 1\)"),
    ("v.jsonl", b'{"id": 1}\n', r"\[prune\] vocab_corpus .*v.jsonl line 1 holds no string"),
    ("v.jsonl", b'{"text": "a"}\n{nope\n', r"\[prune\] vocab_corpus .*v.jsonl line 2 is not valid JSON"),
    ("v.txt", b"\n\n", r"\[prune\] vocab_corpus .*v.txt holds no text"),
])
def test_bad_files_fail_at_load_naming_file_and_line(tmp_path, name, body, match):
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(RecipeError, match=match) as err:
        recipe.from_dict(doc_naming(path))
    assert "\n" not in str(err.value) and err.value.exit_code == 2


@pytest.mark.parametrize("kind", ["folder", "fifo"])
@pytest.mark.parametrize("name", list(TABLES))
def test_a_folder_or_fifo_where_a_file_belongs_is_refused_without_blocking(tmp_path, name, kind):
    import os

    import signal

    def hung(signum, frame):
        raise TimeoutError("the recipe check opened the FIFO and waits for a writer")

    path = tmp_path / name
    path.mkdir() if kind == "folder" else os.mkfifo(path)  # reading a FIFO would wait for a writer forever
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(RecipeError, match=r"is not a file|does not exist"):
            recipe.from_dict(doc_naming(path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_good_files_load(tmp_path):
    """A BOM, CRLF line ends, U+2028 inside a JSON string, HellaSwag's string label, blank lines: all read."""
    files = {"t.jsonl": "\ufeff" + json.dumps({"query": "a\u2028b", "choices": ["x", "y"], "gold": 1},
                                                ensure_ascii=False) + "\r\n\n"
                        + json.dumps({"activity_label": "A", "ctx": "c", "endings": ["e", "f"], "label": "1"}),
             "c.txt": "caf\u00e9\r\n\r\nna\u00efve\n", "c.jsonl": '{"text": "a"}\n\n{"text": "b", "n": 2}\n',
             "p.txt": "Write a haiku.\n", "v.jsonl": '{"id": 1, "body": "x"}\n'}
    for name, body in files.items():
        (tmp_path / name).write_text(body, encoding="utf-8", newline="")
        rec = recipe.from_dict(doc_naming(tmp_path / name))
        assert rec.configs[TABLES[name][0]] is not None
    from pistill.mc_eval import read_items

    assert [(it.context, it.gold) for it in read_items(tmp_path / "t.jsonl")] == [("a\u2028b", 1), ("A: c", 1)]
    (tmp_path / "none.txt").write_text("\n")  # no seed task is needed when the teacher generates nothing
    assert recipe.from_dict({"data": {"prompts": str(tmp_path / "none.txt"), "generate": 0}}).configs["data"]


def test_long_paths_and_recipe_folders_are_one_line_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"\[data\] path a{60}\.\.\. cannot be checked \(File name too long\)"):
        recipe.from_dict({"data": {"corpus": "a" * 300 + ".txt"}})
    with pytest.raises(RecipeError, match=r"recipe .* is not a file"):
        recipe.load(tmp_path)
    with pytest.raises(RecipeError, match=r"recipe .* cannot be read \(File name too long\)"):
        recipe.load("r" * 300 + ".toml")


@pytest.mark.parametrize("name", ["t.jsonl", "c.jsonl", "v.txt"])
def test_the_cli_stops_at_load_with_one_line_and_no_run_folder(tmp_path, capsys, name):
    from pistill import cli

    (tmp_path / name).write_bytes(ITEM + b"\xff\n")
    doc = doc_naming(tmp_path / name)  # the default teacher: its check loads nothing
    (tmp_path / "r.toml").write_text("".join(f"[{t}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in c.items())
                                             for t, c in doc.items()))
    assert cli.main(["run", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pistill: error: [") and f"{name} line 2 is not UTF-8" in err[0]
    assert not (tmp_path / "run").exists()
