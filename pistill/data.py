"""Data: token blocks for calibration, training and held-out evaluation, teacher-generated text, teacher reference."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np

from .artifact import Artifact, ArtifactWriter

log = logging.getLogger(__name__)

SPLITS = ("calib", "train", "heldout")
HELDOUT_EVERY = 10  # one document in ten (by content hash) is held out


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut into blocks."""

    VERSION: ClassVar[int] = 1
    corpus: str = "default"  # "default" (stdlib docstrings), a .txt / .jsonl file, or "hf:NAME[:CONFIG]"
    text_field: str = "text"  # the field read from .jsonl lines / HF dataset rows
    block_size: int = 256  # tokens per block
    calib_blocks: int = 16  # blocks for activation statistics (pruning)
    train_blocks: int = 128  # blocks for distillation (corpus + generated)
    heldout_blocks: int = 8  # blocks for perplexity / agreement / KL
    prompts: str = "default"  # "default" (pistill's seed prompts) or a .txt file, one prompt a line
    generate: int = 32  # prompts the teacher answers (self-instruct data); 0 turns generation off
    gen_tokens: int = 64  # max new tokens per teacher answer
    topk: int = 64  # teacher log-probs kept per held-out position for KL
    seed: int = 0  # shuffling and sampling seed

    def __post_init__(self):
        for name in ("block_size", "calib_blocks", "train_blocks", "heldout_blocks", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        if self.generate < 0 or self.gen_tokens < 1:
            raise ValueError(f"generate = {self.generate} must be >= 0 and gen_tokens = {self.gen_tokens} >= 1")

    def validate_paths(self) -> None:
        for name in ("corpus", "prompts"):
            value = getattr(self, name)
            if value != "default" and not value.startswith("hf:") and not Path(value).is_file():
                raise ValueError(f"{name} file {value} does not exist; fix [data] {name}")


# --- corpora ---------------------------------------------------------------------------------------------------

def stdlib_docstrings() -> list[str]:
    """Docstrings of the Python standard library, parsed (never imported): text written by others, on every
    machine with Python. Deterministic for a given Python version."""
    root = Path(sys.modules["os"].__file__).parent
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs += [d for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                 and (d := ast.get_docstring(node)) and len(d) > 80]
    return docs


def read_corpus(cfg: DataConfig) -> list[str]:
    """Documents of the configured corpus."""
    if cfg.corpus == "default":
        return stdlib_docstrings()
    if cfg.corpus.startswith("hf:"):
        return _hf_dataset(cfg.corpus[3:], cfg.text_field)
    path = Path(cfg.corpus)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [i for i, r in enumerate(rows) if cfg.text_field not in r]
        if missing:
            raise ValueError(f"{path} line {missing[0] + 1} has no field '{cfg.text_field}'; "
                             "set [data] text_field to the field that holds the text")
        return [r[cfg.text_field] for r in rows]
    text = path.read_text(encoding="utf-8").replace("\r", "")
    return [d.strip() for d in text.split("\n\n") if d.strip()] or [text]


def _hf_dataset(spec: str, field: str) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        import datasets
        rows = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # not installed, offline, unknown name
        raise ValueError(f"dataset '{spec}' could not be loaded ({type(e).__name__}: {e}); "
                         "fix: pass a local .txt or .jsonl file as [data] corpus") from e
    return [r[field] for r in rows]


def split_heldout(docs: list[str]) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split by content hash."""
    train, heldout = [], []
    for d in docs:
        bucket = int(hashlib.sha256(d.encode()).hexdigest(), 16) % HELDOUT_EVERY
        (heldout if bucket == 0 else train).append(d)
    return train, heldout


def pack(docs: list[str], tokenizer, block_size: int, n_blocks: int) -> np.ndarray:
    """Tokenize documents, join them with EOS and cut (n_blocks, block_size) int32 blocks (sequence packing)."""
    eos = tokenizer.eos_token_id
    need = n_blocks * block_size
    stream: list[int] = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False).input_ids + [eos]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than {n_blocks} blocks x {block_size}; "
                         "use a larger corpus or fewer/smaller blocks")
    return np.asarray(stream[:need], dtype=np.int32).reshape(n_blocks, block_size)


def shuffled(docs: list[str], seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


# --- teacher-generated data (self-instruct) ---------------------------------------------------------------------

def read_prompts(cfg: DataConfig) -> list[str]:
    if cfg.prompts == "default":
        text = resources.files("pistill").joinpath("prompts.txt").read_text(encoding="utf-8")
    else:
        text = Path(cfg.prompts).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                       batch_size: int = 8) -> list[dict]:
    """The teacher's sampled answers to chat prompts, deduplicated."""
    import torch
    from rich.console import Console
    from rich.progress import track

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out, seen = [], set()
    for i in track(range(0, len(prompts), batch_size), description="teacher generating", transient=True,
                   console=Console(stderr=True)):
        batch = prompts[i:i + batch_size]
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in batch]
        enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7,
                                 top_p=0.9, pad_token_id=tokenizer.pad_token_id)
        for p, ids in zip(batch, gen[:, enc.input_ids.shape[1]:]):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if text and text not in seen:
                seen.add(text)
                out.append({"prompt": p, "response": text})
    return out


