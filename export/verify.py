"""Export fidelity: tokenizer ids, chat prompts, held-out logits and greedy
generations of the exported files against the torch model they came from."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pistill.device.runtimes import TorchRuntime
from pistill.errors import UserError
from pistill.hf_folder import read_json

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99  # top-1 agreement with torch an unquantized (F16 / F32 / fp32) export must reach ...
TIE = 0.1  # ... where torch's top-2 logits are further apart than this many stds of its logits (F16 may flip closer)
MAX_PPL_DELTA = 0.01  # |ppl / torch ppl - 1| an unquantized export may show
GEN_TIE = 0.5  # a greedy divergence is rounding where torch's pick leads the export's by at most this many stds
TEXTS: tuple[str, ...] = (  # tokenization cases: unicode, digits, whitespace runs, code, special tokens in text
    "héllo wörld — naïve café ✓ 日本語 🙂 Ελληνικά русский",
    "digits 1234567890, 3.14159, 1e-9, -42 and 2024-05-01T12:00",
    "  spaces   and\n\n\ttabs  \n   ",
    "\n\n\n    indented\r\n\r\nwindows lines   ",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }\t// C",
    "https://example.com/path?q=1&r=ü#frag, a.b@c.de",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "A",
)
CONVERSATIONS: tuple[tuple[dict, ...], ...] = (  # chat-template cases, each rendered with a generation prompt
    ({"role": "user", "content": "What is 2 + 2?"},),
    ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primes."},
     {"role": "assistant", "content": "2, 3 and 5."}, {"role": "user", "content": "And the next one?"}),
    ({"role": "user", "content": "Écris « bonjour » 🙂\n\n  avec   espaces"},),
)
PROMPTS: tuple[str, ...] = (  # greedy-generation cases, chat-formatted
    "Explain what a hash table is.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
)


class VerificationError(UserError, RuntimeError):
    """An unquantized export disagrees with torch beyond rounding: the exporter is broken."""

    def __init__(self, name: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{name} does not reproduce the torch model ({'; '.join(problems)}); "
                         "the exporter is broken for this model, nothing was written")


# --- tokenization ---------------------------------------------------------------------------------------------------

def render_chat(template: str, messages: list[dict], bos_token: str, eos_token: str) -> str:
    """A chat template rendered as transformers renders it (sandboxed jinja2, trim/lstrip blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=True, raise_exception=raise_exception)


def tokenizer_parity(hf_tok, encode: Callable[[str, bool], list[int]],
                     chat_ids: Callable[[list[dict]], list[int]] | None) -> dict:
    """Counts and mismatches of an exported tokenizer against the HF one on TEXTS (without and with the
    tokenizer's own special tokens) and CONVERSATIONS (through the exported chat template)."""
    bad_texts = [t for t in TEXTS if encode(t, False) != hf_tok(t, add_special_tokens=False).input_ids]
    bad_texts += [f"[specials] {t}" for t in TEXTS[:1] if encode(t, True) != hf_tok(t).input_ids]
    out = {"texts": len(TEXTS) + 1, "text_mismatches": bad_texts, "chats": 0, "chat_mismatches": []}
    if chat_ids is not None and hf_tok.chat_template:
        want = [_hf_chat_ids(hf_tok, list(c)) for c in CONVERSATIONS]
        out["chats"] = len(CONVERSATIONS)
        out["chat_mismatches"] = [c[-1]["content"] for c, w in zip(CONVERSATIONS, want) if chat_ids(list(c)) != w]
    out["ok"] = not out["text_mismatches"] and not out["chat_mismatches"]
    for miss in out["text_mismatches"] + out["chat_mismatches"]:
        log.warning("tokenization differs from the HF tokenizer on %r", miss)
    return out


def _hf_chat_ids(hf_tok, messages: list[dict]) -> list[int]:
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf_tok(text, add_special_tokens=False).input_ids


def gguf_tokenizer_parity(path: Path, folder: Path) -> dict:
    """llama.cpp's tokenizer, and its ids for the GGUF's own `tokenizer.chat_template`, against the HF tokenizer of
    `folder`."""
    import llama_cpp
    from transformers import AutoTokenizer

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        def encode(text, special):
            return llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)

        return tokenizer_parity(AutoTokenizer.from_pretrained(folder), encode, _llama_chat_ids(llm))
    finally:
        llm.close()


