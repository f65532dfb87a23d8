"""pistill.generate: top-p sampling by hand, llama.cpp's batched generation against transformers, seeds, stops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pistill.generate import (GENERATORS, LlamaCppGenerator, Sampling, TransformersGenerator, chat_prompt_ids,
                              get_generator, sample_top_p, stop_ids)


def rngs(n: int, seed: int = 0) -> list:
    return [np.random.default_rng([seed, i]) for i in range(n)]


# --- sampling -----------------------------------------------------------------------------------------------------

def test_temperature_zero_is_the_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32)
    assert (sample_top_p(logits, 0.0, 0.9, rngs(5)) == logits.argmax(-1)).all()


def test_top_p_keeps_the_smallest_set_reaching_p_and_samples_it_renormalised():
    p = np.array([0.5, 0.3, 0.15, 0.05])  # top_p 0.7: {0, 1} (0.5 < 0.7 <= 0.8), drawn 5/8 and 3/8
    logits = np.log(p)[None].repeat(4000, 0)
    draws = sample_top_p(logits, 1.0, 0.7, rngs(4000))
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).mean() == pytest.approx(0.625, abs=0.03)
    assert set(sample_top_p(logits[:200], 1.0, 0.5, rngs(200)).tolist()) == {0}  # 0.5 reaches 0.5 alone
    assert set(sample_top_p(logits[:2000], 1.0, 1.0, rngs(2000)).tolist()) == {0, 1, 2, 3}


def test_temperature_sharpens_before_the_cut():
    logits = np.log(np.array([[0.4, 0.35, 0.25]]))
    # at T = 0.25 the probabilities are about (0.58, 0.34, 0.08): top_p 0.9 keeps two tokens
    draws = sample_top_p(logits.repeat(2000, 0), 0.25, 0.9, rngs(2000))
    assert set(draws.tolist()) == {0, 1} and (draws == 0).mean() == pytest.approx(0.63, abs=0.04)


def test_a_flat_row_falls_back_to_sorting_everything():
    """Equal logits over 100K tokens: no token is within the candidate ratio of the others' mass, so the whole row
    is sorted (stable: lowest ids first) and top_p 0.5 keeps the first half."""
    draws = sample_top_p(np.zeros((300, 100_000), np.float32), 1.0, 0.5, rngs(300))
    assert draws.max() < 50_000 and len(set(draws.tolist())) > 250


def test_draws_depend_only_on_each_rows_generator():
    logits = np.random.default_rng(1).normal(size=(6, 300)).astype(np.float32)
    a = sample_top_p(logits, 0.8, 0.95, rngs(6, seed=3))
    b = sample_top_p(logits[::-1].copy(), 0.8, 0.95, rngs(6, seed=3)[::-1])
    assert (a == b[::-1]).all()


def test_unknown_generator_lists_the_known_ones():
    with pytest.raises(ValueError, match="supported: llama_cpp, transformers"):
        get_generator("vllm")
    assert set(GENERATORS) == {"llama_cpp", "transformers"}


# --- generators on a tiny model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """The tiny llama with its final norm x20: peaked next-token distributions, so greedy choices are not near-ties
    between float32 torch and llama.cpp."""
    from tiny import make_model
    from transformers import AutoModelForCausalLM

    folder = make_model(tmp_path_factory.mktemp("sharp") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.model.norm.weight.data *= 20
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def f32_gguf(sharp_model, tmp_path_factory):
    from pistill.export.gguf_convert import write_gguf

    return write_gguf(sharp_model, tmp_path_factory.mktemp("gguf") / "model-f32.gguf", "f32")


@pytest.fixture(scope="module")
def flat_gguf(tiny_model, tmp_path_factory):
    """The tiny random llama as it is: flat distributions, so sampled sequences differ."""
    from pistill.export.gguf_convert import write_gguf

    return write_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "flat-f32.gguf", "f32")


@pytest.fixture(scope="module")
def prompts(sharp_model):
    from pistill.models import load_tokenizer

    tok = load_tokenizer(sharp_model)
    tasks = ["Explain what a hash table is.", "Write a poem.", "Why is the sky blue? Answer in one line.",
             "List three fruits.", "Hi", "Describe how a bicycle works in simple terms, step by step."]
    return tok, [chat_prompt_ids(tok, t) for t in tasks]


def test_llama_cpp_batched_greedy_equals_transformers_greedy(sharp_model, f32_gguf, prompts):
    """Six chat prompts of different lengths, decoded four at a time in one llama.cpp context (a slot refilled as
    soon as one ends), give the tokens transformers' greedy `generate` gives for each prompt alone."""
    tok, ids = prompts
    greedy = Sampling(max_new=12, temperature=0.0)
    llama = LlamaCppGenerator(sharp_model, parallel=4, threads=1, gguf=f32_gguf)
    try:
        got = llama.generate(ids, greedy)
    finally:
        llama.close()
    hf = TransformersGenerator(sharp_model, parallel=1, threads=1)
    want = hf.generate(ids, greedy)
    assert got == want and all(0 < len(g) <= 12 for g in got)
    assert llama.stats.new_tokens == sum(map(len, got)) and llama.stats.sequences == 6