def chat_text(tokenizer, row: dict) -> str:
    msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    return tokenizer.apply_chat_template(msgs, tokenize=False)


# --- teacher reference on held-out blocks -----------------------------------------------------------------------

def teacher_reference(model, blocks: np.ndarray, topk: int) -> dict[str, np.ndarray]:
    """Teacher argmax, top-k log-probs and next-token NLL at every held-out position."""
    import torch

    top1, ids, logp, nll = [], [], [], []
    for block in blocks:
        x = torch.as_tensor(block[None].astype(np.int64), device=model.device)
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=x).logits[0].float(), dim=-1)  # (T, V)
        v, i = lp.topk(topk, dim=-1)
        top1.append(i[:, 0]); ids.append(i); logp.append(v)
        nll.append(-lp[:-1].gather(1, x[0, 1:, None])[:, 0])
    stack = lambda xs, dt: torch.stack(xs).cpu().numpy().astype(dt)  # noqa: E731
    return {"top1": stack(top1, np.int32), "topk_ids": stack(ids, np.int32),
            "topk_logp": stack(logp, np.float32), "nll": stack(nll, np.float32)}


def load_blocks(data: Artifact, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is unknown; use one of {', '.join(SPLITS)}")
    return np.load(data.file(f"{split}.npy"))


def load_reference(data: Artifact) -> dict[str, np.ndarray]:
    with np.load(data.file("reference.npz")) as z:
        return {k: z[k] for k in z.files}


def build_blocks(cfg: DataConfig, tok, generated: list[dict]) -> dict[str, np.ndarray]:
    """Calibration blocks from the first training documents, training blocks from the rest plus the teacher's
    answers, held-out blocks from the held-out documents."""
    train_docs, heldout_docs = split_heldout(read_corpus(cfg))
    train_docs = shuffled(train_docs, cfg.seed)
    gen_docs = [chat_text(tok, r) for r in generated]
    rest = shuffled(gen_docs + train_docs[len(train_docs) // 2:], cfg.seed + 1)
    return {"calib": pack(train_docs, tok, cfg.block_size, cfg.calib_blocks),
            "train": pack(rest, tok, cfg.block_size, cfg.train_blocks),
            "heldout": pack(heldout_docs, tok, cfg.block_size, cfg.heldout_blocks)}


def run(inputs: list[Artifact], cfg: DataConfig, out: Path) -> Artifact:
    """Build calibration / training / held-out blocks, teacher answers and the teacher reference."""
    from .models import load_model, load_tokenizer

    teacher = inputs[0]
    with ArtifactWriter(out, "data", cfg, inputs) as w:
        tok = load_tokenizer(teacher.model_path())
        model = load_model(teacher.model_path())
        generated = []
        if cfg.generate:
            generated = generate_responses(model, tok, read_prompts(cfg)[: cfg.generate], cfg.gen_tokens, cfg.seed)
        blocks = build_blocks(cfg, tok, generated)
        ref = teacher_reference(model, blocks["heldout"], cfg.topk)
        for name, arr in blocks.items():
            np.save(w.dir / f"{name}.npy", arr)
        np.savez(w.dir / "reference.npz", **ref)
        (w.dir / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generated))
        w.metrics.update(teacher_ppl=float(np.exp(ref["nll"].mean())), n_tokens=int(blocks["heldout"].size),
                         generated=len(generated), topk_mass=float(np.exp(ref["topk_logp"]).sum(-1).mean()))
    return w.artifact
