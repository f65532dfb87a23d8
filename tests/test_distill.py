"""pistill.compress.distill and .losses: losses by hand, schedule, data order, training, kill-and-resume, the stage."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from pistill.artifact import Artifact, config_dict
from pistill.compress import distill
from pistill.compress.distill import (CHECKPOINT, TRAIN_LOG, DistillConfig, batch_indices, check_tokenizers,
                                      lr_factor, train)
from pistill.compress.losses import (SOFT_LOSSES, distill_loss, forward_kl, generalized_jsd, hard_ce, reverse_kl,
                                     total_variation)

torch.set_num_threads(1)

LN3 = math.log(3.0)


def load(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def student_dir(tiny_model, tmp_path_factory):
    """The tiny model with its MLPs pruned to 64 channels: the student."""
    from pistill.compress.prune import PruneConfig, prune
    from pistill.models import save_model

    out = tmp_path_factory.mktemp("student")
    model = load(tiny_model)
    prune(model, blocks(4), PruneConfig())
    save_model(model, tiny_model, out)
    return out


@pytest.fixture(scope="module")
def teacher(tiny_model):
    """The tiny model with a sharper output (final norm x20) so there is a real distribution to match."""
    model = load(tiny_model).eval()
    model.model.norm.weight.data *= 20
    return model


def blocks(n: int = 16, t: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, (n, t)).astype(np.int32)


# --- losses -------------------------------------------------------------------------------------------------------

def test_kl_of_identical_logits_is_zero():
    x = torch.randn(2, 3, 7)
    assert forward_kl(x, x.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature, want", [
    (1.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),  # p = (3/4, 1/4), q = (1/2, 1/2)
    (2.0, 4 * ((p := 3**0.5 / (3**0.5 + 1)) * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))),  # x T^2
])
def test_forward_kl_by_hand(temperature, want):
    teacher, student = torch.tensor([[LN3, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert forward_kl(student, teacher, temperature).item() == pytest.approx(want, rel=1e-5)


# two positions over a 3-token vocabulary, as probabilities; logits are their logs
P = np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])  # teacher
Q = np.array([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.2, 0.6]])  # student


def kl_by_hand(a, b):
    """Mean over positions of sum_v a_v log(a_v / b_v)."""
    return float(np.mean([sum(x * math.log(x / y) for x, y in zip(ra, rb)) for ra, rb in zip(a, b)]))


def jsd_by_hand(beta):
    m = beta * P + (1 - beta) * Q
    return beta * kl_by_hand(P, m) + (1 - beta) * kl_by_hand(Q, m)


@pytest.mark.parametrize("fn, want", [
    (lambda s, t: forward_kl(s, t), kl_by_hand(P, Q)),
    (lambda s, t: reverse_kl(s, t), kl_by_hand(Q, P)),
    (lambda s, t: generalized_jsd(s, t, 0.5), jsd_by_hand(0.5)),
    (lambda s, t: generalized_jsd(s, t, 0.1), jsd_by_hand(0.1)),
    (lambda s, t: generalized_jsd(s, t, 0.9), jsd_by_hand(0.9)),
    (lambda s, t: total_variation(s, t), float(np.mean(0.5 * np.abs(P - Q).sum(-1)))),
])
def test_soft_losses_match_hand_computation(fn, want):
    got = fn(torch.tensor(np.log(Q))[None], torch.tensor(np.log(P))[None])  # (1, 2, 3) logits
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_reverse_kl_and_jsd_scale_with_temperature_squared():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert reverse_kl(s, t, 2.0).item() == pytest.approx(4 * reverse_kl(s / 2, t / 2).item(), rel=1e-5)
    assert generalized_jsd(s, t, 0.3, 2.0).item() == pytest.approx(4 * generalized_jsd(s / 2, t / 2, 0.3).item(),
                                                                   rel=1e-5)


def test_jsd_ends_are_the_two_kls_and_its_limits_agree():
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    assert generalized_jsd(s, t, 0.0).item() == forward_kl(s, t).item()
    assert generalized_jsd(s, t, 1.0).item() == reverse_kl(s, t).item()
    eps = 1e-4  # JSD(beta) / beta -> KL(p || q) as beta -> 0; JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1
    assert generalized_jsd(s, t, eps).item() / eps == pytest.approx(forward_kl(s, t).item(), rel=1e-3)
    assert generalized_jsd(s, t, 1 - eps).item() / eps == pytest.approx(reverse_kl(s, t).item(), rel=1e-3)


def test_total_variation_is_a_bounded_distance_with_a_gradient():
    """TV is symmetric, in [0, 1], near 1 for distributions on different tokens, and trains the student."""
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    assert total_variation(s, t).item() == pytest.approx(total_variation(t, s).item(), rel=1e-6)
    apart = torch.full((1, 1, 4), -30.0)
    far = total_variation(apart.index_fill(-1, torch.tensor([0]), 30.0), apart.index_fill(-1, torch.tensor([3]), 30.0))
    assert 0.999 < far.item() <= 1.0
    s.requires_grad_(True)
    total_variation(s, t).backward()
    assert s.grad.abs().sum() > 0


def test_soft_losses_of_identical_logits_are_zero():
    x = torch.randn(2, 3, 7).double()
    for name, fn in SOFT_LOSSES.items():
        assert fn(x, x.clone(), 1.5, 0.5).item() == pytest.approx(0.0, abs=1e-6), name


def test_hard_ce_by_hand_and_ignore_index():
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])  # (1, 2, 2)
    assert hard_ce(logits, torch.tensor([[0, -100]])).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert hard_ce(logits, torch.tensor([[1, 1]])).item() == pytest.approx((-math.log(0.25) + math.log(2)) / 2)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distill_loss_blends(alpha):
    s, t, y = torch.randn(2, 4, 9), torch.randn(2, 4, 9), torch.randint(0, 9, (2, 4))
    want = alpha * hard_ce(s, y) + (1 - alpha) * forward_kl(s, t, 2.0)
    assert float(distill_loss(s, t, y, alpha, 2.0)) == pytest.approx(float(want), rel=1e-6)
    want = alpha * hard_ce(s, y) + (1 - alpha) * generalized_jsd(s, t, 0.2, 2.0)
    assert float(distill_loss(s, t, y, alpha, 2.0, "jsd", 0.2)) == pytest.approx(float(want), rel=1e-6)


# --- config, schedule, data order ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [DistillConfig(), DistillConfig(steps=3, grad_accum=2, alpha=0.5, temperature=2.0,
                                                                eval_every=0, ckpt_every=0, threads=1),
                                 DistillConfig(loss="jsd", beta=0.1), DistillConfig(loss="reverse_kl", teacher_topk=64),
                                 DistillConfig(qat="q4_0", qat_start=0.25), DistillConfig(qat="int4"),
                                 DistillConfig(method="lora", lora_rank=8, lora_alpha=16.0, lora_dropout=0.1,
                                               lora_base="none")])
def test_config_round_trip(cfg):
    d = config_dict(cfg)
    assert d.pop("version") == DistillConfig.VERSION
    assert DistillConfig(**json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("kwargs, words", [
    ({"steps": 0}, "steps = 0"), ({"batch_size": 0}, "batch_size = 0"), ({"grad_accum": 0}, "grad_accum = 0"),
    ({"lr": 0.0}, "lr = 0.0"), ({"min_lr_ratio": 2.0}, "min_lr_ratio = 2.0"), ({"alpha": -0.1}, "alpha = -0.1"),
    ({"temperature": 0.0}, "temperature = 0.0"), ({"ckpt_every": -1}, "ckpt_every = -1"), ({"clip": -1.0}, "clip"),
    ({"loss": "kl"}, "supported: forward_kl, jsd, reverse_kl, tv"), ({"on_policy": 1.5}, "on_policy = 1.5"),
    ({"on_policy": 0.5, "teacher_topk": 8}, "teacher_topk = 0"), ({"beta": 1.5}, "beta = 1.5"),
    ({"teacher_topk": -1}, "teacher_topk = -1"), ({"grad_checkpointing": "yes"}, "auto, on, off"),
    ({"qat": "q4"}, "qat 'q4' is not supported; use one of none, q4_0, int4"), ({"qat_start": 1.0}, "qat_start = 1.0"),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DistillConfig(**kwargs)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = DistillConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))


def test_batch_order_is_deterministic_epochs_are_permutations():
    seen = np.concatenate([batch_indices(10, 4, i, seed=3) for i in range(5)])  # two epochs of 10 blocks
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert np.array_equal(batch_indices(10, 4, 2, seed=3), batch_indices(10, 4, 2, seed=3))
    assert not np.array_equal(seen[:10], np.concatenate([batch_indices(10, 4, i, 4) for i in range(5)])[:10])


# --- training -----------------------------------------------------------------------------------------------------

def test_distillation_reduces_loss(teacher, student_dir):
    cfg = DistillConfig(steps=20, lr=3e-3, warmup_steps=2, eval_every=10, eval_blocks=2)
    summary = train(load(student_dir), teacher, blocks(), blocks(2, seed=1), cfg)
    assert summary["steps"] == 20 and summary["tokens_per_s"] > 0
    assert summary["loss_last"] < 0.9 * summary["loss_first"]
    assert np.isfinite(summary["eval_loss"])


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_distillation_with_other_losses_reduces_them(teacher, student_dir, loss):
    cfg = DistillConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=0, loss=loss)
    summary = train(load(student_dir), teacher, blocks(), blocks(2, seed=1), cfg)
    assert summary["loss_last"] < summary["loss_first"]  # reverse KL to a sharp teacher falls slowly


def test_topk_cache_with_k_equal_vocab_gives_the_live_loss(teacher, student_dir, tmp_path):
    from pistill.compress.distill import load_topk_cache, micro_loss

    data, student = blocks(4), load(student_dir)
    cfg = DistillConfig(teacher_topk=10_000, loss="jsd", beta=0.3, alpha=0.2, temperature=2.0)  # k clipped to V
    ids, logp = load_topk_cache(tmp_path, teacher, data, cfg, "key")
    assert ids.shape == (4, 31, 512) and (tmp_path / "teacher_top512.npz").is_file()
    x = torch.as_tensor(data.astype(np.int64))
    with torch.no_grad():
        live = micro_loss(student, teacher, x, cfg).item()
        cached = micro_loss(student, None, x, cfg, (torch.as_tensor(ids).long(), torch.as_tensor(logp))).item()
    assert cached == pytest.approx(live, rel=1e-4)


def test_topk_cache_is_reused_for_the_same_key_and_trains(teacher, student_dir, tmp_path, monkeypatch):
    from pistill.compress.distill import load_topk_cache

    cfg = DistillConfig(steps=8, lr=3e-3, warmup_steps=1, eval_every=0, ckpt_every=0, teacher_topk=8)
    summary = train(load(student_dir), teacher, blocks(), blocks(2, seed=1), cfg, tmp_path, "k1")
    assert summary["loss_last"] < summary["loss_first"]
    want = np.load(tmp_path / "teacher_top8.npz")["logp"]
    monkeypatch.setattr(distill, "teacher_topk", lambda *a: pytest.fail("the teacher ran again"))
    np.testing.assert_array_equal(load_topk_cache(tmp_path, teacher, blocks(), cfg, "k1")[1], want)
    monkeypatch.undo()
    assert load_topk_cache(tmp_path, teacher, blocks(), cfg, "k2")[1].shape == want.shape  # another key: rebuilt


@pytest.mark.gpu
def test_distillation_on_cuda_with_bf16_autocast(teacher, student_dir):
    cfg = DistillConfig(steps=20, lr=3e-3, warmup_steps=2, eval_every=10, eval_blocks=2)
    summary = train(load(student_dir).cuda(), teacher.cuda(), blocks(), blocks(2, seed=1), cfg)
    teacher.cpu()
    assert summary["loss_last"] < 0.9 * summary["loss_first"]


def test_gradient_checkpointing_gives_the_same_training(teacher, student_dir):
    """Recomputing activations in the backward pass ("on", as "auto" does on CUDA) changes memory, not the maths:
    the same three steps end with the same weights and losses as without it; the model is left without it."""
    cfg = DistillConfig(steps=3, lr=3e-3, warmup_steps=1, eval_every=0, ckpt_every=0, grad_checkpointing="off")
    plain, recomputed = load(student_dir), load(student_dir)
    want = train(plain, teacher, blocks(), blocks(2, seed=1), cfg)
    got = train(recomputed, teacher, blocks(), blocks(2, seed=1), dataclasses.replace(cfg, grad_checkpointing="on"))
    assert got["loss_last"] == pytest.approx(want["loss_last"], rel=1e-5)
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not recomputed.is_gradient_checkpointing
    assert distill.grad_checkpointing(DistillConfig(), torch.device("cuda"))
    assert not distill.grad_checkpointing(DistillConfig(), torch.device("cpu"))


@contextlib.contextmanager
def killed_after(monkeypatch, steps: int):
    """Inside the block, training step `steps` + 1 raises KeyboardInterrupt (the process is killed there)."""
    real_step, done = distill._train_step, []

    def step(*args):
        if len(done) == steps:
            raise KeyboardInterrupt("killed")
        done.append(1)
        return real_step(*args)

    monkeypatch.setattr(distill, "_train_step", step)
    try:
        yield
    finally:
        monkeypatch.setattr(distill, "_train_step", real_step)


def test_on_policy_batches_are_the_students_samples_after_the_blocks_first_half(teacher, student_dir):
    from pistill.compress.distill import on_policy_batch, student_continuation

    x = torch.as_tensor(blocks(3, t=10).astype(np.int64))
    model = load(student_dir).train()
    torch.manual_seed(0)
    got = student_continuation(model, x)
    assert got.shape == x.shape and torch.equal(got[:, :5], x[:, :5]) and not torch.equal(got[:, 5:], x[:, 5:])
    assert int(got.max()) < model.config.vocab_size and model.training  # training mode is given back
    torch.manual_seed(0)
    assert torch.equal(student_continuation(model, x), got)  # the torch generator decides: checkpoints restore it
    cfg = DistillConfig(on_policy=0.5)
    picks = [on_policy_batch(i, cfg) for i in range(400)]
    assert 150 < sum(picks) < 250 and picks == [on_policy_batch(i, cfg) for i in range(400)]
    assert not any(on_policy_batch(i, DistillConfig()) for i in range(50))
    assert all(on_policy_batch(i, DistillConfig(on_policy=1.0)) for i in range(50))


def test_on_policy_distillation_trains_and_resumes_exactly(teacher, student_dir, tmp_path, monkeypatch):
    cfg = DistillConfig(steps=6, lr=3e-3, warmup_steps=1, batch_size=2, eval_every=0, ckpt_every=2, on_policy=0.5,
                        loss="tv")
    data = blocks()
    whole = load(student_dir)
    want = train(whole, teacher, data, data[:2], cfg, tmp_path / "whole")
    assert np.isfinite(want["loss_last"]) and want["steps"] == 6
    with killed_after(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        train(load(student_dir), teacher, data, data[:2], cfg, tmp_path / "resumed")
    resumed = load(student_dir)
    got = train(resumed, teacher, data, data[:2], cfg, tmp_path / "resumed")
    assert got["loss_last"] == pytest.approx(want["loss_last"], rel=1e-4)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_kill_and_resume_matches_an_uninterrupted_run(teacher, student_dir, tmp_path, monkeypatch):
    cfg = DistillConfig(steps=6, lr=3e-3, warmup_steps=1, grad_accum=2, batch_size=2, eval_every=0, ckpt_every=2)
    data = blocks()
    whole = load(student_dir)
    want = train(whole, teacher, data, data[:2], cfg, tmp_path / "whole")

    with killed_after(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        train(load(student_dir), teacher, data, data[:2], cfg, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["step"] == 2
    resumed = load(student_dir)  # a fresh process: weights come back from the checkpoint
    got = train(resumed, teacher, data, data[:2], cfg, tmp_path / "resumed")
    assert got["steps"] == want["steps"] == 6
    assert got["loss_last"] == pytest.approx(want["loss_last"], rel=1e-4)
    assert got["loss_first"] == want["loss_first"]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 3 was redone, not logged twice
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_kill_and_resume_with_qat_matches_an_uninterrupted_run(teacher, student_dir, tmp_path, monkeypatch):
    """QAT from step 3 of 6, checkpoints every 2 steps, killed in step 6: the run resumes from the step-4 checkpoint
    (latent weights, taken while QAT was on), turns QAT on again at once, and ends with the weights, on the Q4_0
    grid, of a run never stopped."""
    from pistill.compress.qat import fake_q4_0

    cfg = DistillConfig(steps=6, lr=3e-3, warmup_steps=1, eval_every=0, ckpt_every=2, qat="q4_0", qat_start=0.34)
    data = blocks()
    whole = load(student_dir)
    want = train(whole, teacher, data, data[:2], cfg, tmp_path / "whole")
    assert want["qat"] == "q4_0" and want["qat_from_step"] == 3
    with killed_after(monkeypatch, 5), pytest.raises(KeyboardInterrupt):  # killed in step 6
        train(load(student_dir), teacher, data, data[:2], cfg, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["step"] == 4
    resumed = load(student_dir)
    got = train(resumed, teacher, data, data[:2], cfg, tmp_path / "resumed")
    assert got["loss_last"] == pytest.approx(want["loss_last"], rel=1e-4)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
        if name.startswith("model.layers.") and a.dim() == 2:
            assert torch.equal(fake_q4_0(b), b), name  # baked onto the grid, plain modules again
    assert type(resumed.model.layers[0].mlp.down_proj) is torch.nn.Linear


@pytest.mark.parametrize("layout", ["q4_0", "int4"])
def test_training_through_fake_quantized_weights_moves_them_and_lowers_the_loss(teacher, student_dir, layout):
    """QAT from the first step: the straight-through gradient reaches the latent weights (the quantized model
    improves), and the student ends with its weights on the layout's grid."""
    from pistill.compress.qat import LAYOUTS, targets

    cfg = DistillConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=0, ckpt_every=0, qat=layout, qat_start=0.0)
    student, start = load(student_dir), load(student_dir)
    summary = train(student, teacher, blocks(), blocks(2, seed=1), cfg)
    assert summary["loss_last"] < summary["loss_first"] and summary["qat_from_step"] == 1
    fq = LAYOUTS[layout].fake_quantize
    for m, m0 in zip(targets(student, LAYOUTS[layout]), targets(start, LAYOUTS[layout])):
        assert torch.equal(fq(m.weight), m.weight) and not torch.equal(m.weight, fq(m0.weight))