def _llama_chat_ids(llm) -> Callable[[list[dict]], list[int]] | None:
    """messages -> ids as llama-cpp-python's `create_chat_completion` makes them from GGUF metadata: the template
    rendered by its Jinja2ChatFormatter, tokenized by llama.cpp with special tokens parsed."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def text(token_id):
        return llm.detokenize([token_id], special=True).decode("utf-8") if token_id >= 0 else ""

    fmt = Jinja2ChatFormatter(template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))

    def chat_ids(messages):
        prompt = fmt(messages=messages)
        return llm.tokenize(prompt.prompt.encode("utf-8"), add_bos=not prompt.added_special, special=True)

    return chat_ids


def onnx_tokenizer_parity(model_dir: Path, folder: Path) -> dict:
    """The ONNX folder's tokenizer.json (through `tokenizers`, as the device runs it) and its chat template
    against the HF tokenizer of `folder`; also whether genai_config's eos ids hold the HF eos."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok_cfg = read_json(model_dir / "tokenizer_config.json")
    jinja = model_dir / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else tok_cfg.get("chat_template")
    special = {k: _token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token")}

    def chat_ids(messages):
        return tok.encode(render_chat(template, messages, special["bos_token"], special["eos_token"]),
                          add_special_tokens=False).ids

    hf = AutoTokenizer.from_pretrained(folder)
    out = tokenizer_parity(hf, lambda t, s: tok.encode(t, add_special_tokens=s).ids, chat_ids if template else None)
    eos = read_json(model_dir / "genai_config.json").get("model", {}).get("eos_token_id", [])
    out["eos_ok"] = hf.eos_token_id is None or hf.eos_token_id in (eos if isinstance(eos, list) else [eos])
    out["ok"] = out["ok"] and out["eos_ok"]
    return out


def _token_text(value) -> str:
    return (value.get("content") if isinstance(value, dict) else value) or ""


# --- held-out logits ------------------------------------------------------------------------------------------------

def kl_div(ref_lp: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """KL(ref || model) per position over the whole vocabulary: (T, V), (T, V) log-probs -> (T,)."""
    return (np.exp(ref_lp) * (ref_lp - lp)).sum(axis=-1)


@dataclass
class Parity:
    """Running sums of a model against a reference model on the same blocks."""

    tie: float = TIE  # positions whose reference top-2 are closer than this many stds of its logits: not `decided`
    agree: int = 0
    decided_agree: int = 0
    decided: int = 0
    kl: float = 0.0
    n_pos: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    n_next: int = 0

    def add(self, ref_lp: np.ndarray, lp: np.ndarray, ids: np.ndarray) -> None:
        """Reference and model log-probs (T, V) on block `ids` (T,)."""
        nxt = np.arange(len(ids) - 1), ids[1:]
        same = ref_lp.argmax(-1) == lp.argmax(-1)
        top2 = np.partition(ref_lp, -2, axis=-1)[:, -2:]  # (T, 2)
        decided = top2[:, 1] - top2[:, 0] > self.tie * ref_lp.std(-1)
        self.agree += int(same.sum())
        self.decided_agree += int((same & decided).sum())
        self.decided += int(decided.sum())
        self.kl += float(kl_div(ref_lp, lp).sum())
        self.n_pos += len(ids)
        self.nll -= float(lp[nxt].sum())
        self.ref_nll -= float(ref_lp[nxt].sum())
        self.n_next += len(ids) - 1

    def result(self) -> dict:
        ppl, ref_ppl = np.exp(self.nll / self.n_next), np.exp(self.ref_nll / self.n_next)
        return {"agreement": self.agree / self.n_pos, "kl": self.kl / self.n_pos, "ppl": float(ppl),
                "ref_ppl": float(ref_ppl), "ppl_delta": float(ppl / ref_ppl - 1), "n_tokens": self.n_pos,
                "decided_agreement": self.decided_agree / max(self.decided, 1), "decided": self.decided}


class TorchLM(TorchRuntime):
    """The torch model in float32 (on CUDA when present): the reference every export is compared with."""

    def __init__(self, folder: Path):
        super().__init__(str(folder), dtype="float32")


def score(reference: TorchLM, runtimes: dict[str, object], data, vocab=None) -> dict[str, dict]:
    """Each runtime on the held-out blocks of `data`, each block run once: against the teacher (pistill.evaluate's
    bpb, ppl, agreement, kl, n_tokens) and against `reference` (`vs_student`: agreement, kl, ppl, ref_ppl,
    ppl_delta). `vocab`: the VocabMap of a trimmed student (the blocks in its ids; no token-level comparison with
    the teacher)."""
    from pistill.data import load_reference
    from pistill.evaluate import Scores, heldout, log_softmax

    ref = load_reference(data) if vocab is None else None
    teacher = {name: Scores() for name in runtimes}
    student = {name: Parity() for name in runtimes}
    for i, block in enumerate(heldout(data, vocab)):
        ids = block.ids.tolist()
        ref_lp = log_softmax(reference.logits(ids))
        r = None if ref is None else (ref["top1"][i], ref["topk_ids"][i], ref["topk_logp"][i])
        for name, rt in runtimes.items():
            logits = np.asarray(rt.logits(ids))
            teacher[name].add(logits, block, r)
            student[name].add(ref_lp, log_softmax(logits), block.ids)
    return {name: {**teacher[name].result(), "vs_student": student[name].result()} for name in runtimes}


def check_unquantized(name: str, parity: dict, generation: dict | None = None) -> None:
    """VerificationError unless an unquantized export matches torch: top-1 agreement >= MIN_AGREEMENT where torch's
    choice is decided (top-2 apart by more than TIE), perplexity within MAX_PPL_DELTA, greedy generations equal up to
    near-ties (GEN_TIE)."""
    problems = []
    if parity["decided_agreement"] < MIN_AGREEMENT:
        problems.append(f"top-1 agreement {parity['decided_agreement']:.4f} < {MIN_AGREEMENT} "
                        f"(on the {parity['decided']} positions where torch's top-2 are over {TIE} std apart)")
    if abs(parity["ppl_delta"]) > MAX_PPL_DELTA:
        problems.append(f"perplexity {parity['ppl']:.3f} vs torch {parity['ref_ppl']:.3f} "
                        f"({parity['ppl_delta']:+.2%}, limit ±{MAX_PPL_DELTA:.0%})")
    if generation is not None and not generation["ok"]:
        problems.append(f"greedy generation diverges from torch: {generation['diverged']}")
    if problems:
        raise VerificationError(name, problems)


def unquantized_metrics(parity: dict, generation: dict | None) -> dict:
    """The stage metrics of an unquantized export's parity with torch."""
    return {"unquantized_agreement": parity["agreement"], "unquantized_decided_agreement": parity["decided_agreement"],
            "unquantized_kl": parity["kl"], "unquantized_ppl_delta": parity["ppl_delta"],
            "generation_parity": generation}


# --- greedy generation ----------------------------------------------------------------------------------------------

def greedy(lm, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` through a runtime's prefill / decode (its KV-cache path)."""
    out = [lm.prefill(ids)]
    while len(out) < n:
        out.append(lm.decode(out[-1]))
    return out


def prompt_ids(folder: Path, prompts: tuple[str, ...] = PROMPTS) -> list[list[int]]:
    """Chat-formatted prompts as HF token ids (plain text when the tokenizer has no chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if not tok.chat_template:
        return [tok(p).input_ids for p in prompts]
    return [_hf_chat_ids(tok, [{"role": "user", "content": p}]) for p in prompts]


def generation_parity(reference: TorchLM, lm, prompts: list[list[int]], n: int = 16, tie: float = GEN_TIE) -> dict:
    """Greedy generations of `lm` against torch's: how many are equal, and whether every divergence is a near-tie
    (torch's logit for the export's token within `tie` stds of its top logit, where rounding may flip the argmax)."""
    equal, diverged, near = 0, [], 0
    for k, ids in enumerate(prompts):
        want, got = greedy(reference, ids, n), greedy(lm, ids, n)
        if want == got:
            equal += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(want, got)) if a != b)
        logits = reference.logits(ids + want[:i])[-1]
        margin = float((logits[want[i]] - logits[got[i]]) / logits.std())  # in stds of torch's logits
        near += margin <= tie
        diverged.append({"prompt": k, "at": i, "margin": round(margin, 4)})
    return {"prompts": len(prompts), "tokens": n, "equal": equal, "near_ties": near, "diverged": diverged,
            "ok": equal + near == len(prompts)}
