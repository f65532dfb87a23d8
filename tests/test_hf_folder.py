"""HF folders: the architecture registry agrees with transformers and llama.cpp; check_hf_folder fails in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from pistill.errors import InputError
from pistill.hf_folder import (ARCHITECTURES, TOKENIZER_FILES, check_architecture, check_hf_folder,
                               copy_tokenizer_files, qkv_bias, read_json, tied_embeddings)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_tie_default_is_transformers_config_default(model_type):
    from transformers import AutoConfig

    assert AutoConfig.for_model(model_type).tie_word_embeddings == ARCHITECTURES[model_type].tie_default
    assert tied_embeddings({"model_type": model_type}) == ARCHITECTURES[model_type].tie_default


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_qkv_bias_matches_the_transformers_model(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    attn = AutoModelForCausalLM.from_config(cfg).model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None) == qkv_bias(cfg.to_dict())


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_gguf_arch_is_known_to_llama_cpp(model_type):
    import gguf

    assert ARCHITECTURES[model_type].gguf_arch.upper() in gguf.MODEL_ARCH.__members__


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(InputError, match=r"architecture 'gpt2' is not supported by the GGUF writer \(x\); "
                                         r"supported: llama, mistral, qwen2$"):
        check_architecture({"model_type": "gpt2"}, "x", "the GGUF writer")


@pytest.mark.parametrize("drop, config, match", [
    (("config.json",), {}, "no config.json; the ONNX export needs a Hugging Face model folder"),
    ((), {"model_type": "gpt2"}, "architecture 'gpt2' is not supported by the ONNX export"),
    ((), {"quantization_config": {"quant_method": "bitsandbytes"}}, "holds a bitsandbytes-quantized model"),
    (("tokenizer.json",), {}, "no tokenizer.json"),
    (("model.safetensors",), {}, "no \\*.safetensors"),
    ((), {"num_hidden_layers": 3}, "num_hidden_layers = 3"),
])
def test_check_hf_folder_names_the_problem(tiny_model, tmp_path, drop, config, match):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_model, folder)
    if config:
        (folder / "config.json").write_text(json.dumps({**read_json(folder / "config.json"), **config}))
    for name in drop:
        (folder / name).unlink()
    with pytest.raises(InputError, match=match):
        check_hf_folder(folder, "the ONNX export")


def test_check_hf_folder_returns_config_and_entry(tiny_model):
    config, arch = check_hf_folder(tiny_model, "the GGUF writer")
    assert config["model_type"] == "llama" and arch == ARCHITECTURES["llama"]


def test_copy_tokenizer_files_keeps_what_is_there(tiny_model, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    copy_tokenizer_files(tiny_model, tmp_path)
    assert read_json(tmp_path / "tokenizer.json") == {}
    assert {p.name for p in tmp_path.iterdir()} == {n for n in TOKENIZER_FILES if (tiny_model / n).is_file()}
    assert read_json(tmp_path / "missing.json") == {}
