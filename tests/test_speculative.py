"""Speculative decoding: the teacher's greedy tokens exactly, with any draft and k; rollback; the agent's --draft."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pistill.device.runtimes import LlamaCppRuntime
from pistill.device.speculative import (DraftConfig, DraftError, SpeculativeDecoder, accept_sampled, accepted_prefix,
                                       next_k, probabilities)
from test_agent import AGENT, check_schema, run_agent
from tiny import first_layers, make_model

PROMPTS = ["The Raspberry Pi is", "def f(x):\n    return x +", "Hello world, this is a test of"]
N = 40  # tokens generated per prompt
CONFIGS = [DraftConfig(k=1, adaptive=False), DraftConfig(k=3, adaptive=False), DraftConfig(k=4),
           DraftConfig(k=8, adaptive=False), DraftConfig(k=2, k_min=2, k_max=5)]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """F32 GGUF files: `teacher` (a tiny untied llama, whose greedy output varies; the tied one repeats a token),
    `student` (its first layer alone: a pruned teacher, agreeing on some tokens) and `other` (another vocabulary)."""
    from pistill.export.gguf_convert import write_gguf

    root = tmp_path_factory.mktemp("spec")
    teacher = make_model(root / "teacher", tie=False)
    other = make_model(root / "other", vocab_size=384, tie=False)
    return {name: write_gguf(folder, root / f"{name}.gguf", "f32")
            for name, folder in (("teacher", teacher), ("student", first_layers(teacher, root / "student")),
                                 ("other", other))}


@pytest.fixture(scope="module")
def models(ggufs):
    """Each GGUF loaded once in llama.cpp (one thread), plus a second copy of the teacher to draft for itself."""
    loaded = {name: LlamaCppRuntime(str(path), threads=1) for name, path in ggufs.items()}
    loaded["self"] = LlamaCppRuntime(str(ggufs["teacher"]), threads=1)
    yield loaded
    for rt in loaded.values():
        rt.close()


def greedy(rt, ids: list[int], n: int) -> list[int]:
    """The teacher alone: prefill, then one token at a time."""
    out = [rt.prefill(ids)]
    while len(out) < n:
        out.append(rt.decode(out[-1]))
    return out


@pytest.fixture(scope="module")
def references(models):
    """{prompt: (prompt ids, the teacher's N + 8 greedy tokens)}."""
    teacher = models["teacher"]
    return {p: (ids, greedy(teacher, ids, N + 8)) for p in PROMPTS if (ids := teacher.tokenize(p))}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"k{c.k}-{c.k_min}-{c.k_max}-{'ad' if c.adaptive else 'fixed'}")
@pytest.mark.parametrize("draft", ["student", "self"])
def test_output_is_the_teachers_greedy_output(models, references, draft, cfg):
    dec = SpeculativeDecoder(models["teacher"].llm, models[draft].llm, cfg)
    for ids, ref in references.values():
        assert dec.generate(ids, N) == ref[:N]
    s = dec.stats.summary()
    assert s["emitted"] == N * len(references) - len(references)  # the first token of each comes from the prefill
    assert s["accepted"] + s["steps"] == s["emitted"]  # every step adds the teacher's own token
    if draft == "self":
        assert s["acceptance_rate"] == 1.0 and s["alpha"] == 1.0 and s["rejected_steps"] == 0
    else:  # both accepted and rejected drafts: both caches were rolled back
        assert 0 < s["acceptance_rate"] < 1 and s["rejected_steps"] > 0


def test_adaptive_k_grows_to_its_bound_on_agreement_and_shrinks_on_rejection(models, references):
    cfg = DraftConfig(k=3, k_min=2, k_max=6)
    ids, _ = references[PROMPTS[0]]
    counts = {}
    for draft in ("self", "student"):
        dec = SpeculativeDecoder(models["teacher"].llm, models[draft].llm, cfg)
        dec.generate(ids, N)
        counts[draft] = {int(k) for k in dec.stats.summary()["k_counts"]}
    assert {3, 4, 5, 6} <= counts["self"]  # +1 per fully accepted step, up to k_max
    assert 2 in counts["student"] and max(counts["student"]) <= 6  # -1 per rejection, down to k_min


class ScriptedDecoder(SpeculativeDecoder):
    """Proposes the teacher's own next `right` tokens, then tokens the teacher never picks (its token + 1)."""

    def __init__(self, target, draft, cfg, n_prompt: int, ref: list[int], right: int):
        super().__init__(target, draft, cfg)
        self.n_prompt, self.ref, self.right = n_prompt, ref, right

    def propose(self, k: int) -> list[int]:
        g = len(self.ids) - self.n_prompt  # index in `ref` of the next token
        return [t if i < self.right else (t + 1) % self.target.n_vocab()
                for i, t in enumerate(self.ref[g:g + k])]


@pytest.mark.parametrize("right", [0, 1, 3, 5])
def test_rejected_drafts_are_rolled_back(models, references, right):
    """A draft wrong from its first token (or its second, fourth, never within k) still gives the teacher's output:
    the teacher's cache drops every rejected position."""
    cfg = DraftConfig(k=4, adaptive=False)
    for ids, ref in references.values():
        dec = ScriptedDecoder(models["teacher"].llm, models["student"].llm, cfg, len(ids), ref, right)
        assert dec.generate(ids, N) == ref[:N]
        s = dec.stats.summary()
        assert s["accepted"] == sum(n * min(right, int(k)) for k, n in s["k_counts"].items())


@pytest.mark.parametrize("drafts, greedy_tokens, m", [
    ([], [7], 0), ([1, 2, 3], [1, 2, 3, 4], 3), ([1, 2, 3], [1, 9, 3, 4], 1), ([5], [6, 5], 0),
])
def test_accepted_prefix(drafts, greedy_tokens, m):
    assert accepted_prefix(drafts, greedy_tokens) == m


@pytest.mark.parametrize("k, proposed, m, cfg, expected", [
    (4, 4, 4, DraftConfig(), 5),  # all accepted: one more
    (8, 8, 8, DraftConfig(), 8),  # at k_max
    (4, 4, 2, DraftConfig(), 3),  # a rejection: one fewer
    (1, 1, 0, DraftConfig(), 1),  # at k_min
    (4, 2, 2, DraftConfig(), 4),  # all of a cut step (the end of the output): unchanged
    (4, 4, 0, DraftConfig(adaptive=False), 4),
])
def test_next_k(k, proposed, m, cfg, expected):
    assert next_k(k, proposed, m, cfg) == expected


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": 9}, {"k": 2, "k_min": 3}, {"k_min": 0, "k": 1}])
def test_draft_config_bounds(kwargs):
    with pytest.raises(ValueError, match=r"^draft k \d+ must lie in 1 <= k_min"):
        DraftConfig(**kwargs)


def test_a_draft_with_another_vocabulary_is_refused(models):
    with pytest.raises(DraftError, match=r"^the draft's vocabulary has \d+ tokens and the teacher's \d+; "):
        SpeculativeDecoder(models["teacher"].llm, models["other"].llm)


def test_agent_with_a_draft_standalone(ggufs, tmp_path):
    """The agent with --draft, from the files the bench uploads alone in a folder (pistill not importable): the plain
    figures, and a `speculative` block; the teacher drafting for itself accepts every token."""
    from pistill.device.protocol import AGENT_FILES

    for name in AGENT_FILES:
        shutil.copy(AGENT.with_name(name), tmp_path / name)
    args = ["agent.py", "--runtime", "llama_cpp", "--model", str(ggufs["teacher"]), "--draft", str(ggufs["teacher"]),
            "--threads", "1", "--prompt-tokens", "8,24", "--gen-tokens", "12", "--repeats", "2", "--warmup", "1",
            "--cooldown-s", "0", "--bandwidth-mb", "0"]
    code = (f"import runpy, sys; sys.modules['pistill'] = None; sys.argv = {args!r}; "
            "runpy.run_path('agent.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    check_schema(out, "llama_cpp", [8, 24], 12, [1])
    spec = out["speculative"]
    assert spec["acceptance_rate"] == 1.0 and spec["emitted"] == 2 * 12 and spec["tokens_per_step"] > 1
    assert spec["draft"] == {"path": str(ggufs["teacher"]), "bytes": out["model"]["bytes"]}
    assert (spec["k"], spec["k_min"], spec["k_max"], spec["adaptive"]) == (4, 1, 8, True)
    assert spec["verify_ms_per_step"] > 0 and spec["draft_ms_per_step"] > 0 and 0 < spec["draft_share"] < 1
    assert spec["bytes_per_token"] == pytest.approx(spec["teacher_bytes"] * (1 + spec["mean_k"])
                                                    / spec["tokens_per_step"])
    assert out["sweep"][0]["speculative"]["steps"] == spec["steps"]


def test_agent_with_a_fixed_k_draft(ggufs):
    proc = run_agent("--runtime", "llama_cpp", "--model", str(ggufs["teacher"]), "--draft", str(ggufs["student"]),
                     "--draft-k", "3", "--draft-fixed", "--threads", "1", "--prompt-tokens", "16", "--gen-tokens", "10",
                     "--repeats", "1", "--warmup", "0", "--cooldown-s", "0", "--bandwidth-mb", "0")
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["speculative"]
    assert (spec["k"], spec["adaptive"]) == (3, False) and set(spec["k_counts"]) <= {"0", "1", "2", "3"}


@pytest.mark.parametrize("extra, message", [
    (["--draft", "{other}"], "agent: error: --draft {other}: the draft's vocabulary has "),  # after loading both
    (["--draft", "/no/such.gguf"], "agent: error: draft model not found: /no/such.gguf"),
    (["--draft", "{other}", "--draft-k", "0"], "agent: error: --draft-k 0 must be at least 1"),
    (["--draft", "{other}", "--runtime", "onnxruntime"], "agent: error: --draft needs --runtime llama_cpp, not "
                                                         "onnxruntime"),
])
def test_agent_draft_errors_are_one_line(ggufs, extra, message):
    extra = [x.format(other=ggufs["other"]) for x in extra]
    proc = run_agent("--runtime", "llama_cpp", "--model", str(ggufs["teacher"]), "--repeats", "1", "--warmup", "0",
                     "--bandwidth-mb", "0", *extra)
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("agent: error: ")]
    assert errors == [proc.stderr.splitlines()[-1]] and errors[0].startswith(message.format(other=ggufs["other"]))


def test_bench_speculative_runs_at_tiny_size(ggufs, tmp_path):
    """bench/speculative.py end to end on the tiny files: the teacher alone and with the student as draft (adaptive
    and fixed k) answer the same prompts with the same tokens (F32: batched and single evaluation agree), and the
    cost model has a row per k; the JSON and the Markdown table are written."""
    path = Path(__file__).resolve().parents[1] / "bench" / "speculative.py"
    spec = importlib.util.spec_from_file_location("bench_speculative", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--teacher", str(ggufs["teacher"]), "--draft", str(ggufs["student"]), "--prompts", "2",
                       "--gen-tokens", "12", "--threads", "1", "--fixed-k", "2", "--cost-repeats", "1",
                       "--out", str(tmp_path)])
    plain, *drafted = out["decoders"]
    assert plain["speculative"] is None and plain["speedup"] == 1.0 and len(drafted) == 2
    for row in drafted:
        assert row["tokens"] == plain["tokens"] and row["batched_exact"] == row["same_as_plain"] == 2
        assert row["divergences"] == [None, None] and row["speculative"]["steps"] > 0 and row["decode_tps"] > 0
    assert drafted[1]["speculative"]["k_counts"].keys() <= {"0", "1", "2"}
    assert [r["k"] for r in out["cost"]["rows"]] == list(range(1, 9))
    assert all(r["verify_ms"] > 0 and r["predicted_speedup"] > 0 for r in out["cost"]["rows"])
    assert json.loads((tmp_path / "speculative.json").read_text())["decoders"] == out["decoders"]
    assert (tmp_path / "speculative.md").read_text().startswith("| decoding | decode tok/s |")


