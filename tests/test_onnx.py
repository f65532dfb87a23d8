"""ONNX export and OrtLM: parity with torch (fp32), int4 sanity, greedy decoding, config and input validation."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pistill.artifact import Artifact
from pistill.device.ortlm import OrtLM
from pistill.export.onnx import ONNXConfig, export, model_bytes, run


@pytest.fixture(scope="module")
def torch_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture(scope="module")
def onnx_dirs(tiny_model, tmp_path_factory):
    """The tiny model exported at fp32 and int4: {"fp32": folder, "int4": folder}."""
    root = tmp_path_factory.mktemp("onnx")
    return {p: export(tiny_model, root / p, ONNXConfig(precision=p)) for p in ("fp32", "int4")}


@pytest.fixture(scope="module")
def ids(tiny_model):
    from transformers import AutoTokenizer

    text = "Return a new list containing all items from the iterable in ascending order."
    return AutoTokenizer.from_pretrained(tiny_model)(text).input_ids


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_fp32_logits_match_torch(onnx_dirs, torch_model, ids):
    got, want = OrtLM(str(onnx_dirs["fp32"])).logits(ids), torch_logits(torch_model, ids)
    assert got.shape == (len(ids), torch_model.config.vocab_size) and got.dtype == np.float32
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() < 1e-4


def test_int4_is_close_and_smaller(onnx_dirs, torch_model, ids, record_property):
    got, want = OrtLM(str(onnx_dirs["int4"])).logits(ids), torch_logits(torch_model, ids)
    agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
    record_property("int4_top1_agreement", agreement)
    print(f"int4 top-1 agreement with torch: {agreement:.3f} over {len(ids)} tokens")
    assert agreement >= 0.8
    assert model_bytes(onnx_dirs["int4"]) < model_bytes(onnx_dirs["fp32"]) / 2


def test_folder_is_self_contained(onnx_dirs):
    names = {p.name for p in onnx_dirs["int4"].iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(n.startswith(".") for n in names)


def test_greedy_generate_matches_torch(onnx_dirs, torch_model, ids):
    import torch

    n = 40
    want = torch_model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert OrtLM(str(onnx_dirs["fp32"])).generate(ids, n) == want[0, len(ids):].tolist()


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_prefill_decode_equals_full_forward(onnx_dirs, precision):
    """Teacher-forced: each cached step predicts the full forward's argmax, across the cache's first growth."""
    lm = OrtLM(str(onnx_dirs[precision]))
    seq = np.random.default_rng(0).integers(3, lm.vocab_size, 300).tolist()
    full = lm.logits(seq).argmax(-1)
    k = 5
    steps = [lm.prefill(seq[:k])] + [lm.decode(t) for t in seq[k:]]
    assert lm.cache.capacity >= len(seq) > 256  # grew past the first buffer
    assert steps == full[k - 1:].tolist()


def test_generate_stops_at_eos(onnx_dirs, ids):
    lm = OrtLM(str(onnx_dirs["fp32"]))
    out = lm.generate(ids, 30)
    lm.spec = dataclasses.replace(lm.spec, eos_ids=(out[10],))  # pretend the 11th token is eos
    assert lm.generate(ids, 30, stop_at_eos=True) == out[: out.index(out[10]) + 1]
    assert lm.generate(ids, 30) == out


def test_decode_needs_prefill_and_context_is_bounded(onnx_dirs):
    lm = OrtLM(str(onnx_dirs["fp32"]))
    with pytest.raises(RuntimeError, match="prefill"):
        lm.decode(5)
    with pytest.raises(ValueError, match="context_length"):
        lm.logits([5] * (lm.spec.context_length + 1))
    with pytest.raises(ValueError, match="context_length"):
        lm.logits([])


def test_ortlm_imports_only_stdlib_numpy_onnxruntime():
    """The file is copied to the Pi on its own: no torch, no pistill, no onnxruntime-genai."""
    src = Path(__file__).parent.parent / "device" / "ortlm.py"
    tree = ast.parse(src.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert mods - set(sys.stdlib_module_names) <= {"numpy", "onnxruntime"}


@pytest.mark.parametrize("cfg", [ONNXConfig(), ONNXConfig(precision="fp32"),
                                 ONNXConfig(block_size=128, accuracy_level=1),
                                 ONNXConfig(verify=False, verify_fp32=False, gen_tokens=4)])
def test_config_round_trip(cfg):
    assert ONNXConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize("field, value, match", [
    ("precision", "int8", "precision 'int8'"),
    ("precision", "fp16", "precision 'fp16'"),
    ("block_size", 48, "block_size 48"),
    ("block_size", 0, "block_size 0"),
    ("accuracy_level", 0, "accuracy_level 0"),
    ("accuracy_level", 5, "accuracy_level 5"),
    ("gen_tokens", 0, "gen_tokens = 0"),
])
def test_bad_config_raises(field, value, match):
    with pytest.raises(ValueError, match=match):
        ONNXConfig(**{field: value})


def _folder(path: Path, config: dict | None) -> Path:
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config, match", [
    (None, "no config.json"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "architecture 'gpt2'.*supported: .*llama"),
    ({"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}, "bitsandbytes-quantized"),
])
def test_bad_source_fails_before_writing(tmp_path, config, match):
    src = _folder(tmp_path / "src", config)
    student = Artifact(src, {"stage": "distill", "id": "x", "model": {"format": "hf", "file": "."}})
    with pytest.raises(ValueError, match=match):
        export(src, tmp_path / "out", ONNXConfig())
    with pytest.raises(ValueError, match=match):
        run({"distill": student, "data": student}, ONNXConfig(), tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _copy(src: Path, dst: Path, drop: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / drop).unlink()
    return dst


@pytest.mark.parametrize("drop, match", [("tokenizer.json", "no tokenizer.json"),
                                         ("model.safetensors", "no \\*.safetensors")])
def test_missing_files_fail_before_writing(tiny_model, tmp_path, drop, match):
    src = _copy(tiny_model, tmp_path / "src", drop)
    with pytest.raises(ValueError, match=match):
        export(src, tmp_path / "out", ONNXConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_run_writes_verified_int4_artifact(tiny_teacher, tiny_data, tmp_path):
    art = run({"distill": tiny_teacher, "data": tiny_data}, ONNXConfig(gen_tokens=8), tmp_path / "onnx")
    assert art.model == {"format": "onnx", "file": "model"} and (art.model_path() / "model.onnx").is_file()
    m = art.metrics
    assert m["params"] == tiny_teacher.metrics["params"] and m["bytes"] == model_bytes(art.model_path())
    assert m["bits_per_weight"] == pytest.approx(8 * m["bytes"] / m["params"])
    assert m["n_tokens"] > 0 and m["ppl"] > 1 and 0.8 <= m["agreement"] <= 1
    assert {"agreement", "kl", "ppl_delta"} <= set(m["vs_student"]) and m["vs_student"]["agreement"] >= 0.8
    # the throwaway fp32 build reproduces torch; the folder's tokenizer reproduces the HF one
    assert m["unquantized_agreement"] == 1.0 and abs(m["unquantized_ppl_delta"]) < 1e-5
    assert m["generation_parity"]["equal"] == 3 and m["generation_parity"]["tokens"] == 8
    assert m["tokenizer_parity"]["ok"] and m["tokenizer_parity"]["eos_ok"]
    assert Artifact.load(art.path, "onnx").manifest["config"]["precision"] == "int4"
    assert not list(tmp_path.glob(".*"))


def test_run_fp32_verifies_itself_and_fails_when_off(tiny_teacher, tiny_data, tmp_path, monkeypatch):
    from pistill.export import onnx
    from pistill.export.verify import VerificationError

    art = run({"distill": tiny_teacher, "data": tiny_data}, ONNXConfig(precision="fp32", gen_tokens=4), tmp_path / "ok")
    assert art.metrics["agreement"] == pytest.approx(1.0) and art.metrics["unquantized_agreement"] == 1.0
    score = onnx.score_exports

    def off(folders, data, reference=None, vocab=None):  # an exporter whose fp32 graph is 3% off torch
        got = score(folders, data, reference, vocab)
        got["model"]["vs_student"].update(decided_agreement=0.97)
        return got

    monkeypatch.setattr(onnx, "score_exports", off)
    with pytest.raises(VerificationError, match="fp32 ONNX export .* agreement 0.9700 < 0.99"):
        run({"distill": tiny_teacher, "data": tiny_data}, ONNXConfig(precision="fp32", gen_tokens=4), tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
