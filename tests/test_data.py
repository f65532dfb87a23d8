"""Data: corpora, deterministic splits, packing, teacher-generated data and the reference."""

import json

import numpy as np
import pytest

from pistill.data import DataConfig, load_blocks, load_reference, pack, read_corpus, split_heldout, stdlib_docstrings


def test_default_corpus_is_real_text_and_split_is_deterministic():
    docs = stdlib_docstrings()
    assert len(docs) > 1000 and all(len(d) > 80 for d in docs[:50])
    a, b = split_heldout(docs), split_heldout(list(reversed(docs)))
    assert set(a[1]) == set(b[1]) and 0.05 < len(a[1]) / len(docs) < 0.15
    assert not set(a[0]) & set(a[1])


def test_data_artifact_shapes_and_reference(tiny_data):
    cfg = tiny_data.manifest["config"]
    for split, n in (("calib", 4), ("train", 16), ("heldout", 2)):
        arr = load_blocks(tiny_data, split)
        assert arr.shape == (n, cfg["block_size"]) and arr.dtype == np.int32
    ref = load_reference(tiny_data)
    assert ref["topk_ids"].shape == (2, 64, 16) and ref["nll"].shape == (2, 63)
    assert (ref["top1"] == ref["topk_ids"][..., 0]).all()
    assert np.all(np.diff(ref["topk_logp"], axis=-1) <= 1e-6)  # sorted, descending
    assert tiny_data.metrics["teacher_ppl"] > 1
    rows = [json.loads(l) for l in tiny_data.file("generated.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 4 and all(r["prompt"] and r["response"] for r in rows)


def test_jsonl_corpus_needs_its_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no field 'text'"):
        read_corpus(DataConfig(corpus=str(p)))
    assert read_corpus(DataConfig(corpus=str(p), text_field="body")) == ["hello"]


def test_pack_refuses_a_too_small_corpus(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="fewer than 4 blocks"):
        pack(["tiny text"], tok, 64, 4)
    assert pack(["word " * 400], tok, 64, 4).shape == (4, 64)


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"heldout_blocks": -1}, {"generate": -2}])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
        DataConfig(**bad)


def test_missing_corpus_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="corpus file .* does not exist"):
        DataConfig(corpus=str(tmp_path / "nope.txt")).validate_paths()