def test_a_resumed_progress_bar_shows_the_last_logged_loss_never_nan(teacher, student_dir, tmp_path, capfd):
    """Killed after its last checkpoint (here: at the last step), a rerun resumes with no step left: its bar shows
    the loss the log ends with (an eval row after it is passed over), not a running loss of zero steps (nan)."""
    cfg = DistillConfig(steps=2, warmup_steps=1, batch_size=2, eval_every=1, eval_blocks=1, ckpt_every=2)
    data = blocks()
    first = train(load(student_dir), teacher, data, data[:2], cfg, tmp_path)
    assert "eval_loss" in json.loads((tmp_path / TRAIN_LOG).read_text().splitlines()[-1])
    capfd.readouterr()
    again = train(load(student_dir), teacher, data, data[:2], cfg, tmp_path)
    bar = capfd.readouterr().err
    assert again["loss_last"] == first["loss_last"] and "2/2" in bar
    assert f"loss {first['loss_last']:.4f}" in bar and "nan" not in bar.lower()


@pytest.mark.parametrize("rows, want", [
    ([], {"loss": "", "tps": ""}),  # a fresh run before its first step: blank
    ([{"step": 1, "loss": 2.5, "tokens_per_s": 99.6}, {"step": 1, "eval_loss": 3.0}],
     {"loss": "loss 2.5000", "tps": "100 tok/s"}),
    ([{"step": 1, "loss": float("nan"), "tokens_per_s": float("inf")}], {"loss": "", "tps": ""}),
    ([{"step": 4, "loss": "2.5"}], {"loss": "", "tps": ""}),  # a hand-edited log: blank, not a crash
])
def test_bar_fields(rows, want):
    assert distill.bar_fields(rows) == want