def test_sampled_output_is_seeded_per_sequence_not_per_batch(tiny_model, flat_gguf, prompts):
    """The same seed gives the same sequences whether they are decoded one, three or eight at a time (each draws
    from its own generator); another seed gives others."""
    tok, ids = prompts
    sampling = Sampling(max_new=10, temperature=1.0, top_p=0.95, seed=7)
    outs = {}
    for parallel in (1, 3, 8):
        gen = LlamaCppGenerator(tiny_model, parallel=parallel, threads=1, gguf=flat_gguf)
        try:
            outs[parallel] = gen.generate(ids, sampling)
            outs["again", parallel] = gen.generate(ids, sampling)
            outs["seed 8", parallel] = gen.generate(ids, Sampling(10, 1.0, 0.95, seed=8))
        finally:
            gen.close()
    assert outs[1] == outs[3] == outs[8] == outs["again", 3]
    assert outs["seed 8", 3] == outs["seed 8", 1] != outs[1]


def test_generation_stops_at_a_stop_token_and_at_max_new(sharp_model, f32_gguf, prompts):
    tok, ids = prompts
    gen = LlamaCppGenerator(sharp_model, parallel=2, threads=1, gguf=f32_gguf)
    try:
        full = gen.generate(ids[:2], Sampling(max_new=8, temperature=0.0))
        stop = full[0][3]  # the fourth greedy token of the first prompt
        cut = gen.generate(ids[:2], Sampling(max_new=8, temperature=0.0), stop={stop})
        short = gen.generate(ids[:2], Sampling(max_new=2, temperature=0.0))
    finally:
        gen.close()
    assert cut[0] == full[0][: full[0].index(stop)]  # the stop token is not included
    assert cut[1] == full[1][: full[1].index(stop)] if stop in full[1] else cut[1] == full[1]
    assert short == [f[:2] for f in full]


def test_the_teacher_gguf_is_written_and_removed(tiny_model):
    from pistill.export.gguf import gguf_stats

    gen = LlamaCppGenerator(tiny_model, parallel=2, threads=1, gguf_type="Q8_0")
    folder = gen._tmp.name
    try:
        files = list(Path(folder).iterdir())
        assert [f.name for f in files] == ["teacher-Q8_0.gguf"]
        assert "Q8_0" in gguf_stats(files[0])["tensor_types"]
        assert gen.setup_s > 0
    finally:
        gen.close()
    assert not Path(folder).exists()


def test_stop_ids_of_a_chat_tokenizer(tiny_model):
    from pistill.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    vocab = tok.get_vocab()
    assert stop_ids(tok) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}


def test_bench_datagen_runs_at_tiny_size(tiny_model, tmp_path):
    """bench/datagen.py end to end on the tiny model: llama.cpp at two widths and transformers answer the same
    prompts; each row has its throughput, each GGUF its fidelity to torch; the JSON holds the same rows."""
    import importlib.util
    import json

    bench = Path(__file__).resolve().parents[1] / "bench" / "datagen.py"
    spec = importlib.util.spec_from_file_location("bench_datagen", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--teacher", str(tiny_model), "--prompts", "3", "--gen-tokens", "4", "--threads", "1",
                       "--parallel", "1,3", "--gguf-types", "f16", "--hf-batch", "2", "--out", str(tmp_path)])
    assert [(r["generator"], r["parallel"]) for r in out["rows"]] == [("llama_cpp", 1), ("llama_cpp", 3),
                                                                      ("transformers", 2)]
    for r in out["rows"]:
        assert r["sequences"] == 3 and 0 < r["new_tokens"] <= 12 and r["tokens_per_s"] > 0
    assert out["rows"][0]["fidelity"]["agreement"] > 0.9 and out["rows"][2]["fidelity"] is None
    assert json.loads((tmp_path / "datagen.json").read_text())["rows"] == out["rows"]


@pytest.mark.gpu
def test_transformers_generator_on_cuda(sharp_model, prompts):
    """load_model puts the teacher on CUDA; a left-padded batch of prompts is answered there."""
    tok, ids = prompts
    gen = TransformersGenerator(sharp_model, parallel=6)
    assert gen.model.device.type == "cuda"
    outs = gen.generate(ids, Sampling(max_new=8, temperature=0.7, seed=1))
    assert len(outs) == 6 and all(0 < len(o) <= 8 for o in outs) and gen.stats.new_tokens == sum(map(len, outs))
