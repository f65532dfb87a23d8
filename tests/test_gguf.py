"""GGUF export: llama.cpp reproduces the torch model's logits and the HF tokenizer's ids; bad input fails early."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from pistill.export.gguf import GGUFConfig, gguf_quant, gguf_stats, run
from pistill.export.gguf_convert import LLAMA3_RE, QWEN2_RE, permute_rope, pre_tokenizer_name, write_gguf
from pistill.export.gguf_quantize import QUANT_FTYPES, quantize_gguf
from pistill.hf_folder import ARCHITECTURES, tied_embeddings

TEXTS = [
    "héllo wörld — naïve café ✓ 日本語 🙂",
    "digits 1234567890, 3.14159 and 2024-05-01",
    "  spaces   and\n\n\ttabs  \n   ",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code\n",
]
TOKENS = [3, 17, 100, 42, 7, 300, 12, 5, 99, 250, 1, 64, 128, 33, 200, 8, 11, 480, 2, 77, 19, 21, 350, 6] * 2


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


def _torch_logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama(path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, n_batch=128, logits_all=True,
                           verbose=False)


def _gguf_logits(path, ids):
    llm = _llama(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _tensor_names(path):
    import gguf

    return {t.name for t in gguf.GGUFReader(path).tensors}


def _variant(src, dst, model_type="llama", tokenizer=None, **changes):
    """A freshly initialised model of a changed config (fast: no training) with src's tokenizer, or `tokenizer`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = json.loads((src / "config.json").read_text())
    keep = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                 "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")}
    cfg = AutoConfig.for_model(model_type, **{**keep, "tie_word_embeddings": True, **changes})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # biases start at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
        return dst
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, dst / f.name)
    return dst


VARIANTS = {  # name -> _variant arguments; None: the tiny_model fixture itself
    "tied": None,
    "untied": dict(tie_word_embeddings=False),
    "head_dim": dict(head_dim=32),  # n_head * head_dim != hidden: key_length / value_length keys
    "llama3_rope": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
}


@pytest.fixture
def variant_folder(request, tiny_model, tmp_path):
    args = VARIANTS[request.param]
    return tiny_model if args is None else _variant(tiny_model, tmp_path / request.param, **args)


@pytest.mark.parametrize("variant_folder", list(VARIANTS), indirect=True)
def test_f32_matches_torch(variant_folder, tmp_path):
    path = write_gguf(variant_folder, tmp_path / "m.gguf", "f32")
    ref, got = _torch_logits(variant_folder, TOKENS), _gguf_logits(path, TOKENS)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    tied = tied_embeddings(json.loads((variant_folder / "config.json").read_text()))
    assert ("output.weight" in _tensor_names(path)) != tied
    assert not list(tmp_path.glob("*.tmp"))


def test_f16_agrees_with_torch(tiny_model, tmp_path):
    path = write_gguf(tiny_model, tmp_path / "m.gguf", "f16")
    ref, got = _torch_logits(tiny_model, TOKENS), _gguf_logits(path, TOKENS)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    assert gguf_stats(path)["tensor_types"] == {"F16": 15, "F32": 5}  # 2-D in F16, norms in F32


@pytest.fixture(scope="module")
def f32_gguf(tiny_model, tmp_path_factory):
    return write_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "model-f32.gguf", "f32")


@pytest.mark.parametrize("text", TEXTS + ["chat"])
def test_tokenization_matches_hf(tiny_model, f32_gguf, text):
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    if text == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": "Name 3 primes."},
                                        {"role": "assistant", "content": "2, 3 and 5."}], tokenize=False)
    llm = llama_cpp.Llama(model_path=str(f32_gguf), vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()
    assert ids == tok(text, add_special_tokens=False).input_ids


def test_special_tokens_and_template(tiny_model, f32_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    llm = _llama(f32_gguf)
    try:
        meta = llm.metadata
    finally:
        llm.close()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert int(meta["tokenizer.ggml.bos_token_id"]) == tok.bos_token_id
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] == "false"  # the tiny HF tokenizer adds no bos
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["llama.attention.head_count_kv"] == "2" and meta["llama.context_length"] == "512"


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
def test_quantized_file_is_smaller_and_loads(f32_gguf, tmp_path, quant):
    path = quantize_gguf(f32_gguf, tmp_path / f"model-{quant}.gguf", quant, threads=1)
    stats = gguf_stats(path)
    assert stats["bytes"] < f32_gguf.stat().st_size
    assert quant in stats["tensor_types"] and stats["bits_per_weight"] < 9
    assert np.isfinite(_gguf_logits(path, TOKENS)).all()


def test_k_quant_falls_back_on_narrow_rows(f32_gguf, tmp_path, caplog):
    path = quantize_gguf(f32_gguf, tmp_path / "model-Q4_K_M.gguf", "Q4_K_M", threads=1)
    assert "not a multiple of 256" in caplog.text  # hidden 64: every tensor falls back
    assert "Q4_K" not in gguf_stats(path)["tensor_types"]


def _output_types(path):
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors
            if t.name in ("output.weight", "token_embd.weight")}