def test_checkpoint_of_another_config_is_not_resumed(teacher, student_dir, tmp_path):
    data = blocks()
    train(load(student_dir), teacher, data, data[:2], DistillConfig(steps=2, ckpt_every=2, eval_every=0), tmp_path)
    summary = train(load(student_dir), teacher, data, data[:2], DistillConfig(steps=2, lr=1e-3, eval_every=0),
                    tmp_path)
    assert summary["steps"] == 2 and len((tmp_path / TRAIN_LOG).read_text().splitlines()) == 2


# --- the stage ----------------------------------------------------------------------------------------------------

def swapped_tokenizer_copy(src, dst):
    """Config and tokenizer of `src` (no weights) with the ids of two tokens swapped: a different vocabulary."""
    import shutil

    dst.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy2(src / name, dst / name)
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def test_tokenizer_mismatch_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="different tokenizers"):
        check_tokenizers(tiny_model, swapped_tokenizer_copy(tiny_model, tmp_path / "other"))
    check_tokenizers(tiny_model, tiny_model)


def test_run_refuses_mismatched_tokenizers_before_loading(tiny_model, tiny_data, tmp_path):
    other = swapped_tokenizer_copy(tiny_model, tmp_path / "other")  # holds no weights
    art = lambda p: Artifact(p, {"stage": "x", "id": str(p), "model": {"format": "hf", "file": "."}})  # noqa: E731
    with pytest.raises(ValueError, match="different tokenizers"):
        distill.run({"quantize": art(tiny_model), "prune": art(other), "data": tiny_data}, DistillConfig(),
                    tmp_path / "distill")
    assert not (tmp_path / "distill").exists()


