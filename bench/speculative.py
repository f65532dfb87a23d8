"""Speculative decoding here: the teacher's Q4_0 alone against the teacher's Q4_0 with the student's Q4_0 as its
draft (the same greedy tokens), and the cost model that explains the speed-up or its absence.

    python bench/speculative.py [--run runs/default] [--teacher FILE] [--draft FILE] [--threads 2]
                                [--prompts 4] [--gen-tokens 128] [--draft-k 4] [--fixed-k 2,4]
                                [--cost-repeats 20] [--out runs/bench-speculative]

Each chat prompt (ChatML, as SmolLM2's template renders it) is answered greedily, up to `--gen-tokens` tokens or the
end of the turn, by the teacher alone and by the teacher with the draft (k adaptive from `--draft-k`, and each fixed
k of `--fixed-k`), in turn per prompt so that both meet the same machine. Decode tok/s counts the tokens after the
first (TTFT: the first, after the prefill of both models).

Exactness. The speculative tokens are the teacher's greedy tokens as its batched forward computes them: each is
checked against the argmax of one teacher forward over the prompt and the answer (`batched_exact`). llama.cpp's CPU
kernels are not batch-invariant, though: a position's logits evaluated alone (plain decoding) and inside a batch
differ slightly at F16 and more at Q4_0, so at a near-tie the two can pick different tokens and the answers part
from there. Each prompt records whether the answers are the same and, where they part, the plain teacher's gap
between its top two logits at that token (`divergence`).

The cost model (Leviathan et al. 2023, section 3.3), timed at the first prompt's length: one teacher decode step
(1 token), one teacher verify step (k + 1 tokens in one batch) for k = 1 .. 8, and one draft step. With the measured
per-token acceptance alpha, a step emits E = (1 - alpha^(k+1)) / (1 - alpha) tokens and costs k draft steps and
one verify step, so the predicted speed-up is E x decode / (k x draft + verify(k)): it needs draft steps much
cheaper than a teacher step and a verify step not much dearer than a decode step.

Files: the teacher's Q4_0 from `<run>/baseline` and the student's from `<run>/gguf` (their manifests' main models)
unless `--teacher` / `--draft` name others. Writes `<out>/speculative.json` and `<out>/speculative.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default system prompt
PROMPTS = (  # fixed chat-style requests, a mix of explanation, lists, code and rewriting
    "Explain in a few sentences why the sky is blue.",
    "List five tips for keeping a Raspberry Pi cool.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Rewrite this sentence in simpler words: The committee postponed the decision indefinitely.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a short recipe for pancakes.",
)
VERIFY_KS = range(1, 9)  # the cost model's draft lengths


def model_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """The teacher's and the draft's GGUF files: the flags, else the run's baseline and gguf main models."""
    from pistill.artifact import Artifact

    teacher = args.teacher or Artifact.load(args.run / "baseline", "baseline").model_path()
    draft = args.draft or Artifact.load(args.run / "gguf", "gguf").model_path()
    return Path(teacher), Path(draft)


def greedy(rt, first: int, n: int, stop: int) -> list[int]:
    """The teacher alone after its prefill: one token per step, up to `n` tokens or `stop`."""
    out = [first]
    while len(out) < n and out[-1] != stop:
        out.append(rt.decode(out[-1]))
    return out


def timed(prefill, extend) -> dict:
    """Time a prefill (returns the first token) and its continuation (first token -> all tokens)."""
    t0 = time.perf_counter()
    first = prefill()
    t1 = time.perf_counter()
    tokens = extend(first)
    return {"tokens": tokens, "ttft_s": t1 - t0, "decode_s": time.perf_counter() - t1}


def top2_gaps(llm, n_prompt: int, n: int) -> list[float]:
    """The gap between the top two logits at each of the `n` positions that chose the tokens after the prompt."""
    top = np.partition(llm.scores[n_prompt - 1: n_prompt - 1 + n], -2, axis=1)[:, -2:]  # (n, 2)
    return (top[:, 1] - top[:, 0]).tolist()


def batched_exact(llm, ids: list[int], tokens: list[int]) -> bool:
    """Whether `tokens` are the argmax at every position of one forward of the teacher over prompt and answer."""
    llm.reset()
    llm.eval([*ids, *tokens[:-1]])
    return np.argmax(llm.scores[len(ids) - 1: len(ids) - 1 + len(tokens)], axis=1).tolist() == tokens