@pytest.mark.parametrize("quant, output_type", [("Q4_0", "Q8_0"), ("Q4_0", "Q4_0"), ("Q4_0", "IQ4_NL"),
                                                ("Q8_0", "Q4_0"), ("Q4_0", "F16")])
def test_output_type_sets_the_tied_embedding(f32_gguf, tmp_path, quant, output_type):
    path = quantize_gguf(f32_gguf, tmp_path / "q.gguf", quant, threads=1, output_type=output_type)
    assert _output_types(path) == {"token_embd.weight": output_type}  # tied: the embedding is the output projection
    assert np.isfinite(_gguf_logits(path, TOKENS)).all()


def test_output_type_sets_only_the_output_of_an_untied_model(tiny_model, tmp_path):
    src = write_gguf(_variant(tiny_model, tmp_path / "untied", tie_word_embeddings=False), tmp_path / "u.gguf", "f32")
    path = quantize_gguf(src, tmp_path / "q.gguf", "Q4_0", threads=1, output_type="IQ4_NL")
    assert _output_types(path) == {"output.weight": "IQ4_NL", "token_embd.weight": "Q4_0"}


def test_k_quant_output_type_on_narrow_rows_is_refused(f32_gguf, tmp_path):
    with pytest.raises(ValueError) as err:  # hidden 64: Q6_K needs 256, llama.cpp would fall back to Q8_0
        quantize_gguf(f32_gguf, tmp_path / "q.gguf", "Q4_0", threads=1, output_type="Q6_K")
    msg = str(err.value)
    assert "[gguf] output_type" in msg and "multiple of 256" in msg and "64 wide" in msg and "\n" not in msg
    assert "Q4_0, IQ4_NL, Q8_0, F16" in msg
    assert not list(tmp_path.iterdir())


def test_run_refuses_an_output_type_before_writing(tiny_teacher, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="output_type"):
        run({"distill": tiny_teacher, "data": tiny_data}, GGUFConfig(output_type="Q6_K", verify=False), tmp_path / "g")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("quants, student_cfg, hidden, expected", [
    (("student", "Q8_0"), {"quants": ["Q4_0"], "output_type": "Q4_0"}, 64, {"Q4_0": "Q4_0"}),
    (("student", "Q8_0"), {"quants": ["Q4_0"], "output_type": ""}, 64, {}),
    (("student", "Q8_0"), {"quants": ["Q4_0"]}, 64, {}),  # a manifest from before the option
    (("Q8_0",), {"quants": ["Q4_0"], "output_type": "Q4_0"}, 64, {}),  # no file of the student's type
    (("student",), {"quants": ["Q4_0"], "output_type": "Q6_K"}, 576, {}),  # the teacher's rows do not fit
    (("student",), {"quants": ["Q4_0"], "output_type": "Q6_K"}, 512, {"Q4_0": "Q6_K"}),
])
def test_baseline_takes_the_students_output_type(quants, student_cfg, hidden, expected):
    from pistill.export.baseline import BaselineConfig, output_types

    assert output_types(BaselineConfig(quants=quants), {"config": student_cfg}, "Q4_0", hidden) == expected


def test_unknown_quant_lists_valid_ones(f32_gguf, tmp_path):
    with pytest.raises(ValueError, match="Q4_0, Q4_1, Q8_0"):
        GGUFConfig(quants=("Q3_X",))
    with pytest.raises(ValueError, match="quant type 'q4_0' is unknown"):
        quantize_gguf(f32_gguf, tmp_path / "x.gguf", "q4_0")
    assert not list(tmp_path.iterdir())


