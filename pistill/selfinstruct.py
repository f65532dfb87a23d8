"""Self-Instruct: the teacher writes new tasks from sampled seed tasks, filtered and deduplicated, then answers them.

Wang et al. 2022, "Self-Instruct: Aligning Language Models with Self-Generated Instructions" (arXiv:2212.10560),
Sec. 2: a few tasks from the pool go into a "Come up with a series of tasks" prompt, the model continues the list,
and a new task is kept only if its ROUGE-L with every task in the pool is below 0.7 and it passes simple filters.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .generate import Sampling, answer, stop_ids

SEED_EXAMPLES = 3  # seed tasks per proposal prompt (Wang et al.: 6 of 8)
MACHINE_EXAMPLES = 1  # tasks the teacher already wrote, once there are some (Wang et al.: 2 of 8)
PROPOSALS_PER_TASK = 5  # proposals at most per task asked for, so a model that writes only rejects stops
MIN_WORDS, MAX_WORDS = 4, 40  # task length bounds in words (Wang et al.: more than 3, at most 150)
UNSUPPORTED = ("image", "images", "picture", "pictures", "photo", "graph", "graphs", "chart", "diagram", "file",
               "files", "map", "maps", "draw", "plot", "video", "audio", "music", "flowchart", "link", "url",
               "attached", "website")  # tasks a text model cannot do (Wang et al.'s keyword filter, extended)
PROPOSAL = Sampling(max_new=32, temperature=0.8, top_p=0.95)  # diverse tasks; the filters take out the rest
TASK_PREFIX = re.compile(r"^\s*(task\s*\d*\s*[:.)-]|\d+\s*[:.)-])\s*", re.IGNORECASE)


# --- similarity: pure functions -----------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lower-case word tokens, as ROUGE's default tokenizer splits them."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len(a) len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two token lists (Lin 2004, Sec. 3.1, beta = 1): 2 LCS / (len(a) + len(b))."""
    return 2 * lcs_length(a, b) / (len(a) + len(b)) if a and b else 0.0


@dataclass
class Pool:
    """Tasks seen so far (seeds and kept proposals) and their tokens, for near-duplicate search."""

    tokens: list[list[str]] = field(default_factory=list)
    counts: list[Counter] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        toks = words(text)
        self.texts.append(text)
        self.tokens.append(toks)
        self.counts.append(Counter(toks))

    def most_similar(self, text: str, threshold: float) -> tuple[float, str]:
        """The highest ROUGE-L of `text` with a pool task that can reach `threshold`, and that task ((0, "") if none):
        pairs whose length or shared words bound ROUGE-L below the threshold are skipped."""
        toks, cnt, best = words(text), Counter(words(text)), (0.0, "")
        for other, ocnt, otext in zip(self.tokens, self.counts, self.texts):
            total = len(toks) + len(other)
            if not total or 2 * min(len(toks), len(other)) < threshold * total:
                continue
            if 2 * sum((cnt & ocnt).values()) < threshold * total:  # LCS <= the shared words
                continue
            score = rouge_l(toks, other)
            if score > best[0]:
                best = (score, otext)
        return best


# --- proposals ----------------------------------------------------------------------------------------------------

def proposal_prompt(examples: list[str]) -> str:
    """Wang et al.'s instruction-generation prompt: the examples as a numbered list, the next number left open."""
    lines = "".join(f"Task {i + 1}: {e}\n" for i, e in enumerate(examples))
    return f"Come up with a series of tasks:\n{lines}Task {len(examples) + 1}:"


def parse_task(text: str) -> str:
    """The first line of a continuation, without a leading "Task N:" / "3." and without wrapping quotes."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    line = TASK_PREFIX.sub("", line).strip()
    return line.strip("\"'` ").strip()


def reject_reason(task: str, pool: Pool, max_similarity: float) -> str | None:
    """Why a proposed task is dropped (Wang et al. Sec. 2.4), or None to keep it."""
    n = len(task.split())
    if n < MIN_WORDS:
        return "too_short"
    if n > MAX_WORDS:
        return "too_long"
    if task[0] in string.punctuation or not task[0].isascii():
        return "bad_start"
    if set(words(task)) & set(UNSUPPORTED):
        return "unsupported"
    if any(task.lower() == t.lower() for t in pool.texts):
        return "duplicate"
    if pool.most_similar(task, max_similarity)[0] >= max_similarity:
        return "similar"
    return None


def judge(task: str, pool: Pool, max_similarity: float) -> dict:
    """A proposal's record: {task, kept, reason}, and for a near duplicate the task it resembles (`similar_to`)."""
    reason = reject_reason(task, pool, max_similarity) if task else "empty"
    record = {"task": task, "kept": reason is None, "reason": reason}
    if reason == "similar":
        record["similar_to"] = pool.most_similar(task, max_similarity)[1]
    return record


