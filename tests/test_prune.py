"""pistill.compress.importance and pistill.compress.prune: scores, channel selection, slicing, the stage."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pistill.artifact import Artifact, config_dict
from pistill.compress.importance import (SCORERS, ActivationStats, channel_l2, channel_mean_abs, magnitude_score,
                                         random_score)
from pistill.compress.prune import PruneConfig, kept_width, prune, prune_mlp, select_channels

torch.set_num_threads(1)


def load(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def calib(n: int = 4, t: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, (n, t)).astype(np.int32)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(x.astype(np.int64))).logits


# --- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [PruneConfig(), PruneConfig(method="magnitude", ffn_dim=64),
                                 PruneConfig(method="random", ffn_ratio=0.25, multiple_of=1, calib_blocks=2, seed=3)])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d["version"] == PruneConfig.VERSION
    d.pop("version")
    assert PruneConfig(**json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "taylor"}, "supported: activation, magnitude, random"),
    ({"ffn_dim": 0}, "ffn_dim = 0"),
    ({"ffn_ratio": 0.0}, "ffn_ratio = 0.0"),
    ({"ffn_ratio": 1.5}, "ffn_ratio = 1.5"),
    ({"multiple_of": 0}, "multiple_of = 0"),
    ({"ffn_dim": 100}, "use 96"),
    ({"calib_blocks": 0}, "calib_blocks = 0"),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("ffn_dim, kwargs, width", [
    (1536, {}, 768),
    (128, {}, 64),
    (128, {"ffn_ratio": 0.1}, 32),  # never below one multiple
    (128, {"ffn_ratio": 1.0}, 128),
    (100, {"ffn_ratio": 1.0}, 96),  # rounded to a multiple of 32
    (100, {"ffn_ratio": 1.0, "multiple_of": 1}, 100),
    (1536, {"ffn_dim": 512}, 512),
])
def test_kept_width(ffn_dim, kwargs, width):
    assert kept_width(ffn_dim, PruneConfig(**kwargs)) == width


def test_kept_width_refuses_widening():
    with pytest.raises(ValueError, match="wider than the teacher"):
        kept_width(128, PruneConfig(ffn_dim=256))


# --- pure score functions -----------------------------------------------------------------------------------------

def test_channel_statistics_by_hand():
    acts = torch.tensor([[[3.0, 0.0], [4.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]]])  # (B=2, T=2, F=2)
    assert torch.allclose(channel_l2(acts), torch.tensor([5.0 + 0.0, 1.0 + 2.0]))  # L2 over T, summed over B
    assert torch.allclose(channel_mean_abs(acts), torch.tensor([3.5 + 0.0, 0.5 + 1.0]))  # mean |a| over T


def test_magnitude_score_by_hand():
    gate = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # (F=2, D=2)
    up = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    down = torch.tensor([[2.0, 1.0], [0.0, 0.0]])  # (D=2, F=2)
    assert torch.allclose(magnitude_score(gate, up, down), torch.tensor([5.0 * 1.0 * 2.0, 1.0 * 2.0 * 1.0]))


def test_random_score_is_seeded():
    assert torch.equal(random_score(16, 1), random_score(16, 1))
    assert not torch.equal(random_score(16, 1), random_score(16, 2))


def test_select_channels_keeps_top_in_order():
    keep = select_channels([torch.tensor([0.1, 0.5, 0.3, 0.9]), torch.tensor([4.0, 3.0, 2.0, 1.0])], 2)
    assert [k.tolist() for k in keep] == [[1, 3], [0, 1]]


def test_activation_stats_match_direct_computation(tiny_model):
    model, x = load(tiny_model), calib()
    acts = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].detach()))
    logits(model, x)
    hook.remove()
    with ActivationStats(model) as stats, torch.no_grad():
        for row in x:  # one block at a time: the sums do not depend on the batching
            model(input_ids=torch.as_tensor(row[None].astype(np.int64)))
    scores = stats.scores()
    assert len(scores) == 2 and scores[1].shape == (128,)
    want = acts[0].norm(dim=1).mean(dim=0)  # mean over batch of L2 over the sequence
    assert torch.allclose(scores[1].float(), want, rtol=1e-5)
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks  # hooks removed


@pytest.mark.parametrize("method", ["activation", "magnitude"])
def test_zeroed_channel_ranks_last(tiny_model, method):
    model = load(tiny_model)
    for layer in model.model.layers:
        layer.mlp.up_proj.weight.data[7] = 0.0  # channel 7 now contributes nothing
    scores = SCORERS[method](model, calib(), 0)
    assert all(int(s.argmin()) == 7 for s in scores)


# --- slicing ------------------------------------------------------------------------------------------------------

def test_pruning_nothing_keeps_function(tiny_model):
    model, x = load(tiny_model), calib()
    want = logits(model, x)
    assert prune(model, x, PruneConfig(ffn_ratio=1.0)) == 128
    assert torch.equal(logits(model, x), want)


def test_pruning_a_dead_channel_keeps_function(tiny_model):
    model, x = load(tiny_model), calib()
    for layer in model.model.layers:
        layer.mlp.up_proj.weight.data[7] = 0.0
    want = logits(model, x)
    prune(model, x, PruneConfig(ffn_dim=127, multiple_of=1))
    assert model.config.intermediate_size == 127
    assert torch.allclose(logits(model, x), want, atol=1e-5)


def test_prune_mlp_refuses_ragged_widths(tiny_model):
    model = load(tiny_model)
    with pytest.raises(ValueError, match="all of one width"):
        prune_mlp(model, [torch.arange(64), torch.arange(32)])


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_pruned_model_saves_and_loads(tiny_model, tmp_path, method):
    from pistill.models import save_model

    model = load(tiny_model)
    prune(model, calib(), PruneConfig(method=method))
    save_model(model, tiny_model, tmp_path)
    back = load(tmp_path)
    assert back.config.intermediate_size == 64
    assert {tuple(layer.mlp.down_proj.weight.shape) for layer in back.model.layers} == {(64, 64)}  # uniform layers
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied
    out = logits(back, calib())
    assert torch.isfinite(out).all() and torch.equal(out, logits(model, calib()))
    assert (tmp_path / "tokenizer.json").is_file()


# --- the stage ----------------------------------------------------------------------------------------------------

def test_unsupported_architecture_fails_before_loading(tmp_path, tiny_data):
    from pistill.compress.prune import run

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # no weights at all
    teacher = Artifact(tmp_path / "gpt2", {"stage": "teacher", "id": "x", "model": {"format": "hf", "file": "."}})
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2"):
        run([teacher, tiny_data], PruneConfig(), tmp_path / "prune")
    assert not (tmp_path / "prune").exists()


def test_run_writes_a_standard_hf_artifact(tiny_teacher, tiny_data, tmp_path, capfd):
    from pistill.compress.prune import run

    capfd.readouterr()
    art = run([tiny_teacher, tiny_data], PruneConfig(calib_blocks=2), tmp_path / "prune")
    assert capfd.readouterr().out == ""  # progress goes to stderr
    assert art.stage == "prune" and art.model == {"format": "hf", "file": "."}
    m = art.metrics
    assert m["ffn_dim"] == 64 and m["teacher_ffn_dim"] == 128
    assert 0 < m["params"] < tiny_teacher.metrics["params"] and m["bytes"] > 0
    assert {"ppl", "agreement", "kl", "n_tokens"} <= set(m) and np.isfinite(m["ppl"])
    assert load(art.model_path()).config.intermediate_size == 64
    assert dataclasses.asdict(PruneConfig(calib_blocks=2)).items() <= art.manifest["config"].items()
