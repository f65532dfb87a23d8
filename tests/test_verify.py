"""Export fidelity checks: layer uniformity, tokenizer parity, logit parity math, greedy parity, the pass/fail gate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pistill import hf_folder
from pistill.evaluate import log_softmax
from pistill.export import verify
from pistill.export.verify import (MAX_PPL_DELTA, MIN_AGREEMENT, Parity, TorchLM, VerificationError, check_unquantized,
                                   generation_parity, kl_div)
from pistill.hf_folder import check_uniform_layers


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return TorchLM(tiny_model)


@pytest.fixture(scope="module")
def f32_gguf(tiny_model, tmp_path_factory):
    from pistill.export.gguf_convert import write_gguf

    return write_gguf(tiny_model, tmp_path_factory.mktemp("verify") / "model-f32.gguf", "f32")


def reshaped(src, dst, layer: int = 1, ffn: int = 96, config: dict | None = None):
    """A copy of `src` whose layer `layer` MLP is `ffn` wide (non-uniform), or with config.json changes."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    if ffn:
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            weights[name] = weights[name].narrow(dim, 0, ffn).contiguous()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return dst


# --- inputs ---------------------------------------------------------------------------------------------------------

def test_uniform_layers_pass(tiny_model):
    check_uniform_layers(tiny_model, json.loads((tiny_model / "config.json").read_text()))
    assert set(hf_folder.layer_shapes(tiny_model)) == {0, 1}


@pytest.mark.parametrize("ffn, config, match", [
    (96, None, r"layer 1 mlp.down_proj.weight has shape \(64, 96\) but layer 0 has \(64, 128\).*uniform layers"),
    (0, {"intermediate_size": 256}, "MLP weights are 128 wide but config.json says intermediate_size = 256"),
    (0, {"num_hidden_layers": 3}, "num_hidden_layers = 3"),
])
def test_non_uniform_layers_fail_both_exporters_before_writing(tiny_model, tmp_path, ffn, config, match):
    from pistill.export.gguf_convert import write_gguf
    from pistill.export.onnx import ONNXConfig, export

    folder = reshaped(tiny_model, tmp_path / "bad", ffn=ffn, config=config)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=match):
        write_gguf(folder, out / "m.gguf", "f32")
    with pytest.raises(ValueError, match=match):
        export(folder, out / "onnx", ONNXConfig())
    assert not list(out.iterdir())


# --- tokenization ---------------------------------------------------------------------------------------------------

def test_gguf_tokenizer_parity(tiny_model, f32_gguf):
    got = verify.gguf_tokenizer_parity(f32_gguf, tiny_model)
    assert got == {"texts": len(verify.TEXTS) + 1, "text_mismatches": [], "chats": len(verify.CONVERSATIONS),
                   "chat_mismatches": [], "ok": True}


def test_tokenizer_parity_lists_mismatches(tiny_model, caplog):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model)

    def encode(text, special):  # wrong on digits only
        ids = hf(text, add_special_tokens=special).input_ids
        return ids[::-1] if any(c.isdigit() for c in text) else ids

    got = verify.tokenizer_parity(hf, encode, lambda messages: [0])
    assert got["text_mismatches"] == [t for t in verify.TEXTS if any(c.isdigit() for c in t)]
    assert len(got["chat_mismatches"]) == got["chats"] == len(verify.CONVERSATIONS) and not got["ok"]
    assert "tokenization differs" in caplog.text


def test_render_chat_matches_transformers(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for conv in verify.CONVERSATIONS:
        want = tok.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=False)
        assert verify.render_chat(tok.chat_template, list(conv), tok.bos_token, tok.eos_token) == want


# --- logits ---------------------------------------------------------------------------------------------------------

