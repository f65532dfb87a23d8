"""Sampled generation from the teacher: many sequences at once through llama.cpp's batch API, or transformers."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .registry import lookup, register
from .rundir import scratch

log = logging.getLogger(__name__)

GENERATORS: dict[str, type] = {}  # [data] generator -> class(folder, parallel, threads, gguf_type)
GGUF_TYPES = ("f16", "Q8_0")  # the teacher file llama.cpp generates from
CANDIDATE_RATIO = 1e-6  # top-p looks first at tokens within this probability ratio of the most likely one


def generator(name: str):
    """Register a generator class under `name` (the `generator` of `DataConfig`)."""
    return register(GENERATORS, name)


def get_generator(name: str) -> type:
    return lookup(GENERATORS, name, "generator")


@dataclass(frozen=True)
class Sampling:
    """How each sequence is sampled."""

    max_new: int = 64  # new tokens at most per sequence
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9  # nucleus: the smallest set of tokens holding this much probability
    seed: int = 0  # sequence i draws from numpy's generator seeded [seed, i]


@dataclass
class Stats:
    """What a generator did: sequences, prompt and generated tokens, wall seconds."""

    sequences: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: "Stats") -> None:
        for k in ("sequences", "prompt_tokens", "new_tokens", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict:
        tps = self.new_tokens / self.seconds if self.seconds else 0.0
        return {"sequences": self.sequences, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "seconds": round(self.seconds, 2), "tokens_per_s": round(tps, 1)}


# --- sampling: a pure function ------------------------------------------------------------------------------------

def sample_top_p(logits: np.ndarray, temperature: float, top_p: float, rngs: list) -> np.ndarray:
    """One token per row of `logits` (S, V): softmax(logits / T), cut to the smallest set of most likely tokens whose
    mass reaches `top_p` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1, as
    transformers' TopPLogitsWarper), renormalised, drawn with rngs[s].random(). T = 0 is the argmax. -> (S,) int64

    Only tokens within CANDIDATE_RATIO of the most likely one are sorted; they rank above all others, so when they
    hold `top_p` the nucleus is among them (else the whole row is sorted): exact, and fast on a 50K vocabulary.
    """
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float32) / np.float32(temperature)  # (S, V)
    e = np.exp(z - z.max(-1, keepdims=True))  # (S, V), the largest is 1
    norm = e.sum(-1, dtype=np.float64)  # (S,)
    out = np.empty(len(z), dtype=np.int64)
    for s, row in enumerate(e):
        cand = np.flatnonzero(row >= CANDIDATE_RATIO)
        order = cand[np.argsort(-row[cand], kind="stable")]
        p = row[order] / norm[s]
        if p.sum() < top_p:
            order = np.argsort(-row, kind="stable")
            p = row[order] / norm[s]
        keep = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, len(p))  # up to the token reaching top_p
        cdf = np.cumsum(p[:keep])
        out[s] = order[min(int(np.searchsorted(cdf, rngs[s].random() * cdf[-1], side="right")), keep - 1)]
    return out


def _progress(label: str, total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(), console=Console(stderr=True),
                        transient=True)
    return progress, progress.add_task(label, total=total, tps=0.0)


# --- llama.cpp ----------------------------------------------------------------------------------------------------

def teacher_gguf(folder: Path, out_dir: Path, gguf_type: str = "Q8_0", threads: int = 0) -> Path:
    """The HF teacher as a GGUF file in `out_dir` (pistill's exporter; Q8_0 quantized from F16 by llama.cpp)."""
    from pistill.export.gguf_convert import write_gguf
    from pistill.export.gguf_quantize import quantize_gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type '{gguf_type}' is not supported; use one of {', '.join(GGUF_TYPES)}")
    f16 = write_gguf(folder, Path(out_dir) / "teacher-f16.gguf", "f16")
    if gguf_type == "f16":
        return f16
    path = quantize_gguf(f16, Path(out_dir) / f"teacher-{gguf_type}.gguf", gguf_type, threads)
    f16.unlink()
    return path


@dataclass
class _Slot:
    """One sequence being generated in a llama.cpp sequence slot."""

    index: int  # the prompt's position in the call
    pending: list[int]  # tokens to decode next: the prompt, then each sampled token
    pos: int = 0  # position of pending[0]
    out: list[int] = field(default_factory=list)  # the tokens generated so far


@generator("llama_cpp")
class LlamaCppGenerator:
    """A GGUF file decoded by llama.cpp with `parallel` sequences in one context (one `llama_decode` per step, a
    sequence slot refilled with the next prompt as soon as one finishes), sampled in numpy.

    Greedy or sampled output depends only on the prompts, `Sampling` and the machine: each sequence draws from its
    own seeded generator, and the order prompts enter the slots follows from the outputs.
    """

    def __init__(self, folder: Path, parallel: int = 16, threads: int = 0, gguf_type: str = "Q8_0",
                 gguf: Path | None = None):
        """`folder`: the HF teacher, converted to a temporary GGUF of `gguf_type` (in a scratch folder, removed at
        `close`, or by the next pistill run if this one is killed); or `gguf`: a file to use as is."""
        import llama_cpp

        t0 = time.perf_counter()
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load log; errors still show
        self.ll, self.parallel, self.threads = llama_cpp, parallel, threads or os.cpu_count() or 1
        self._tmp = None
        if gguf is None:
            self._tmp = scratch("teacher-gguf")
            gguf = teacher_gguf(folder, Path(self._tmp.name), gguf_type, threads)
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.stats = Stats()
        self.setup_s = time.perf_counter() - t0  # the GGUF conversion and the load

    def _context(self, n_ctx_seq: int):
        params = self.ll.llama_context_default_params()
        params.n_seq_max = self.parallel
        params.n_ctx = n_ctx_seq * self.parallel  # split evenly: each sequence has its own n_ctx_seq cells
        params.n_batch = params.n_ctx  # one decode call takes every pending token; llama.cpp splits it in ubatches
        params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = self.threads
        ctx = self.ll.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
        return ctx

    def generate(self, prompts: list[list[int]], sampling: Sampling, stop: set[int] = frozenset(),
                 label: str = "generating") -> list[list[int]]:
        """The new tokens of each prompt (token ids, chat template already applied), stopped after an end-of-generation
        token (the GGUF's, or any in `stop`, not included) or `sampling.max_new` tokens."""
        if not prompts:
            return []
        n_ctx_seq = -(-(max(map(len, prompts)) + sampling.max_new) // 256) * 256  # llama.cpp pads n_ctx to 256
        ctx, batch = self._context(n_ctx_seq), self.ll.llama_batch_init(n_ctx_seq * self.parallel, 0, 1)
        t0, stats = time.perf_counter(), Stats(sequences=len(prompts), prompt_tokens=sum(map(len, prompts)))
        progress, task = _progress(label, len(prompts))

        def finished(n_tokens: int) -> None:
            stats.new_tokens += n_tokens
            progress.update(task, advance=1, tps=stats.new_tokens / (time.perf_counter() - t0))

        try:
            with progress:
                results = self._run(ctx, batch, prompts, sampling, stop, finished)
        finally:
            self.ll.llama_batch_free(batch)
            self.ll.llama_free(ctx)
        stats.seconds = time.perf_counter() - t0
        self.stats.add(stats)
        return results

    def _run(self, ctx, batch, prompts: list[list[int]], sampling: Sampling, stop: set[int],
             finished) -> list[list[int]]:
        """The decode loop: free slots take the next prompts, one `llama_decode` advances every slot, each sequence
        samples its token; a finished sequence leaves its slot (and its KV cells) to the next prompt."""
        rngs = [np.random.default_rng([sampling.seed, i]) for i in range(len(prompts))]
        results: list[list[int] | None] = [None] * len(prompts)
        queue, slots = list(range(len(prompts)))[::-1], [None] * self.parallel
        while queue or any(slots):
            for s in range(self.parallel):
                if slots[s] is None and queue:
                    i = queue.pop()
                    slots[s] = _Slot(i, list(prompts[i]))
            active = [s for s, slot in enumerate(slots) if slot is not None]
            logits = self._decode(ctx, batch, [(s, slots[s]) for s in active])  # (len(active), V)
            tokens = sample_top_p(logits, sampling.temperature, sampling.top_p, [rngs[slots[s].index] for s in active])
            for s, tok in zip(active, tokens.tolist()):
                if self._advance(slots[s], tok, sampling.max_new, stop):
                    results[slots[s].index] = slots[s].out
                    finished(len(slots[s].out))
                    slots[s] = None
                    self.ll.llama_memory_seq_rm(self.ll.llama_get_memory(ctx), s, -1, -1)
        return results

    def _advance(self, slot: _Slot, token: int, max_new: int, stop: set[int]) -> bool:
        """Append a sampled token to its sequence, unless it ends it; whether the sequence is done."""
        if self.ll.llama_vocab_is_eog(self.vocab, token) or token in stop:
            return True
        slot.out.append(token)
        slot.pending = [token]
        return len(slot.out) >= max_new

    def _decode(self, ctx, batch, slots: list[tuple[int, _Slot]]) -> np.ndarray:
        """Decode every slot's pending tokens in one batch; the logits after each slot's last token, (S, V)."""
        n = 0
        for s, slot in slots:
            for j, tok in enumerate(slot.pending):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, slot.pos + j, 1
                batch.seq_id[n][0] = s
                batch.logits[n] = j == len(slot.pending) - 1
                n += 1
            slot.pos += len(slot.pending)
        batch.n_tokens = n
        if (rc := self.ll.llama_decode(ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode failed (return code {rc}) on a batch of {n} tokens")
        ptr = self.ll.llama_get_logits(ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(slots), self.n_vocab)).copy()

    def close(self) -> None:
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# --- transformers -------------------------------------------------------------------------------------------------

@generator("transformers")
class TransformersGenerator:
    """The HF teacher through transformers' `generate`, `parallel` left-padded prompts a batch (CUDA when present)."""

    def __init__(self, folder: Path, parallel: int = 16, threads: int = 0, gguf_type: str = ""):
        import torch

        from .models import load_model, load_tokenizer

        t0 = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = load_model(folder), load_tokenizer(folder)
        self.parallel = parallel
        self.stats = Stats()
        self.setup_s = time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], sampling: Sampling, stop: set[int] = frozenset(),
                 label: str = "generating") -> list[list[int]]:
        """As `LlamaCppGenerator.generate`; batch b is sampled with torch seeded (seed, b)."""
        import torch

        from transformers import GenerationConfig

        stop = sorted(set(stop) | {self.tok.eos_token_id})
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else stop[0]
        sample = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        config = GenerationConfig(max_new_tokens=sampling.max_new, eos_token_id=stop, pad_token_id=pad,
                                  **(sample if sampling.temperature > 0 else {"do_sample": False}))
        results, t0 = [], time.perf_counter()
        stats = Stats(sequences=len(prompts), prompt_tokens=sum(map(len, prompts)))
        progress, task = _progress(label, len(prompts))
        with progress:
            for b in range(0, len(prompts), self.parallel):
                chunk = prompts[b:b + self.parallel]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.model.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.model.device)
                torch.manual_seed(sampling.seed * 1_000_003 + b)
                with torch.inference_mode():
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for row in gen[:, width:].tolist():
                    cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                    results.append(row[:cut])
                    stats.new_tokens += cut
                progress.update(task, advance=len(chunk), tps=stats.new_tokens / (time.perf_counter() - t0))
        stats.seconds = time.perf_counter() - t0
        self.stats.add(stats)
        return results

    def close(self) -> None:
        self.model = None


# --- chat prompts -------------------------------------------------------------------------------------------------

def chat_prompt_ids(tokenizer, user: str) -> list[int]:
    """Token ids of a one-turn chat, rendered with the tokenizer's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def stop_ids(tokenizer) -> set[int]:
    """End-of-turn tokens of a chat tokenizer: its EOS and those chat templates close a turn with."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>") if t in vocab}
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def answer(gen, tokenizer, messages: list[str], sampling: Sampling, label: str = "generating") -> list[str]:
    """The generator's decoded, stripped answers to one-turn chat `messages`."""
    prompts = [chat_prompt_ids(tokenizer, m) for m in messages]
    outs = gen.generate(prompts, sampling, stop_ids(tokenizer), label)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