def test_run_trains_and_writes_the_student(tiny_teacher, tiny_data, tmp_path, capfd):
    from pistill.compress.prune import PruneConfig
    from pistill.compress.prune import run as prune_run
    from pistill.compress.quantize import QuantizeConfig
    from pistill.compress.quantize import run as quantize_run

    pruned = prune_run({"teacher": tiny_teacher, "data": tiny_data}, PruneConfig(calib_blocks=2), tmp_path / "prune")
    teacher_q = quantize_run({"teacher": tiny_teacher, "prune": pruned, "data": tiny_data},
                             QuantizeConfig(bench_blocks=1), tmp_path / "q")
    cfg = DistillConfig(steps=3, warmup_steps=1, eval_every=2, eval_blocks=1, ckpt_every=2)
    capfd.readouterr()
    art = distill.run({"quantize": teacher_q, "prune": pruned, "data": tiny_data}, cfg, tmp_path / "distill")
    assert capfd.readouterr().out == ""  # progress goes to stderr; stdout is for a command's output
    m = art.metrics
    assert m["steps"] == 3 and m["params"] == pruned.metrics["params"]
    for key in ("bytes", "ppl", "agreement", "kl", "loss_first", "loss_last", "tokens_per_s", "eval_loss"):
        assert np.isfinite(m[key]), key
    rows = (art.path / TRAIN_LOG).read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 2, 3]  # step 2 has a training and an eval row
    assert not distill.checkpoint_dir(tmp_path / "distill").exists()
    assert load(art.model_path()).config.intermediate_size == 64