def test_parity_of_identical_and_shifted_logits():
    rng = np.random.default_rng(0)
    logits, ids = rng.normal(size=(6, 11)), rng.integers(0, 11, 6)
    p = Parity()
    p.add(log_softmax(logits), log_softmax(logits + 3.0), ids)  # a constant shift changes no probability
    r = p.result()
    assert r["agreement"] == 1 and abs(r["kl"]) < 1e-12 and abs(r["ppl_delta"]) < 1e-12 and r["n_tokens"] == 6
    assert r["decided_agreement"] == 1 and 0 < r["decided"] <= 6


def test_near_ties_do_not_count_against_decided_agreement():
    ref = np.array([[5.0, 4.99, 0, 0], [5.0, 1.0, 0, 0]])  # a near-tie (0.01 apart), then a clear choice
    p = Parity()
    p.add(log_softmax(ref), log_softmax(ref[:, [1, 0, 2, 3]]), np.array([0, 1]))  # both argmaxes flipped
    r = p.result()
    assert r["agreement"] == 0 and r["decided"] == 1 and r["decided_agreement"] == 0
    p = Parity()
    p.add(log_softmax(ref), log_softmax(np.array([[4.99, 5.0, 0, 0], [5.0, 1.0, 0, 0]])), np.array([0, 1]))
    assert p.result()["agreement"] == 0.5 and p.result()["decided_agreement"] == 1


def test_parity_figures_by_hand():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    lp = np.log(np.array([[0.25, 0.5, 0.25], [0.2, 0.6, 0.2]]))
    p = Parity()
    p.add(ref, lp, np.array([0, 1]))
    r = p.result()
    kl = [0.5 * np.log(2) + 0.25 * np.log(0.5), 0.2 * np.log(0.5) + 0.8 * np.log(0.8 / 0.6)]
    assert np.allclose(kl_div(ref, lp), kl) and r["kl"] == pytest.approx(np.mean(kl))
    # one next-token position: token 1 after position 0, p = 0.5 for the model and 0.25 for the reference
    assert r["agreement"] == 0.5 and r["ppl"] == pytest.approx(2) and r["ref_ppl"] == pytest.approx(4)
    assert r["ppl_delta"] == pytest.approx(-0.5)


def test_score_f32_gguf_matches_torch(reference, f32_gguf, tiny_data):
    from pistill.data import load_blocks
    from pistill.device.runtimes import LlamaCppRuntime

    rt = LlamaCppRuntime(str(f32_gguf), 1, 512)
    try:
        got = verify.score(reference, {"f32": rt}, tiny_data)["f32"]
    finally:
        rt.close()
    assert {"ppl", "agreement", "kl", "n_tokens"} <= set(got)  # against the teacher (here the same model)
    vs = got["vs_student"]
    assert vs["agreement"] == 1.0 and vs["kl"] < 1e-6 and abs(vs["ppl_delta"]) < 1e-4
    assert vs["n_tokens"] == got["n_tokens"] == load_blocks(tiny_data, "heldout").size


@pytest.mark.parametrize("agreement, ppl_delta, gen_ok, match", [
    (0.995, 0.005, True, None),
    (0.98, 0.0, True, r"top-1 agreement 0.9800 < 0.99 \(on the 100 positions where torch's top-2 are over 0.1 std"),
    (1.0, 0.02, True, r"perplexity .*\+2.00%, limit ±1%"),
    (1.0, -0.02, True, r"-2.00%"),
    (1.0, 0.0, False, "greedy generation diverges"),
])
def test_check_unquantized(agreement, ppl_delta, gen_ok, match):
    parity = {"agreement": agreement - 0.01, "decided_agreement": agreement, "decided": 100, "kl": 0.001,
              "ppl_delta": ppl_delta, "ppl": 10 * (1 + ppl_delta), "ref_ppl": 10.0}
    gen = {"ok": gen_ok, "diverged": [] if gen_ok else [{"prompt": 0, "at": 3, "margin": 2.5}]}
    assert verify.unquantized_metrics(parity, gen) == {
        "unquantized_agreement": agreement - 0.01, "unquantized_decided_agreement": agreement,
        "unquantized_kl": 0.001, "unquantized_ppl_delta": ppl_delta, "generation_parity": gen}
    if match is None:
        check_unquantized("m.gguf", parity, gen)
        return
    with pytest.raises(VerificationError, match=match):
        check_unquantized("m.gguf", parity, gen)


