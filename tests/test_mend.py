"""pistill.compress.mend and the angular layer choice: the fit, the fold, the chosen block, the config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pistill.artifact import Artifact, config_dict
from pistill.compress.importance import angular_block, angular_distance
from pistill.compress.mend import GapSums, fold_down_proj, gap_runs, mend_linear, residual_error, ridge_fit
from pistill.compress.prune import PruneConfig, prune, target_shape
from pistill.compress.structured import drop_layers
from pistill.errors import InputError
from pistill.hooks import forward_hooks

torch.set_num_threads(1)


def llama_config(n_layer: int = 6):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layer,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       initializer_range=0.1)  # larger than the default 0.02: layers that change the stream


def llama(n_layer: int = 6, seed: int = 0):
    """A tiny random llama in memory (no tokenizer: these tests feed ids)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(n_layer)).eval()


def calib(n: int = 8, t: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 512, (n, t)).astype(np.int32)


def run_model(model, x):
    """(logits, final hidden states) of `model` on ids `x`."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(x.astype(np.int64)), output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def layer_parts(model, i: int, x):
    """Layer i's residual stream after attention (Y), MLP output (M) and output, (B, T, D) each."""
    got = {}
    layer = model.model.layers[i]
    hooks = [(layer.post_attention_layernorm, lambda m, a, o: got.update(y=a[0])),
             (layer.mlp.down_proj, lambda m, a, o: got.update(m=o)),
             (layer, lambda m, a, o: got.update(out=o[0] if isinstance(o, tuple) else o))]
    with forward_hooks(hooks):
        run_model(model, x)
    return got["y"], got["m"], got["out"]


# --- pure math ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop, runs", [
    ([], []),
    ([3], [(3, 3)]),
    ([4, 3, 1, 7], [(1, 1), (3, 4), (7, 7)]),
    ([0, 1, 2, 5, 6], [(0, 2), (5, 6)]),
])
def test_gap_runs(drop, runs):
    assert gap_runs(drop) == runs


@pytest.mark.parametrize("b, distance", [((1.0, 0.0), 0.0), ((-2.0, 0.0), 1.0), ((0.0, 3.0), 0.5), ((1.0, 1.0), 0.25)])
def test_angular_distance(b, distance):
    a = torch.tensor([[[1.0, 0.0]]])  # (B, T, D)
    assert angular_distance(a, torch.tensor([[b]])).item() == pytest.approx(distance, abs=1e-6)


def test_ridge_fit_without_data_is_identity():
    zero = torch.zeros(8, 8, dtype=torch.float64)
    assert torch.equal(ridge_fit(zero, zero), torch.eye(8, dtype=torch.float64))


def test_ridge_fit_recovers_a_linear_map_and_its_error():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(500, 8, generator=g, dtype=torch.float64)
    t0 = torch.eye(8, dtype=torch.float64) + 0.5 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    r = m @ t0 + 0.01 * torch.randn(500, 8, generator=g, dtype=torch.float64)
    t = ridge_fit(m.T @ m, m.T @ r, ridge=1e-6)
    assert torch.allclose(t, t0, atol=5e-3)
    eye = torch.eye(8, dtype=torch.float64)
    for tt in (t, eye):  # the closed form from the sums equals the direct error
        direct = ((m @ tt - r).norm() / r.norm()).item()
        assert residual_error(m.T @ m, m.T @ r, float((r * r).sum()), tt) == pytest.approx(direct, rel=1e-6)