def example_sets(rng: np.random.Generator, seeds: list[str], new: list[str], n: int) -> list[list[str]]:
    """`n` example lists: SEED_EXAMPLES seed tasks, plus MACHINE_EXAMPLES of the teacher's own when it has some."""
    out = []
    for _ in range(n):
        ex = [seeds[i] for i in rng.choice(len(seeds), min(SEED_EXAMPLES, len(seeds)), replace=False)]
        if new:
            ex += [new[i] for i in rng.choice(len(new), min(MACHINE_EXAMPLES, len(new)), replace=False)]
        out.append([ex[i] for i in rng.permutation(len(ex))])
    return out


def newline_ids(tokenizer) -> set[int]:
    """Ids of every token whose text holds a line break: a proposal ends at the first one."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return {i for i, t in enumerate(texts) if "\n" in t}


def seed_of(*parts: int) -> int:
    """A 32-bit sampling seed derived from several integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def propose(gen, tokenizer, seeds: list[str], n_new: int, max_similarity: float,
            seed: int) -> tuple[list[str], list[dict], dict]:
    """Up to `n_new` new tasks written by the teacher (`gen`, a pistill.generate generator), in rounds of parallel
    proposals filtered in order. Returns the kept tasks, one record per proposal ({task, kept, reason, similar_to})
    and counts {proposed, kept, rejected: {reason: n}}."""
    pool, new, records = Pool(), [], []
    if not n_new:
        return new, records, {"proposed": 0, "kept": 0, "rejected": {}}
    for s in seeds:
        pool.add(s)
    stop = newline_ids(tokenizer) | stop_ids(tokenizer)
    budget, round_ = PROPOSALS_PER_TASK * n_new, 0
    while len(new) < n_new and len(records) < budget:
        rng = np.random.default_rng([seed, round_])
        wanted = -(-5 * (n_new - len(new)) // 4)  # 1.25 x the tasks still wanted, rounded up
        size = min(max(gen.parallel, wanted), 8 * gen.parallel, budget - len(records))
        prompts = [tokenizer(proposal_prompt(ex), add_special_tokens=False).input_ids
                   for ex in example_sets(rng, seeds, new, size)]
        sampling = Sampling(PROPOSAL.max_new, PROPOSAL.temperature, PROPOSAL.top_p, seed_of(seed, 1, round_))
        for out in gen.generate(prompts, sampling, stop, label="self-instruct: tasks"):
            if len(new) == n_new:  # the rest of the last round is not looked at
                break
            records.append(judge(parse_task(tokenizer.decode(out, skip_special_tokens=True)), pool, max_similarity))
            if records[-1]["kept"]:
                new.append(records[-1]["task"])
                pool.add(new[-1])
        round_ += 1
    rejected = Counter(r["reason"] for r in records if not r["kept"])
    counts = {"proposed": len(records), "kept": len(new), "rejected": dict(sorted(rejected.items()))}
    return new, records, counts


# --- answers ------------------------------------------------------------------------------------------------------

def answer_tasks(gen, tokenizer, tasks: list[str], n: int, sampling: Sampling) -> tuple[list[dict], dict]:
    """`n` sampled answers to `tasks` in their order (from the first again once all are asked, each sequence with its
    own random stream), without empty or repeated answers: rows {prompt, response} and counts {asked, kept, empty,
    duplicate}."""
    if not tasks or n == 0:
        return [], {"asked": 0, "kept": 0, "empty": 0, "duplicate": 0}
    asked = [tasks[i % len(tasks)] for i in range(n)]
    rows, seen, counts = [], set(), Counter(asked=n)
    for prompt, text in zip(asked, answer(gen, tokenizer, asked, sampling, label="teacher answers")):
        reason = "empty" if not text else "duplicate" if text in seen else None
        counts[reason or "kept"] += 1
        if reason is None:
            seen.add(text)
            rows.append({"prompt": prompt, "response": text})
    return rows, {k: counts[k] for k in ("asked", "kept", "empty", "duplicate")}