def test_thresholds_are_the_acceptance_ones():
    assert (MIN_AGREEMENT, MAX_PPL_DELTA) == (0.99, 0.01)


# --- greedy generation ----------------------------------------------------------------------------------------------

class Scripted:
    """A runtime whose next-token logits depend only on the sequence length t: a ±1 background, token (t + 1) % V
    at 10 and the runner-up (t + 2) % V `gap` below; at `flip` lengths the two swap (the export's rounding)."""

    def __init__(self, gap: float, flip: tuple[int, ...] = (), vocab: int = 50):
        self.gap, self.flip, self.vocab, self.seq = gap, flip, vocab, []

    def logits(self, ids):
        out = np.tile(np.where(np.arange(self.vocab) % 2, 1.0, -1.0), (len(ids), 1)).astype(np.float32)
        for t in range(len(ids)):
            top, second = (t + 1) % self.vocab, (t + 2) % self.vocab
            if t + 1 in self.flip:
                top, second = second, top
            out[t, top], out[t, second] = 10.0, 10.0 - self.gap
        return out

    def prefill(self, ids):
        self.seq = list(ids)
        return int(self.logits(self.seq)[-1].argmax())

    def decode(self, token):
        self.seq.append(token)
        return int(self.logits(self.seq)[-1].argmax())


@pytest.mark.parametrize("gap, flip, want", [
    (5.0, (), dict(equal=2, near_ties=0, ok=True)),
    (5.0, (6,), dict(equal=1, near_ties=0, ok=False)),  # torch leads by ~2.3 stds where they part: a real difference
    (0.1, (6,), dict(equal=1, near_ties=1, ok=True)),  # torch leads by ~0.05 std: a near-tie rounding may flip
])
def test_generation_parity(gap, flip, want):
    prompts = [[1, 2, 3], [4, 5, 6, 0, 1, 2, 3, 4]]  # the second passes length 6 inside its prompt, not in decoding
    got = generation_parity(Scripted(gap), Scripted(gap, flip), prompts, n=6)
    assert {k: got[k] for k in want} == want and got["prompts"] == 2 and got["tokens"] == 6
    if flip:
        row = Scripted(gap).logits([0] * 6)[-1]
        assert got["diverged"] == [{"prompt": 0, "at": 3, "margin": round(gap / float(row.std()), 4)}]


def test_f32_kv_cache_brings_an_f32_gguf_closer_to_torch(reference, f32_gguf, tiny_data):
    """kv_type = "f32" keeps keys and values in F32: an F32 file then computes in F32 throughout, so its logits sit
    closer to torch's than with llama.cpp's default F16 cache (which rounds them)."""
    from pistill.data import load_blocks
    from pistill.device.runtimes import LlamaCppRuntime

    ids = load_blocks(tiny_data, "heldout")[0].tolist()
    want = reference.logits(ids)
    err = {}
    for kv in ("f16", "f32"):
        rt = LlamaCppRuntime(str(f32_gguf), 1, 512, kv_type=kv)
        try:
            err[kv] = float(np.abs(rt.logits(ids) - want).max())
        finally:
            rt.close()
    assert err["f32"] < err["f16"], err
    with pytest.raises(ValueError, match="kv_type 'q8' is not supported"):
        LlamaCppRuntime(str(f32_gguf), 1, 512, kv_type="q8")


def test_greedy_f32_gguf_equals_torch(reference, f32_gguf, tiny_model):
    from pistill.device.runtimes import LlamaCppRuntime

    rt = LlamaCppRuntime(str(f32_gguf), 1, 512)
    try:
        got = generation_parity(reference, rt, verify.prompt_ids(tiny_model), n=12)
    finally:
        rt.close()
    assert got["equal"] == got["prompts"] == len(verify.PROMPTS) and got["ok"]