def answer_all(rt, decoders: dict, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """{decoder name: [per-prompt figures]} for the teacher alone ("teacher") and each speculative decoder, in turn
    per prompt; the plain run keeps its top-2 logit gaps, the speculative ones their exactness check."""
    stop = rt.llm.token_eos()
    runs = {"teacher": [], **{name: [] for name in decoders}}
    for ids in prompts:
        plain = timed(lambda: rt.prefill(ids), lambda t: greedy(rt, t, args.gen_tokens, stop))
        plain["gaps"] = top2_gaps(rt.llm, len(ids), len(plain["tokens"]))
        runs["teacher"].append(plain)
        for name, dec in decoders.items():
            run = timed(lambda: dec.prefill(ids), lambda t: dec.extend([t], args.gen_tokens, stop))
            runs[name].append(run | {"batched_exact": batched_exact(rt.llm, ids, run["tokens"]),
                                     "divergence": divergence(plain, run["tokens"])})
    return runs


def divergence(plain: dict, tokens: list[int]) -> dict | None:
    """Where `tokens` part from the plain teacher's answer, with the plain teacher's top-2 logit gap there; None
    when they are the same."""
    ref = plain["tokens"]
    at = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), None)
    if at is None:
        return None if len(ref) == len(tokens) else {"token": min(len(ref), len(tokens)), "gap": None}
    return {"token": at, "gap": plain["gaps"][at]}


def totals(runs: list[dict]) -> dict:
    """Decode tok/s over every prompt (tokens after the first), mean TTFT, and (speculative) how many answers are
    batched-exact and the same as the plain teacher's, with where each other one parts from it."""
    tokens = sum(len(r["tokens"]) - 1 for r in runs)
    decode_s = sum(r["decode_s"] for r in runs)
    out = {"tokens": tokens, "decode_s": decode_s, "decode_tps": tokens / decode_s,
           "ttft_ms": 1e3 * statistics.mean(r["ttft_s"] for r in runs)}
    if "divergence" in runs[0]:
        out |= {"batched_exact": sum(r["batched_exact"] for r in runs),
                "same_as_plain": sum(r["divergence"] is None for r in runs),
                "divergences": [r["divergence"] for r in runs]}
    return out


def step_cost(llm, ids: list[int], tokens: list[int], repeats: int) -> float:
    """Median seconds of one eval of `tokens` (one batch) after the prompt `ids`, the cache cut back each time."""
    from pistill.device.speculative import rollback

    llm.reset()
    llm.eval(ids)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        llm.eval(tokens)
        times.append(time.perf_counter() - t0)
        rollback(llm, len(ids))
    return statistics.median(times[1:])


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a step emits with k drafts accepted each with probability alpha (Leviathan et al. 2023, eq. 1)."""
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def cost_model(rt, draft, ids: list[int], tokens: list[int], alpha: float, repeats: int) -> dict:
    """Step times at the prompt's length and the speed-up they predict for each k at `alpha`."""
    decode = step_cost(rt.llm, ids, tokens[:1], repeats)
    draft_s = step_cost(draft.llm, ids, tokens[:1], repeats)
    rows = []
    for k in VERIFY_KS:
        verify = step_cost(rt.llm, ids, (tokens * (k + 1))[: k + 1], repeats)
        step = k * draft_s + verify
        rows.append({"k": k, "verify_ms": 1e3 * verify, "verify_over_decode": verify / decode,
                     "step_ms": 1e3 * step, "expected_tokens": expected_tokens(alpha, k),
                     "predicted_speedup": expected_tokens(alpha, k) * decode / step})
    return {"context_tokens": len(ids), "alpha": alpha, "decode_ms": 1e3 * decode, "draft_ms": 1e3 * draft_s,
            "draft_over_decode": draft_s / decode, "rows": rows}


def decoder_row(name: str, runs: list[dict], base: dict, stats: dict | None) -> dict:
    figures = totals(runs)
    return {"decoder": name, **figures, "speedup": figures["decode_tps"] / base["decode_tps"],
            "speculative": stats}