def test_any_hf_model_can_be_the_student(tiny_teacher, tiny_model, tiny_data, tmp_path):
    """[distill] student = a HF folder of another shape (random weights, the teacher's tokenizer) replaces the
    prune stage's model; the manifest names it."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "small"
    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.intermediate_size, cfg.num_hidden_layers = 32, 1
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model / name, folder / name)
    dcfg = DistillConfig(steps=2, warmup_steps=1, eval_every=0, ckpt_every=0, student=str(folder))
    dcfg.validate_paths()
    art = distill.run({"quantize": tiny_teacher, "prune": tiny_teacher, "data": tiny_data}, dcfg, tmp_path / "distill")
    assert art.manifest["student"] == str(folder) and art.metrics["steps"] == 2
    got = load(art.model_path()).config
    assert (got.intermediate_size, got.num_hidden_layers) == (32, 1)


def test_missing_student_source_fails_fast(tmp_path):
    from pistill.models import TeacherError

    with pytest.raises(TeacherError, match=r"student path .* does not exist; fix \[distill\] student"):
        DistillConfig(student=str(tmp_path / "nope")).validate_paths()


def test_killed_run_resumes_from_its_checkpoint(tiny_teacher, tiny_data, tmp_path, monkeypatch):
    from pistill.compress.prune import PruneConfig
    from pistill.compress.prune import run as prune_run

    pruned = prune_run({"teacher": tiny_teacher, "data": tiny_data}, PruneConfig(calib_blocks=2), tmp_path / "prune")
    cfg = DistillConfig(steps=4, warmup_steps=1, eval_every=0, ckpt_every=2)
    inputs, out = {"quantize": tiny_teacher, "prune": pruned, "data": tiny_data}, tmp_path / "distill"
    with killed_after(monkeypatch, 2), pytest.raises(KeyboardInterrupt):  # killed in step 3
        distill.run(inputs, cfg, out)
    assert not out.exists() and (distill.checkpoint_dir(out) / CHECKPOINT).is_file()
    art = distill.run(inputs, cfg, out)
    rows = [json.loads(r) for r in (art.path / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and art.metrics["steps"] == 4
    assert not distill.checkpoint_dir(out).exists()


# --- several processes (DDP over gloo) ----------------------------------------------------------------------------

def test_launch_arguments_default_to_a_run_folder(tmp_path):
    from pistill.compress.distill_launch import parse_args

    args = parse_args(["--run", str(tmp_path), "--student", "elsewhere"])
    assert (args.teacher, args.data, args.out) == (tmp_path / "quantize", tmp_path / "data", tmp_path / "distill-ddp")
    assert str(args.student) == "elsewhere"
    with pytest.raises(SystemExit):
        parse_args(["--teacher", "t"])


def test_the_stage_refuses_to_run_as_several_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="distill_launch.py"):
        distill.run({}, DistillConfig(), tmp_path / "distill")


def launch(teacher, student, data, tmp_path, *extra: str) -> dict:
    """torchrun with two CPU processes (gloo) running compress/distill_launch.py for 3 steps on the tiny model:
    {rank file: sha256 of that rank's final weights}, with the student in tmp_path / "ddp"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(distill.__file__).with_name("distill_launch.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--teacher", str(teacher.path), "--student", str(student.path), "--data", str(data.path),
           "--steps", "3", "--out", str(tmp_path / "ddp"), "--hash-dir", str(tmp_path / "h"), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.name: p.read_text().strip() for p in (tmp_path / "h").iterdir()}