# --- sampling ---------------------------------------------------------------------------------------------------

def test_speculative_sampling_rule_gives_the_teachers_distribution():
    """Drafts drawn from q and kept or replaced by the rule come out distributed as p, at every position a step
    emits (Monte Carlo over 5 tokens, 40 000 steps of k = 2)."""
    import numpy as np

    rng = np.random.default_rng(0)
    p = [np.array(x) for x in ([0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.6, 0.2, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1])]
    q = [np.array(x) for x in ([0.1, 0.6, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2])]
    first, second, n = np.zeros(5), np.zeros(5), 40_000
    for _ in range(n):
        drafts = [int(rng.choice(5, p=q[0])), int(rng.choice(5, p=q[1]))]
        m, token = accept_sampled(drafts, q, p[:3], rng)
        out = [*drafts[:m], token]
        first[out[0]] += 1
        if len(out) > 1:  # the second position is emitted only after the first draft was kept, as p at position 1
            second[out[1]] += 1
    assert 0.5 * np.abs(first / n - p[0]).sum() < 0.01
    assert 0.5 * np.abs(second / second.sum() - p[1]).sum() < 0.02
    same = accept_sampled([1, 2], [p[0], p[1]], p, rng)  # a draft with the teacher's distribution is always kept
    assert same[0] == 2