def table(result: dict) -> str:
    """The Markdown tables: decoders side by side, then the cost model."""
    n = len(result["prompts"])
    lines = ["| decoding | decode tok/s | × teacher | TTFT (ms) | acceptance | alpha | tokens/step | mean k | "
             "draft ms/step | verify ms/step | batched-exact | same as plain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["decoders"]:
        s = r["speculative"]
        spec = (f"{s['acceptance_rate']:.2f} | {s['alpha']:.2f} | {s['tokens_per_step']:.2f} | {s['mean_k']:.1f} | "
                f"{s['draft_ms_per_step']:.1f} | {s['verify_ms_per_step']:.1f} | {r['batched_exact']}/{n} | "
                f"{r['same_as_plain']}/{n}") if s else "– | – | 1.00 | – | – | – | – | –"
        lines.append(f"| {r['decoder']} | {r['decode_tps']:.1f} | {r['speedup']:.2f} | {r['ttft_ms']:.0f} | {spec} |")
    parted = [f"{r['decoder']}: prompt {i + 1} at token {d['token']}"
              + (f" (plain top-2 gap {d['gap']:.3f})" if d["gap"] is not None else "")
              for r in result["decoders"] for i, d in enumerate(r.get("divergences", [])) if d]
    if parted:
        lines += ["", "Answers that part from the plain teacher's: " + "; ".join(parted) + "."]
    c = result["cost"]
    lines += ["", f"Cost model at {c['context_tokens']} tokens of context: teacher decode step {c['decode_ms']:.2f} ms, "
              f"draft step {c['draft_ms']:.2f} ms (c = {c['draft_over_decode']:.2f}), alpha {c['alpha']:.2f}.", "",
              "| k | verify ms (k+1 tokens) | verify ÷ decode | step ms (k drafts + verify) | tokens/step | "
              "predicted × |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r['verify_ms']:.2f} | {r['verify_over_decode']:.2f} | {r['step_ms']:.2f} | "
              f"{r['expected_tokens']:.2f} | {r['predicted_speedup']:.2f} |" for r in c["rows"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"), help="run folder with baseline/ and gguf/")
    p.add_argument("--teacher", type=Path, help="teacher GGUF (default: the run's baseline Q4_0)")
    p.add_argument("--draft", type=Path, help="draft GGUF (default: the run's student GGUF)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads for both models")
    p.add_argument("--prompts", type=int, default=4, help=f"chat prompts answered (at most {len(PROMPTS)})")
    p.add_argument("--gen-tokens", type=int, default=128, help="max tokens per answer")
    p.add_argument("--draft-k", type=int, default=4, help="adaptive k starts here (within 1 .. 8)")
    p.add_argument("--fixed-k", default="", help="also measure these fixed k, comma-separated (e.g. 2,4)")
    p.add_argument("--cost-repeats", type=int, default=20, help="timed evals per cost-model figure (median)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-speculative"), help="folder for the JSON and table")
    args = p.parse_args(argv)
    args.fixed_k = [int(x) for x in args.fixed_k.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> dict:
    from pistill.artifact import environment, machine_summary
    from pistill.device.agent import peak_rss_mb
    from pistill.device.runtimes import LlamaCppRuntime
    from pistill.device.speculative import DraftConfig, SpeculativeDecoder

    args = parse_args(argv)
    teacher_path, draft_path = model_files(args)
    rt, draft = LlamaCppRuntime(str(teacher_path), args.threads), LlamaCppRuntime(str(draft_path), args.threads)
    configs = {f"+ draft, k {args.draft_k} adaptive": DraftConfig(k=args.draft_k)}
    configs |= {f"+ draft, k {k} fixed": DraftConfig(k=k, k_min=k, k_max=k, adaptive=False) for k in args.fixed_k}
    decoders = {name: SpeculativeDecoder(rt.llm, draft.llm, cfg) for name, cfg in configs.items()}
    texts = PROMPTS[: args.prompts]
    prompts = [rt.tokenize(CHATML.format(system=SYSTEM, user=t)) for t in texts]
    answer_all(rt, decoders, prompts[:1], args)  # warm-up, untimed
    for dec in decoders.values():
        dec.reset_stats()
    runs = answer_all(rt, decoders, prompts, args)
    base = totals(runs["teacher"])
    if not base["tokens"]:
        raise SystemExit("every answer ended at its first token: no decode steps to time; try other --prompts")
    rows = [decoder_row("teacher Q4_0 alone", runs["teacher"], base, None)]
    rows += [decoder_row(name, runs[name], base, dec.stats.summary()) for name, dec in decoders.items()]
    alpha = rows[1]["speculative"]["alpha"] or 0.0
    cost = cost_model(rt, draft, prompts[0], runs["teacher"][0]["tokens"], alpha, args.cost_repeats)
    result = {"schema_version": 1, "machine": machine_summary(), "environment": environment(),
              "settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
              "teacher": {"path": str(teacher_path), "bytes": teacher_path.stat().st_size},
              "draft": {"path": str(draft_path), "bytes": draft_path.stat().st_size},
              "prompts": [{"text": t, "prompt_tokens": len(ids), "tokens": len(r["tokens"])}
                          for t, ids, r in zip(texts, prompts, runs["teacher"])],
              "decoders": rows, "cost": cost, "peak_rss_mb": peak_rss_mb()}
    rt.close()
    draft.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "speculative.md").write_text(table(result) + "\n")
    print(table(result))
    print(f"wrote {args.out / 'speculative.json'} ({result['machine']})")
    return result


if __name__ == "__main__":
    main()
