"""pistill.compress.lora: adapters train alone, the merge computes what was trained, exports, resumes, bad configs."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from test_distill import blocks, killed_after, launch, load

from pistill.compress import checkpoints, distill, lora
from pistill.compress.distill import CHECKPOINT, TRAIN_LOG, DistillConfig, train

LORA = DistillConfig(method="lora", lora_rank=4, lora_alpha=8.0, steps=6, lr=1e-2, warmup_steps=1, eval_every=3,
                     ckpt_every=0)


@pytest.fixture(scope="module")
def teacher(tiny_model):
    """The tiny model with a sharper output (final norm x20): the student (the tiny model itself) has to move."""
    model = load(tiny_model).eval()
    model.model.norm.weight.data *= 20
    return model


def frozen_state(model) -> dict:
    """Every tensor of the peft model but the adapters (the 4-bit blocks included), copied."""
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def adapters(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def sha(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def lora_params(folder, rank: int) -> int:
    """r (in + out) for each of the 7 linear weights of every decoder layer, from the config alone."""
    c = json.loads((folder / "config.json").read_text())
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    per_layer = (h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h)  # q, o; k, v; gate, up; down
    return rank * per_layer * c["num_hidden_layers"]


@pytest.fixture(scope="module")
def trained(tiny_model, teacher):
    """QLoRA adapters (NF4 base) trained for LORA.steps on the tiny model: (peft model, summary)."""
    adapted = lora.load_adapted(tiny_model, LORA, "cpu")
    return adapted, train(adapted, teacher, blocks(), blocks(2, seed=1), LORA)


# --- training -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["nf4", "none"])
def test_adapters_train_and_nothing_else_moves(tiny_model, teacher, base):
    from peft.tuners.lora import LoraLayer

    before_folder, cfg = sha(tiny_model), dataclasses.replace(LORA, lora_base=base)
    adapted = lora.load_adapted(tiny_model, cfg, "cpu")
    frozen, start = frozen_state(adapted), adapters(adapted)
    summary = train(adapted, teacher, blocks(), blocks(2, seed=1), cfg)
    assert summary["loss_last"] < summary["loss_first"]
    assert lora.trainable_params(adapted) == lora_params(tiny_model, cfg.lora_rank) == 8192
    wrapped = {n.rsplit(".", 1)[-1] for n, m in adapted.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(lora.target_names(load(tiny_model))) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"}
    after = frozen_state(adapted)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], v) for k, v in frozen.items())
    moved = adapters(adapted)
    assert all(not torch.equal(moved[k], v) for k, v in start.items() if "lora_B" in k)  # B starts at zero
    assert sha(tiny_model) == before_folder
    base_q = adapted.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert (type(base_q).__name__ == "Linear4bit") == (base == "nf4")
    assert type(adapted.base_model.model.lm_head) is torch.nn.Linear  # neither quantized nor adapted


def test_full_checkpoints_keep_every_tensor_and_lora_ones_the_adapters(tiny_model, trained):
    full = load(tiny_model)
    assert checkpoints.trainable_state(full).keys() == full.state_dict().keys()
    adapted, _ = trained
    state = checkpoints.trainable_state(adapted)
    assert state.keys() == adapters(adapted).keys() and all("lora_" in k for k in state)


# --- merge --------------------------------------------------------------------------------------------------------

def test_merged_model_computes_what_was_trained(tiny_model, trained):
    """The merge is dequantize(NF4(W)) + (alpha / r) B A, and its logits are the peft model's."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    adapted, _ = trained
    merged = lora.merge(adapted, tiny_model, LORA)
    x = torch.as_tensor(blocks(2, seed=3).astype(np.int64))
    with torch.no_grad():
        want, got = adapted.eval()(input_ids=x).logits, merged(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (got - load(tiny_model)(input_ids=x).logits).abs().max() > 1e-3  # the adapters matter
    w = load(tiny_model).model.layers[1].mlp.down_proj.weight.data
    q, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    layer = adapted.base_model.model.model.layers[1].mlp.down_proj
    delta = (LORA.lora_alpha / LORA.lora_rank) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, dequantize_4bit(q, state) + delta)


@pytest.mark.gpu
def test_qlora_on_cuda_trains_and_merges(tiny_model, teacher):
    adapted = lora.load_adapted(tiny_model, LORA, "cuda")
    summary = train(adapted, teacher.cuda(), blocks(), blocks(2, seed=1), LORA)
    teacher.cpu()
    assert summary["loss_last"] < summary["loss_first"]
    merged, x = lora.merge(adapted, tiny_model, LORA), torch.as_tensor(blocks(2, seed=3).astype(np.int64)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted.eval()(input_ids=x).logits, rtol=1e-4,
                                   atol=1e-4)