def test_sampling_with_the_teacher_as_its_own_draft_keeps_every_draft_and_is_reproducible(models, references):
    cfg = DraftConfig(k=3, temperature=0.8, seed=7)
    ids = next(iter(references.values()))[0]
    runs = []
    for _ in range(2):
        dec = SpeculativeDecoder(models["teacher"].llm, models["self"].llm, cfg)
        runs.append(dec.generate(ids, N))
        s = dec.stats.summary()
        assert s["acceptance_rate"] > 0.99 and s["emitted"] == N - 1
    assert runs[0] == runs[1] and len(runs[0]) == N  # the same seed, the same tokens
    # a sharp temperature (the tiny models' logits are small): the pruned draft is kept sometimes, rejected sometimes
    other = SpeculativeDecoder(models["teacher"].llm, models["student"].llm, DraftConfig(k=3, temperature=0.05, seed=8))
    out = other.generate(ids, N)
    assert len(out) == N and all(0 <= t < models["teacher"].llm.n_vocab() for t in out)
    assert 0 < other.stats.summary()["acceptance_rate"] < 1


def test_probabilities_and_temperature_bounds():
    import numpy as np

    p = probabilities(np.array([0.0, np.log(3.0)]), 1.0)
    assert p == pytest.approx([0.25, 0.75])
    assert probabilities(np.array([0.0, 1.0]), 0.01)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="temperature -1"):
        DraftConfig(temperature=-1)