def test_failed_quantization_names_llama_cpp_reason(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(RuntimeError, match="failed to quantize .*gguf"):
        quantize_gguf(bad, tmp_path / "q.gguf", "Q4_0", threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_quant_table_matches_llama_cpp():
    import llama_cpp

    for name, ftype in QUANT_FTYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") == ftype


def _broken(src, dst, drop=(), **config):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


@pytest.mark.parametrize("drop, config, message", [
    (("tokenizer.json",), {}, "has no tokenizer.json"),
    ((), {"model_type": "gpt2"}, "architecture 'gpt2' is not supported.*supported: llama, mistral, qwen2"),
    (("model.safetensors",), {}, "no \\*.safetensors"),
    ((), {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
])
def test_bad_folder_fails_before_writing(tiny_model, tmp_path, drop, config, message):
    folder = _broken(tiny_model, tmp_path / "bad", drop, **config)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=message):
        write_gguf(folder, out / "m.gguf", "f32")
    assert not list(out.iterdir())


@pytest.mark.parametrize("manifest, expected", [
    ({"config": {"outtype": "f16", "quants": ["Q4_K_M", "Q8_0"]}}, "Q4_K_M"),
    ({"config": {"outtype": "f16", "quants": []}}, "F16"),
    ({"config": {}}, None),
    ({}, None),
])
def test_gguf_quant(manifest, expected):
    assert gguf_quant(manifest) == expected


def test_permute_rope_maps_rotate_half_to_adjacent_pairs():
    """Rope on permuted rows with llama.cpp's pairs (2i, 2i+1) equals permuted HF rope with (i, i + d/2)."""
    rng = np.random.default_rng(0)
    n_head, d = 3, 8
    x, theta = rng.normal(size=n_head * d), rng.uniform(0, 3, size=d // 2)
    cos, sin = np.cos(theta), np.sin(theta)

    def hf(v):  # rotate_half
        a, b = v.reshape(n_head, 2, d // 2).transpose(1, 0, 2)
        return np.stack([a * cos - b * sin, b * cos + a * sin], 1).reshape(-1)

    def pairs(v):  # llama.cpp LLAMA (rope "norm")
        a, b = v.reshape(n_head, d // 2, 2).transpose(2, 0, 1)
        return np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1)

    assert np.allclose(pairs(permute_rope(x, n_head)), permute_rope(hf(x), n_head))
    w = rng.normal(size=(n_head * d, 5))
    assert np.allclose(pairs(permute_rope(w, n_head) @ x[:5]), permute_rope(hf(w @ x[:5]), n_head))


def _byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {  # llama.cpp name -> tokenizer.json pre_tokenizer
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_RE), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_RE), _byte_level(False)]},
    "default": {"type": "Whitespace"},
}


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_pre_tokenizer_name(name, caplog):
    assert pre_tokenizer_name({"pre_tokenizer": PRE_TOKENIZERS[name]}) == name
    assert ("not one llama.cpp knows" in caplog.text) == (name == "default")


def _bpe_tokenizer(pre: dict):
    """A 512-token byte-level BPE trained with the given pre-tokenizer on a few stdlib docstrings (~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import SPECIAL, _training_text

    spec = json.loads(Tokenizer(models.BPE()).to_str())
    tok = Tokenizer.from_str(json.dumps({**spec, "pre_tokenizer": pre}))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(60), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[1], eos_token=SPECIAL[2],
                                   unk_token=SPECIAL[0])


@pytest.mark.parametrize("name", ["smollm", "llama-bpe", "qwen2"])
def test_each_known_pre_tokenizer_matches_hf(tiny_model, tmp_path, name):
    import llama_cpp

    tok = _bpe_tokenizer(PRE_TOKENIZERS[name])
    path = write_gguf(_variant(tiny_model, tmp_path / "m", tokenizer=tok), tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == name
        for text in TEXTS:
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == \
                tok(text, add_special_tokens=False).input_ids, text
    finally:
        llm.close()


@pytest.mark.parametrize("bad", [dict(outtype="bf16"), dict(quants=("Q4_0", "Q4_0")), dict(threads=-1),
                                 dict(evaluate="some"), dict(quants=(), keep_unquantized=False),
                                 dict(gen_tokens=0), dict(num_ctx=0), dict(output_type="Q5_K"),
                                 dict(output_type="q8_0")])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
        GGUFConfig(**bad)


def test_unknown_output_type_lists_valid_ones():
    with pytest.raises(ValueError, match="output_type = 'Q5_K' is unknown; use one of Q6_K, Q4_0, IQ4_NL, Q8_0, F16"):
        GGUFConfig(output_type="Q5_K")


@pytest.mark.parametrize("cfg", [GGUFConfig(), GGUFConfig(outtype="f32", quants=["Q8_0", "Q4_K_M"], threads=1),
                                 GGUFConfig(quants=[], evaluate="all"),
                                 GGUFConfig(verify=False, imatrix=False, gen_tokens=4, num_ctx=512),
                                 GGUFConfig(output_type="IQ4_NL")])
def test_config_round_trips_through_json(cfg):
    assert GGUFConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_architectures_are_llama_family():
    assert set(ARCHITECTURES) == {"llama", "mistral", "qwen2"}


def test_run_writes_a_gguf_artifact(tiny_teacher, tiny_data, tmp_path):
    cfg = GGUFConfig(outtype="f16", quants=("Q8_0", "Q4_0"), threads=1, gen_tokens=8)
    art = run({"distill": tiny_teacher, "data": tiny_data}, cfg, tmp_path / "gguf")
    assert art.model == {"format": "gguf", "file": "model-Q8_0.gguf"}
    assert art.model_path().is_file() and art.path == tmp_path / "gguf"
    m, detail = art.metrics, art.manifest["files_detail"]
    assert set(detail) == {"model-f16.gguf", "model-Q8_0.gguf", "model-Q4_0.gguf"}
    assert m["bytes"] == art.model_path().stat().st_size and m["params"] == detail["model-f16.gguf"]["params"]
    assert detail["model-f16.gguf"]["agreement"] >= 0.99 and 8 < m["bits_per_weight"] < 9
    assert {"ppl", "kl", "n_tokens"} <= set(m)
    assert detail["model-Q4_0.gguf"]["bytes"] < m["bytes"] < detail["model-f16.gguf"]["bytes"]
    # verification: every file against the torch student, the unquantized one gated
    assert all({"agreement", "kl", "ppl_delta"} <= set(d["vs_student"]) for d in detail.values())
    assert m["vs_student"] == detail["model-Q8_0.gguf"]["vs_student"]
    assert m["unquantized_agreement"] >= 0.99 and abs(m["unquantized_ppl_delta"]) <= 0.01
    assert m["tokenizer_parity"]["ok"] and m["tokenizer_parity"]["chats"] == 3
    assert m["generation_parity"]["ok"] and m["generation_parity"]["tokens"] == 8
    assert m["imatrix"] == {"tensors": 14, "chunks": 4} and m["verified_with"] == "model-f16.gguf"
    assert (art.path / "Modelfile").read_text().startswith("FROM ./model-Q8_0.gguf\n")
    assert "Modelfile" in art.manifest["files"]


@pytest.mark.parametrize("outtype, broken, match", [
    ("f32", ("f32",), "model-f32.gguf does not reproduce the torch model.*agreement"),
    ("f16", ("f16", "f32"), "the F32 GGUF of .* does not reproduce the torch model"),  # F32 decides: broken
    ("f16", ("f16",), None),  # only F16 is off (rounding): the F32 export passes, the stage succeeds
])
def test_run_fails_when_the_unquantized_file_is_off(tiny_teacher, tiny_data, tmp_path, monkeypatch, caplog,
                                                    outtype, broken, match):
    """A broken exporter (token embeddings off by one row) is caught by the parity gate; nothing is left behind."""
    from pistill.export import gguf_convert
    from pistill.export.verify import VerificationError

    convert = gguf_convert.convert_tensor
    monkeypatch.setattr(gguf_convert, "convert_tensor", lambda name, arr, config, out: convert(
        name, np.roll(arr, 1, axis=0) if "embed_tokens" in name and out in broken else arr, config, out))
    cfg = GGUFConfig(outtype=outtype, quants=(), threads=1, imatrix=False, gen_tokens=4)
    if match is None:
        m = run({"distill": tiny_teacher, "data": tiny_data}, cfg, tmp_path / "gguf").metrics
        assert m["verified_with"] == "f32" and m["f32_check"]["unquantized_agreement"] == 1.0
        assert m["unquantized_agreement"] < 0.99 and "F16 loses precision on this model" in caplog.text
        return
    with pytest.raises(VerificationError, match=match):
        run({"distill": tiny_teacher, "data": tiny_data}, cfg, tmp_path / "gguf")
    assert not list(tmp_path.iterdir())


def test_run_with_a_bad_student_leaves_nothing(tiny_teacher, tiny_data, tmp_path):
    from pistill.artifact import Artifact

    folder = _broken(tiny_teacher.path, tmp_path / "student", drop=("tokenizer.json",))
    with pytest.raises(ValueError, match="tokenizer.json"):
        run({"distill": Artifact.load(folder), "data": tiny_data}, GGUFConfig(), tmp_path / "gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["student"]
