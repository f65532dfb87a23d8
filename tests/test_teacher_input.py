"""A teacher (or student) source that is a damaged file is refused at recipe load in one line naming the file and
what is wrong with it; the conversion's own read errors are one line too."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from pistill import recipe
from pistill.errors import UserError
from pistill.models import TeacherError, check_gguf, check_source, materialize, resolve_source
from pistill.recipe import RecipeError


def write_gguf(path, arch: str = "llama", big_endian: bool = False, heads: int | None = 2):
    """A small GGUF written by gguf-py (two float32 tensors, no tokenizer): a complete, well-formed file."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch, endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    if heads is not None:  # without: transformers' default of 32 heads does not divide the hidden size
        w.add_head_count(heads)
    w.add_tensor("token_embd.weight", np.arange(16 * 8, dtype=np.float32).reshape(16, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf").read_bytes()


@pytest.mark.parametrize("big_endian", [False, True], ids=["little-endian", "big-endian"])
def test_header_check_agrees_with_gguf_py(tmp_path, big_endian):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", big_endian=big_endian)
    header, reader = check_gguf(path), gguf.GGUFReader(path)
    assert header.n_params == sum(int(t.n_elements) for t in reader.tensors) == 16 * 8 + 8
    assert header.data_offset == reader.data_offset
    assert header.data_end == path.stat().st_size == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert (header.version, header.n_tensors, header.architecture) == (3, 2, "llama")


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


DAMAGED = [  # (case, the file's bytes from a good one, what the one line says after the path)
    ("empty", lambda g: b"", r" is empty \(0 bytes\); download it again"),
    ("cut-in-magic", lambda g: g[:2], r" is truncated \(2 bytes\)"),
    ("html-page", lambda g: b"<!DOCTYPE html><html>...", r" is not a GGUF file \(its first 4 bytes are b'<!DO', "
                                                          r"not 'GGUF'\)"),
    ("version-1", lambda g: _patched(g, 4, "<I", 1), r" is GGUF version 1, which transformers does not read"),
    ("cut-in-header", lambda g: g[:100], r" is truncated or damaged: its header runs past the end of the file "
                                         r"\(100 bytes\)"),
    ("absurd-kv-count", lambda g: _patched(g, 16, "<Q", 2**60), r" is truncated or damaged: its header runs past"),
    ("cut-in-data", lambda g: g[:-10], r" is truncated: it has \d+ bytes but its tensor data ends at byte \d+"),
]


@pytest.mark.parametrize("case,make,says", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_gguf_teacher_is_refused_at_recipe_load(tmp_path, good, case, make, says):
    path = tmp_path / "teacher.gguf"
    path.write_bytes(make(good))
    with pytest.raises(RecipeError, match=r"^\[teacher\] teacher (GGUF )?file " + str(path) + says) as err:
        recipe.from_dict({"teacher": {"source": str(path)}})
    assert err.value.exit_code == 2 and "\n" not in str(err.value) and "fix [teacher] source" in str(err.value)


def test_unsupported_gguf_architecture_is_refused_at_recipe_load(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(RecipeError, match=r"architecture 'phi3' is not supported by pistill \(.*phi\.gguf\); "
                                          r"supported: llama, mistral, qwen2"):
        recipe.from_dict({"teacher": {"source": str(path)}})


def test_damaged_gguf_student_names_the_distill_key(tmp_path, good):
    path = tmp_path / "student.gguf"
    path.write_bytes(good[:-1])
    with pytest.raises(RecipeError, match=r"^\[distill\] student GGUF file .* is truncated: .*fix \[distill\] student"):
        recipe.from_dict({"distill": {"student": str(path)}})


def test_files_without_the_gguf_suffix(tmp_path, good):
    """An empty file is called empty (not missing); another file is named as neither; a GGUF is read by its magic."""
    empty, text, renamed = tmp_path / "model", tmp_path / "model.bin", tmp_path / "model.q4"
    empty.write_bytes(b"")
    text.write_text("hello world")
    renamed.write_bytes(good)
    with pytest.raises(TeacherError, match=r"teacher file .*/model is empty \(0 bytes\)"):
        resolve_source(str(empty))
    with pytest.raises(TeacherError, match=r"teacher file .*/model\.bin is neither a \.gguf file nor a model folder "
                                           r"\(its first 4 bytes are b'hell', not 'GGUF'\); fix \[teacher\] source"):
        resolve_source(str(text))
    assert resolve_source(str(renamed)) == ("gguf", renamed)
    check_source(str(renamed))  # its header is complete: no error


@pytest.mark.parametrize("config,says", [
    ("[1, 2]", r"config\.json holds a JSON list, not an object"),
    ("{not json", r"config\.json cannot be read as JSON \(JSONDecodeError: "),
    (b"\xff\xfe{}", r"config\.json cannot be read as JSON \(UnicodeDecodeError: "),
])
def test_damaged_config_json_of_a_teacher_folder(tmp_path, config, says):
    (tmp_path / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(RecipeError, match=r"^\[teacher\] " + str(tmp_path) + "/" + says):
        recipe.from_dict({"teacher": {"source": str(tmp_path)}})


def test_cli_refuses_a_truncated_gguf_before_making_a_run_folder(tmp_path, good):
    path = tmp_path / "teacher.gguf"
    path.write_bytes(good[: len(good) // 2])
    (tmp_path / "r.toml").write_text(f'[teacher]\nsource = "{path}"\n')
    p = subprocess.run([sys.executable, "-m", "pistill.cli", "run", str(tmp_path / "r.toml"), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("pistill: error: ")]  # beside log lines
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert errors[0].startswith(f"pistill: error: [teacher] teacher GGUF file {path} is truncated: it has ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("heads,error", [(2, "ValueError: Cannot build a tokenizer"),
                                         (None, "StrictDataclassClassValidationError: ")],
                         ids=["no-tokenizer", "impossible-config"])
def test_a_gguf_transformers_cannot_read_is_one_line_and_leaves_no_copy(tmp_path, monkeypatch, heads, error):
    """The header is complete, but transformers cannot read the model (no tokenizer in the file; a config no model can
    have): the conversion's read error names the file, in one line, and leaves no copy in the cache."""
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "odd.gguf", heads=heads)
    check_gguf(path)
    with pytest.raises(TeacherError) as err:
        materialize(str(path))
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert msg.startswith(f"teacher GGUF file {path} cannot be read by transformers ({error}")
    assert msg.endswith("; download it again, convert it with a current llama.cpp, or fix [teacher] source")
    assert list((tmp_path / "cache" / "teachers").iterdir()) == []  # no half-converted copy
