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


@pytest.mark.parametrize("bad, words", [
    ({"generator": "vllm"}, "generator 'vllm' is not supported; supported: llama_cpp, transformers"),
    ({"gguf_type": "Q4_0"}, "gguf_type 'Q4_0' is not supported; use one of f16, Q8_0"),
    ({"instructions": -1}, "instructions = -1 must be >= 0"),
    ({"parallel": 0}, "parallel = 0 must be at least 1"),
    ({"top_p": 0.0}, r"top_p = 0.0 in \(0, 1\]"),
    ({"temperature": -1.0}, "temperature = -1.0 must be >= 0"),
    ({"gen_share": 1.5}, r"gen_share = 1.5 must be in \[0, 1\]"),
    ({"max_similarity": -0.1}, "max_similarity = -0.1"),
])
def test_generation_config_errors_name_the_key(bad, words):
    with pytest.raises(ValueError, match=words):
        DataConfig(**bad)


def test_data_artifact_records_self_instruct(tiny_data):
    """The tiny teacher (through llama.cpp) wrote new tasks from the seeds and answered them: every proposal is in
    tasks.jsonl with its fate, the counts and the generation throughput are in the metrics, answers name their
    source, and the generated text fills at most gen_share of the training blocks."""
    m = tiny_data.metrics
    si, gen = m["self_instruct"], m["generation"]
    tasks = [json.loads(line) for line in tiny_data.file("tasks.jsonl").read_text().splitlines()]
    assert si["proposed"] == len(tasks) == si["kept"] + sum(si["rejected"].values()) and si["kept"] <= 4
    assert [t["task"] for t in tasks if t["kept"]] and all(t["reason"] for t in tasks if not t["kept"])
    assert gen["generator"] == "llama_cpp" and gen["gguf_type"] == "Q8_0" and gen["new_tokens"] > 0
    assert m["gen_tokens_per_s"] == gen["tokens_per_s"] > 0 and gen["sequences"] >= si["proposed"] + 4
    rows = [json.loads(line) for line in tiny_data.file("generated.jsonl").read_text().splitlines()]
    new = {t["task"] for t in tasks if t["kept"]}
    assert all(r["source"] == ("self-instruct" if r["prompt"] in new else "seed") for r in rows)
    assert m["answers"]["asked"] == 4 and m["answers"]["kept"] == m["generated"] == len(rows)
    assert 0 < m["gen_blocks"] <= 8  # gen_share 0.5 of 16 blocks


def test_the_data_stage_is_deterministic_for_a_seed(tiny_teacher, tiny_data, tmp_path):
    from pistill.data import run

    cfg = DataConfig(**{k: v for k, v in tiny_data.manifest["config"].items() if k != "version"})
    again = run({"teacher": tiny_teacher}, cfg, tmp_path / "data")
    for name in ("generated.jsonl", "tasks.jsonl", "train.npy", "calib.npy", "heldout.npy"):
        assert again.file(name).read_bytes() == tiny_data.file(name).read_bytes(), name


def test_transformers_generator_path(tiny_teacher, tmp_path):
    from pistill.data import run

    cfg = DataConfig(block_size=64, calib_blocks=2, train_blocks=8, heldout_blocks=1, instructions=2, generate=3,
                     gen_tokens=8, generator="transformers", parallel=2, topk=8)
    m = run({"teacher": tiny_teacher}, cfg, tmp_path / "data").metrics
    assert m["generation"]["generator"] == "transformers" and "gguf_type" not in m["generation"]
    assert m["answers"]["asked"] == 3 and m["self_instruct"]["proposed"] >= 1


@pytest.mark.parametrize("share, rows, want", [(0.25, 40, 2), (0.0, 40, 0), (1.0, 12, None)])
def test_generated_text_fills_up_to_its_share_of_the_training_blocks(tiny_model, share, rows, want):
    """gen_share of 8 blocks when the answers fill them; fewer (what they fill, whole blocks) when they do not;
    the corpus fills the rest. Generated blocks are chat-formatted (they hold <|im_start|>)."""
    from transformers import AutoTokenizer

    from pistill.data import build_blocks

    tok = AutoTokenizer.from_pretrained(tiny_model)
    generated = [{"prompt": f"Task {i}.", "response": "An answer."} for i in range(rows)]  # shorter than a block
    cfg = DataConfig(block_size=64, calib_blocks=2, train_blocks=8, heldout_blocks=1, gen_share=share)
    blocks, n_gen = build_blocks(cfg, tok, generated)
    chat = (blocks["train"] == tok.convert_tokens_to_ids("<|im_start|>")).any(-1)
    assert blocks["train"].shape == (8, 64) and chat.sum() == n_gen
    if want is not None:
        assert n_gen == want
    else:
        assert 0 < n_gen < 8


def test_missing_corpus_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="corpus file .* does not exist"):
        DataConfig(corpus=str(tmp_path / "nope.txt")).validate_paths()


def test_jsonl_errors_name_the_file_and_the_real_line(tmp_path):
    from pistill.errors import InputError

    p = tmp_path / "c.jsonl"
    for body, match in [('{"text": "a"}\n\n\n[1, 2]\n', r"c.jsonl line 4 is a JSON list, not an object"),
                        ('\n{"text": "a"}\n{"text": \n', r"c.jsonl line 3 is not valid JSON"),
                        ('{"text": 7}\n', r"c.jsonl line 1: 'text' is a JSON int, not a string"),
                        ('\n\n{"body": "a"}\n', r"c.jsonl line 3 has no field 'text'")]:
        p.write_text(body)
        with pytest.raises(InputError, match=match):
            read_corpus(DataConfig(corpus=str(p)))
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_corpus(DataConfig(corpus=str(p))) == ["a", "b"]


def test_topk_above_the_vocabulary_fails_before_loading(tiny_teacher, tmp_path):
    from pistill.data import run
    from pistill.errors import InputError

    with pytest.raises(InputError, match=r"\[data\] topk = 100000 is more than the teacher's \d+ tokens"):
        run({"teacher": tiny_teacher}, DataConfig(topk=100_000), tmp_path / "data")
    assert not list(tmp_path.iterdir())


def test_a_teacher_llama_cpp_cannot_load_is_refused_before_loading(tiny_model, tmp_path):
    """A tokenizer the GGUF writer does not convert (here: not byte-level BPE): the data stage stops before any
    weight loads and names the other generator."""
    import shutil

    from pistill.artifact import Artifact
    from pistill.data import run
    from pistill.errors import InputError

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_model, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    teacher = Artifact(folder, {"stage": "teacher", "id": "t", "model": {"format": "hf", "file": "."}})
    with pytest.raises(InputError, match=r'not a byte-level BPE tokenizer.*set \[data\] generator = "transformers"'):
        run({"teacher": teacher}, DataConfig(generate=2, instructions=0), tmp_path / "data")
    assert not (tmp_path / "data").exists()