def test_lora_stage_writes_a_plain_model_that_exports_to_gguf(tiny_teacher, tiny_data, tmp_path):
    """The stage with method lora: an ordinary HF folder (no peft keys or files), the LoRA figures in the manifest,
    and llama.cpp computes its logits from the F32 GGUF."""
    from pistill.export.gguf_convert import write_gguf
    from pistill.models import count_params

    cfg = dataclasses.replace(LORA, steps=2, ckpt_every=1)
    inputs = {"quantize": tiny_teacher, "prune": tiny_teacher, "data": tiny_data}
    art = distill.run(inputs, cfg, tmp_path / "distill")
    m = art.metrics
    assert art.manifest["method"] == "lora" and m["lora_rank"] == 4 and m["steps"] == 2
    assert m["trainable_params"] == lora_params(tiny_teacher.model_path(), 4) and m["adapter_bytes"] == 4 * 8192
    assert m["params"] == tiny_teacher.metrics["params"] and np.isfinite(m["ppl"])
    model = load(art.model_path()).eval()
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    assert not (art.path / "adapter_config.json").exists() and count_params(model) == m["params"]
    assert not distill.checkpoint_dir(tmp_path / "distill").exists()

    import llama_cpp

    ids = blocks(1, 24, seed=4)[0].tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(write_gguf(art.model_path(), tmp_path / "m.gguf", "f32")), n_ctx=64,
                          n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


# --- kill and resume ----------------------------------------------------------------------------------------------

def test_kill_and_resume_matches_an_uninterrupted_run(tiny_model, teacher, tmp_path, monkeypatch):
    """Checkpoints every 2 steps hold the adapters alone; killed in step 4, a fresh process reloads the 4-bit base
    from the student folder, resumes from step 2 and ends with the adapters and merged weights of a run never
    stopped."""
    cfg = dataclasses.replace(LORA, grad_accum=2, batch_size=2, ckpt_every=2)
    data = blocks()
    whole = lora.load_adapted(tiny_model, cfg, "cpu")
    want = train(whole, teacher, data, data[:2], cfg, tmp_path / "whole")
    with killed_after(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        train(lora.load_adapted(tiny_model, cfg, "cpu"), teacher, data, data[:2], cfg, tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert state["step"] == 2 and state["model"].keys() == adapters(whole).keys()
    resumed = lora.load_adapted(tiny_model, cfg, "cpu")
    got = train(resumed, teacher, data, data[:2], cfg, tmp_path / "resumed")
    assert got["loss_last"] == pytest.approx(want["loss_last"], rel=1e-5) and got["loss_first"] == want["loss_first"]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # step 3 redone, not logged twice
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    a, b = adapters(whole), adapters(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for x, y in zip(lora.merge(whole, tiny_model, cfg).parameters(), lora.merge(resumed, tiny_model, cfg).parameters()):
        assert torch.allclose(x, y, atol=1e-6)


# --- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"method": "qlora"}, "method 'qlora' is not supported; use full .* or lora"),
    ({"method": "lora", "qat": "q4_0"}, "QAT trains the full weights; use qat = \"none\" with lora"),
    ({"lora_rank": 0}, "lora_rank = 0 must be at least 1"),
    ({"lora_alpha": 0.0}, "lora_alpha = 0.0 must be positive"),
    ({"lora_dropout": 1.0}, r"lora_dropout = 1.0 must be in \[0, 1\)"),
    ({"lora_base": "nf8"}, "lora_base 'nf8' is not supported; use nf4 .* or none"),
])
def test_config_rejects_bad_lora_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DistillConfig(**kwargs)


def test_recipe_names_the_field():
    from pistill import recipe

    with pytest.raises(recipe.RecipeError, match=r"\[distill\] .*QAT trains the full weights"):
        recipe.from_dict({"distill": {"method": "lora", "qat": "int4"}})
    assert recipe.from_dict({"distill": {"method": "lora", "lora_rank": 8}}).configs["distill"].lora_rank == 8


def test_two_cpu_processes_train_the_same_adapters(tiny_teacher, tiny_data, tmp_path):
    """compress/distill_launch.py with method lora under torchrun (two CPU processes, gloo): DDP all-reduces the
    adapters' gradients alone, both ranks end with the same merged weights, and the saved student is that model."""
    from pistill.compress.distill_launch import state_digest

    (tmp_path / "r.toml").write_text('[distill]\nmethod = "lora"\nlora_rank = 4\nlr = 0.01\n')
    hashes = launch(tiny_teacher, tiny_teacher, tiny_data, tmp_path, "--recipe", str(tmp_path / "r.toml"))
    assert len(set(hashes.values())) == 1 and hashes["rank0.sha256"] != state_digest(load(tiny_teacher.model_path()))
    assert state_digest(load(tmp_path / "ddp")) == hashes["rank0.sha256"]
