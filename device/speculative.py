"""Speculative decoding on llama.cpp: a small draft model proposes tokens, the teacher checks them in one pass.

Speculative decoding (Leviathan, Kalman and Matias 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"), greedy case:
each step the draft proposes k tokens one at a time, the teacher evaluates [last accepted token, d1 .. dk] in one
batch with logits at every position, and the longest prefix of drafts that equals the teacher's own argmax is
kept, followed by the teacher's token after it (the correction, or a bonus token when all k agree). The output is
the teacher's greedy output, while the teacher runs one batched pass per 1 .. k+1 tokens instead of one per token.
(Exactly so with F32 files; llama.cpp's CPU kernels are not batch-invariant at F16 or Q4_0, where a position's
logits in a batch differ slightly from the same position evaluated alone, so at a near-tie the batched verify can
pick a different token from the one that one-token-at-a-time decoding picks.)
Rejected positions are removed from both KV caches (`rollback`: llama.cpp's `llama_memory_seq_rm` through
llama-cpp-python's context wrapper, and `Llama.n_tokens`, which the next `eval` continues from).

Sampling (`DraftConfig.temperature` > 0) uses the speculative sampling rule instead (Leviathan et al. 2023,
Algorithm 1; Chen et al. 2023, Algorithm 2; `accept_sampled`): the draft samples its k tokens from its own
distribution q, draft i is kept with probability min(1, p_i(d_i) / q_i(d_i)) where p is the teacher's, the first
rejected position draws from the residual max(0, p_i - q_i) renormalised, and a step whose drafts were all kept
draws a bonus token from p_k. Every emitted token is then distributed exactly as the teacher's own sample at that
temperature would be.

k adapts (`DraftConfig.adaptive`): one more after a step whose drafts were all accepted, one fewer after a
rejection, within [k_min, k_max] (the "heuristic" schedule of transformers' assisted generation, with steps of 1).

Runs standalone on a Pi beside agent.py and runtimes.py: numpy and llama_cpp objects only, nothing from pistill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


class DraftError(ValueError):
    """A draft model that cannot serve this teacher (one line, for the agent)."""


@dataclass(frozen=True)
class DraftConfig:
    """How many tokens the draft proposes per verify step."""

    k: int = 4  # draft tokens per step at the start (and throughout when not adaptive)
    k_min: int = 1  # adaptive k never goes below this
    k_max: int = 8  # nor above this; the teacher's verify batch is at most k_max + 1 tokens
    adaptive: bool = True  # +1 after a fully accepted step, -1 after a rejection; False keeps k fixed
    temperature: float = 0.0  # 0: greedy (the teacher's argmax); > 0: speculative sampling at this temperature
    seed: int = 0  # the sampling generator's seed (temperature > 0)

    def __post_init__(self):
        if not 1 <= self.k_min <= self.k <= self.k_max:
            raise ValueError(f"draft k {self.k} must lie in 1 <= k_min ({self.k_min}) <= k <= k_max ({self.k_max})")
        if not self.temperature >= 0:
            raise ValueError(f"temperature {self.temperature} must be 0 (greedy) or positive")


@dataclass
class SpecStats:
    """What the steps did, summed over every step since the stats were made."""

    steps: int = 0  # verify passes of the teacher
    proposed: int = 0  # draft tokens offered to the teacher
    accepted: int = 0  # draft tokens the teacher agreed with
    emitted: int = 0  # tokens output (accepted drafts + one teacher token per step)
    rejected_steps: int = 0  # steps that ended on a disagreement (the rest accepted every draft)
    draft_s: float = 0.0  # seconds in the draft model (its catch-up and its k single-token steps)
    verify_s: float = 0.0  # seconds in the teacher's batched verify passes (rollback included)
    k_counts: dict[int, int] = field(default_factory=dict)  # {k proposed: steps}

    def add(self, k: int, m: int, emitted: int, draft_s: float, verify_s: float) -> None:
        self.steps += 1
        self.proposed += k
        self.accepted += m
        self.emitted += emitted
        self.rejected_steps += m < k
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.k_counts[k] = self.k_counts.get(k, 0) + 1

    def summary(self) -> dict:
        """JSON-ready figures: rates, means per step, and the time split between draft and teacher."""
        steps = max(self.steps, 1)
        compared = self.accepted + self.rejected_steps  # positions the teacher judged: each accept, each first reject
        return {
            "steps": self.steps, "proposed": self.proposed, "accepted": self.accepted, "emitted": self.emitted,
            "rejected_steps": self.rejected_steps,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "alpha": self.accepted / compared if compared else None,  # per-token acceptance (Leviathan et al. 3.1)
            "mean_accepted": self.accepted / steps,  # draft tokens kept per step
            "tokens_per_step": self.emitted / steps,  # with the teacher's own token
            "mean_k": self.proposed / steps, "k_counts": {str(k): n for k, n in sorted(self.k_counts.items())},
            "draft_ms_per_step": 1e3 * self.draft_s / steps, "verify_ms_per_step": 1e3 * self.verify_s / steps,
            "draft_share": self.draft_s / (self.draft_s + self.verify_s) if self.draft_s + self.verify_s else None,
        }


def accepted_prefix(drafts: list[int], greedy: list[int]) -> int:
    """How many leading drafts equal the teacher's greedy tokens at the same positions (`greedy` has one more)."""
    m = 0
    while m < len(drafts) and drafts[m] == greedy[m]:
        m += 1
    return m