def test_gap_sums_count_every_token_alike():
    """Scaling one token's Y, M and L (a massive-activation token) leaves the weighted sums unchanged."""
    g = torch.Generator().manual_seed(0)
    y, m, ell = (torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    scale = torch.ones(2, 5, 1, dtype=torch.float64)
    scale[0, 0] = 1000.0  # the attention-sink token
    sums = []
    for k in (torch.ones_like(scale), scale):
        s = GapSums()
        s.take_y(None, (y * k,), None)
        s.take_m(None, None, m * k)
        s.add(None, None, ell * k)
        sums.append(s)
    assert torch.allclose(sums[0].mtm, sums[1].mtm) and torch.allclose(sums[0].mtr, sums[1].mtr)
    assert sums[0].rtr == pytest.approx(sums[1].rtr) and sums[0].tokens == sums[1].tokens == 10


# --- folding ------------------------------------------------------------------------------------------------------

def test_identity_fold_leaves_the_model_unchanged():
    model, x = llama(), calib(2, 16)
    before = run_model(model, x)[0]
    fold_down_proj(model.model.layers[2].mlp.down_proj, torch.eye(64, dtype=torch.float64))
    assert torch.equal(run_model(model, x)[0], before)


def test_fold_is_exact():
    model, x = llama(), calib(2, 16)
    y, m, _ = layer_parts(model, 2, x)
    t = torch.eye(64, dtype=torch.float64) + 0.3 * torch.randn(64, 64, generator=torch.Generator().manual_seed(1),
                                                                dtype=torch.float64)
    fold_down_proj(model.model.layers[2].mlp.down_proj, t)
    out = layer_parts(model, 2, x)[2]
    assert torch.allclose(out.double(), y.double() + m.double() @ t, atol=1e-5)  # Y + M T by hand


# --- fitting on calibration data ----------------------------------------------------------------------------------

def test_mend_brings_the_dropped_model_closer():
    x, drop = calib(), [2, 3]
    logits, hidden = run_model(llama(), x)
    mended, plain = llama(), llama()
    figures = mend_linear(mended, x, drop)
    for model in (mended, plain):
        drop_layers(model, drop)
    assert list(figures) == ["2-3"] and figures["2-3"]["from"] == 1 and figures["2-3"]["tokens"] == x.size
    assert figures["2-3"]["err_after"] < 0.9 * figures["2-3"]["err_before"]
    (ml, mh), (pl, ph) = run_model(mended, x), run_model(plain, x)
    assert (mh - hidden).norm() < (ph - hidden).norm()
    assert (ml - logits).norm() < (pl - logits).norm()


def test_mend_skips_a_gap_at_layer_0():
    model, x = llama(), calib(2, 16)
    first = model.model.layers[0].mlp.down_proj.weight.clone()
    figures = mend_linear(model, x, [0, 1, 4])
    assert list(figures) == ["4-4"] and figures["4-4"]["from"] == 3
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, first)


# --- choosing the block -------------------------------------------------------------------------------------------

def identity_layers(model, layers):
    """Make `layers` write nothing into the residual stream (o_proj and down_proj zeroed): exact identities."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("planted, n_drop, chosen", [
    ([2, 3], 2, [2, 3]),
    ([1, 2, 4, 5], 2, [1, 2]),  # the last two are identities too, but the last layer never goes
    ([3], 1, [3]),
])
def test_angular_block_picks_the_planted_block(planted, n_drop, chosen):
    assert angular_block(identity_layers(llama(), planted), calib(2, 16), n_drop) == chosen


def test_angular_block_never_takes_the_last_layer():
    chosen = angular_block(identity_layers(llama(), [5]), calib(2, 16), 1)
    assert 5 not in chosen and len(chosen) == 1
    with pytest.raises(ValueError, match="use 1..5"):
        angular_block(llama(), calib(2, 16), 6)


def test_prune_chooses_by_angle_and_mends():
    model, x, notes = identity_layers(llama(), [3, 4]), calib(4, 16), {}
    shape = prune(model, x, PruneConfig(ffn_ratio=1.0, n_layer=4, mend="linear", layer_metric="angular"), notes)
    assert shape.n_layer == 4 == len(model.model.layers) == model.config.num_hidden_layers
    assert notes["dropped_layers"] == [3, 4] and set(notes["mend"]) == {"3-4"}
    assert torch.isfinite(run_model(model, x)[0]).all()


# --- the config and the stage -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [PruneConfig(mend="linear", n_layer=4), PruneConfig(layer_metric="angular")])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == PruneConfig.VERSION > 2
    assert PruneConfig(**json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("kwargs, words", [
    ({"mend": "replaceme"}, "mend = 'replaceme' is not one of: none, linear"),
    ({"layer_metric": "cosine"}, "layer_metric = 'cosine' is not one of: influence, angular"),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("n_layer", [None, 6])
def test_mend_needs_dropped_layers(n_layer):
    hf = llama_config().to_dict()
    with pytest.raises(InputError, match=r'\[prune\] mend .* set n_layer below 6, or mend = "none"'):
        target_shape(hf, PruneConfig(mend="linear", n_layer=n_layer))
    assert target_shape(hf, PruneConfig(mend="linear", n_layer=5)).n_layer == 5


def test_mend_without_dropped_layers_fails_before_loading(tmp_path):
    from pistill.compress.prune import run

    llama_config().save_pretrained(tmp_path / "teacher")  # config.json alone: no weights to load
    teacher = Artifact(tmp_path / "teacher", {"stage": "teacher", "id": "x", "model": {"format": "hf", "file": "."}})
    with pytest.raises(InputError, match=r"\[prune\] mend"):
        run({"teacher": teacher, "data": None}, PruneConfig(mend="linear"), tmp_path / "prune")
    assert not (tmp_path / "prune").exists()