@pytest.fixture
def pruned(tiny_teacher, tiny_data, tmp_path):
    from pistill.compress.prune import PruneConfig
    from pistill.compress.prune import run as prune_run

    return prune_run({"teacher": tiny_teacher, "data": tiny_data}, PruneConfig(calib_blocks=2), tmp_path / "prune")


def test_two_cpu_processes_end_with_identical_weights(tiny_teacher, tiny_data, pruned, tmp_path):
    """torchrun with two CPU processes (gloo) on the tiny model: both ranks hold the same weights at the end, and
    they moved (the all-reduced gradients were applied)."""
    from pistill.compress.distill_launch import state_digest

    hashes = launch(tiny_teacher, pruned, tiny_data, tmp_path)
    assert sorted(hashes) == ["rank0.sha256", "rank1.sha256"] and len(set(hashes.values())) == 1
    assert hashes["rank0.sha256"] != state_digest(load(pruned.model_path()))
    assert state_digest(load(tmp_path / "ddp")) == hashes["rank0.sha256"]
    rows = [json.loads(r) for r in (tmp_path / "ddp" / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert rows[0]["tokens"] == 2 * DistillConfig().batch_size * 64  # two ranks' blocks per step


def test_fsdp_sharded_teacher_trains_the_same_student(tiny_teacher, tiny_data, pruned, tmp_path):
    """--fsdp-teacher: each of two CPU processes holds half of every teacher weight (FSDP2 over gloo), gathered
    layer by layer in the forward pass; the student ends with the weights a whole teacher per rank gives."""
    whole = launch(tiny_teacher, pruned, tiny_data, tmp_path / "whole")
    sharded = launch(tiny_teacher, pruned, tiny_data, tmp_path / "sharded", "--fsdp-teacher")
    assert len(set(sharded.values())) == 1 and sharded == whole


def test_fsdp_teacher_needs_several_processes(tiny_teacher, tiny_data, pruned, tmp_path):
    from pistill.compress.distill_launch import main

    with pytest.raises(SystemExit, match="several"):
        main(["--teacher", str(tiny_teacher.path), "--student", str(pruned.path), "--data", str(tiny_data.path),
              "--out", str(tmp_path / "out"), "--fsdp-teacher"])


# --- bench/distill.py --throughput --------------------------------------------------------------------------------

def test_bench_throughput_mode_runs_at_tiny_size(tiny_model, tmp_path):
    """The mode that would give GPU figures for a 1.7B / 360M pair, here on two tiny random configs on the CPU."""
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "distill.py"
    spec = importlib.util.spec_from_file_location("bench_distill", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    student_cfg = json.loads((tiny_model / "config.json").read_text()) | {"intermediate_size": 64}
    (tmp_path / "student.json").write_text(json.dumps(student_cfg))
    out = module.main(["--throughput", "--teacher-config", str(tiny_model / "config.json"), "--student-config",
                       str(tmp_path / "student.json"), "--steps", "2", "--batch-size", "2", "--block-size", "16",
                       "--peak-tflops", "1.0"])
    assert out["tokens_per_s"] > 0 and out["student_params"] < out["teacher_params"]
    assert out["mfu"] == pytest.approx(out["model_tflops"])