def probabilities(logits, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def draw(probs: np.ndarray, rng) -> int:
    return int(rng.choice(len(probs), p=probs))


def accept_sampled(drafts: list[int], q: list[np.ndarray], p: list[np.ndarray], rng) -> tuple[int, int]:
    """Speculative sampling's rule: (drafts kept, the token after them). Draft i, drawn from q[i], is kept with
    probability min(1, p[i][d] / q[i][d]); at the first rejection the token is drawn from max(0, p[i] - q[i])
    renormalised; when all are kept, from p[len(drafts)]. Each emitted token is distributed as p at its position
    (Leviathan et al. 2023, Theorem 3.5). `p` has one more row than `drafts`."""
    for i, d in enumerate(drafts):
        if rng.random() * q[i][d] < p[i][d]:
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        return i, draw(residual / total if total > 0 else p[i], rng)
    return len(drafts), draw(p[len(drafts)], rng)


def next_k(k: int, proposed: int, m: int, cfg: DraftConfig) -> int:
    """The adaptive schedule: grow after a full step at the current k, shrink after a rejection."""
    if not cfg.adaptive:
        return k
    if m < proposed:
        return max(cfg.k_min, k - 1)
    return min(cfg.k_max, k + 1) if proposed == k else k


def rollback(llm, n: int) -> None:
    """Keep the first `n` positions of `llm`'s KV cache (a llama_cpp.Llama) and forget the rest."""
    if not llm._ctx.kv_cache_seq_rm(-1, n, -1):  # llama_memory_seq_rm: False where a model cannot cut its cache
        raise RuntimeError(f"llama.cpp could not remove KV-cache positions from {n} on")
    llm.n_tokens = n  # the next eval() writes from here


def argmax_at(llm, pos: int) -> int:
    return int(np.argmax(llm.scores[pos]))


class SpeculativeDecoder:
    """Speculative decoding of `target` (the teacher) with `draft` (greedy, or sampling at `cfg.temperature`), two
    llama_cpp.Llama objects loaded with logits_all=True and the same vocabulary. `prefill` starts a sequence, each
    `step` emits 1 .. k+1 tokens."""

    def __init__(self, target, draft, cfg: DraftConfig = DraftConfig()):
        check_pair(target, draft)
        self.target, self.draft, self.cfg = target, draft, cfg
        self.k = cfg.k
        self.ids: list[int] = []  # prompt and output so far; the teacher's cache holds all but the last
        self.stats = SpecStats()
        self.rng = np.random.default_rng(cfg.seed)
        self.q: list[np.ndarray] = []  # sampling: the draft's distribution for each token of the last proposal

    def pick(self, llm, pos: int) -> int:
        """The token at `pos`: the argmax (greedy) or a sample at the temperature."""
        if not self.cfg.temperature:
            return argmax_at(llm, pos)
        return draw(probabilities(llm.scores[pos], self.cfg.temperature), self.rng)

    def prefill(self, ids: list[int]) -> int:
        """Both models read the prompt into fresh caches; returns the teacher's first greedy token."""
        self.target.reset()
        self.target.eval(ids)
        first = self.pick(self.target, len(ids) - 1)
        self.draft.reset()
        self.draft.eval(ids)
        self.ids, self.k = [*ids, first], self.cfg.k
        return first

    def reset_stats(self) -> None:
        """Count from here on (after warm-up runs)."""
        self.stats = SpecStats()

    def step(self, limit: int | None = None) -> list[int]:
        """One draft + verify step; the tokens it emits (at most `limit`, at least one)."""
        n0 = self.target.n_tokens  # == len(self.ids) - 1
        k = min(self.k, self.target.n_ctx() - n0 - 1, self.draft.n_ctx() - len(self.ids))
        k = min(k, limit - 1) if limit else k
        if k < 0:
            raise RuntimeError(f"the context of {self.target.n_ctx()} tokens is full")
        t0 = time.perf_counter()
        drafts = self.propose(k)
        t1 = time.perf_counter()
        self.target.eval([self.ids[-1], *drafts])  # one batch, logits at all k + 1 positions
        if self.cfg.temperature:
            p = [probabilities(self.target.scores[n0 + j], self.cfg.temperature) for j in range(k + 1)]
            m, last = accept_sampled(drafts, self.q, p, self.rng)
        else:
            greedy = [argmax_at(self.target, n0 + j) for j in range(k + 1)]
            m = accepted_prefix(drafts, greedy)
            last = greedy[m]
        out = [*drafts[:m], last]
        rollback(self.target, n0 + 1 + m)  # keep the last token and the accepted drafts
        self.ids += out
        self.sync_draft()
        self.stats.add(k, m, len(out), t1 - t0, time.perf_counter() - t1)
        self.k = next_k(self.k, k, m, self.cfg)
        return out

    def propose(self, k: int) -> list[int]:
        """k draft tokens continuing `ids` (greedy, or sampled with their distributions kept in `self.q`): the draft
        first reads what it has not seen (1 or 2 tokens), then takes k - 1 single steps."""
        self.q = []
        if k == 0:
            return []
        self.draft.eval(self.ids[self.draft.n_tokens:])
        drafts = [self.propose_one()]
        while len(drafts) < k:
            self.draft.eval(drafts[-1:])
            drafts.append(self.propose_one())
        return drafts

    def propose_one(self) -> int:
        pos = self.draft.n_tokens - 1
        if not self.cfg.temperature:
            return argmax_at(self.draft, pos)
        self.q.append(probabilities(self.draft.scores[pos], self.cfg.temperature))
        return draw(self.q[-1], self.rng)

    def sync_draft(self) -> None:
        """Cut the draft's cache back to the positions that agree with the output (never past the last token, whose
        logits the next step needs)."""
        seen = self.draft.input_ids[: self.draft.n_tokens]
        ids = np.asarray(self.ids[: len(seen)], dtype=seen.dtype)
        differ = np.flatnonzero(seen[: len(ids)] != ids)
        keep = min(int(differ[0]) if len(differ) else len(ids), len(self.ids) - 1)
        if keep < self.draft.n_tokens:
            rollback(self.draft, keep)

    def generate(self, ids: list[int], n: int, stop: int | None = None) -> list[int]:
        """`n` tokens (greedy, or sampled) after the prompt `ids`, or fewer ending with `stop`."""
        return self.extend([self.prefill(ids)], n, stop)

    def extend(self, out: list[int], n: int, stop: int | None = None) -> list[int]:
        """`out` (the tokens since `prefill`) continued by steps to `n` tokens, or fewer ending with `stop`."""
        while len(out) < n and stop not in out:
            out += self.step(n - len(out))
        return out[: out.index(stop) + 1] if stop in out else out


def check_pair(target, draft) -> None:
    """One line naming why `draft` cannot draft for `target`."""
    if target.n_vocab() != draft.n_vocab():
        raise DraftError(f"the draft's vocabulary has {draft.n_vocab()} tokens and the teacher's {target.n_vocab()}; "
                         "a draft must share the teacher's tokenizer (use the student of this teacher)")
    for name, llm in (("teacher", target), ("draft", draft)):
        if not getattr(llm, "_logits_all", False):
            raise DraftError(f"the {name} model was loaded without logits_all=True; verification reads every position")
