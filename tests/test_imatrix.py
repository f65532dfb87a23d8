"""Importance matrix: collected from torch activations, keyed by GGUF name, handed to llama.cpp's quantizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pistill.export.gguf_convert import check_folder, tensor_names, write_gguf
from pistill.export.gguf_quantize import quantize_gguf
from pistill.export.imatrix import LlamaImatrix, collect

BLOCKS = np.random.default_rng(0).integers(3, 500, size=(3, 24))


@pytest.fixture(scope="module")
def model_and_names(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tensor_names(tiny_model, check_folder(tiny_model)[0])


@pytest.fixture(scope="module")
def imatrix(model_and_names):
    model, names = model_and_names
    return collect(model, BLOCKS, names)


def test_one_entry_per_block_linear_sized_by_its_input(imatrix, tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    widths = {"attn_q": 64, "attn_k": 64, "attn_v": 64, "attn_output": 64, "ffn_gate": 64, "ffn_up": 64,
              "ffn_down": cfg["intermediate_size"]}
    want = {f"blk.{i}.{k}.weight": w for i in range(cfg["num_hidden_layers"]) for k, w in widths.items()}
    assert {k: v.shape[0] for k, v in imatrix.items()} == want  # no token_embd / output, as llama.cpp's default
    assert all(v.dtype == np.float32 and (v > 0).all() for v in imatrix.values())
    assert np.array_equal(imatrix["blk.0.attn_q.weight"], imatrix["blk.0.attn_k.weight"])  # the same input


def test_values_are_mean_squared_inputs(model_and_names, imatrix):
    import torch

    model, _ = model_and_names
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0][0]))
    with torch.no_grad():
        for block in BLOCKS:
            model(torch.tensor(block[None]))
    h.remove()
    x = torch.cat(seen)  # (N * T, ffn)
    assert np.allclose(imatrix["blk.1.ffn_down.weight"], x.pow(2).mean(0).numpy(), rtol=1e-5)


def test_quantizer_takes_it_and_records_it(tiny_model, imatrix, tmp_path):
    import gguf

    base = write_gguf(tiny_model, tmp_path / "m-f32.gguf", "f32")
    plain = quantize_gguf(base, tmp_path / "plain.gguf", "Q4_0", threads=1)
    weighted = quantize_gguf(base, tmp_path / "imatrix.gguf", "Q4_0", threads=1,
                             imatrix=LlamaImatrix(imatrix, len(BLOCKS), "test calib"))
    fields = gguf.GGUFReader(weighted).fields
    assert int(fields["quantize.imatrix.entries_count"].contents()) == len(imatrix)
    assert int(fields["quantize.imatrix.chunks_count"].contents()) == len(BLOCKS)
    assert fields["quantize.imatrix.dataset"].contents() == "test calib"
    assert "quantize.imatrix.entries_count" not in gguf.GGUFReader(plain).fields

    def data(path, name):
        return next(t.data for t in gguf.GGUFReader(path).tensors if t.name == name)

    assert not np.array_equal(data(plain, "blk.0.ffn_down.weight"), data(weighted, "blk.0.ffn_down.weight"))
