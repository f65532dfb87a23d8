"""Data: token blocks for calibration, training and held-out evaluation, teacher-generated text, teacher reference."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np

from .artifact import Artifact, ArtifactWriter
from .errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("calib", "train", "heldout")
HELDOUT_EVERY = 10  # one document in ten (by content hash) is held out
CHUNK = 1 << 20  # characters read at a time when a file is checked (a long line is read in pieces)


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut into blocks."""

    VERSION: ClassVar[int] = 3
    corpus: str = "default"  # "default" (stdlib docstrings), a .txt / .jsonl file, or "hf:NAME[:CONFIG]"
    text_field: str = "text"  # the field read from .jsonl lines / HF dataset rows
    block_size: int = 256  # tokens per block
    calib_blocks: int = 16  # blocks for activation statistics (pruning)
    train_blocks: int = 128  # blocks for distillation (corpus + generated)
    heldout_blocks: int = 8  # blocks for perplexity / agreement / KL
    prompts: str = "default"  # seed tasks: "default" (pistill's, pistill/prompts.txt) or a .txt file, one a line
    instructions: int = 64  # new tasks the teacher writes from the seeds (Self-Instruct); 0: the seeds alone
    generate: int = 128  # teacher answers to the seed and new tasks; 0 turns generation (and new tasks) off
    gen_tokens: int = 64  # max new tokens per teacher answer
    gen_share: float = 0.5  # share of the training blocks from generated text (either source fills the other's lack)
    generator: str = "llama_cpp"  # llama_cpp (the teacher as a GGUF, many sequences at once) | transformers
    gguf_type: str = "Q8_0"  # the teacher file llama.cpp generates from: Q8_0 | f16
    parallel: int = 16  # sequences generated at once (llama.cpp sequence slots, or the transformers batch)
    threads: int = 0  # llama.cpp threads; 0 = every core
    temperature: float = 0.7  # answers' sampling temperature (0: greedy)
    top_p: float = 0.9  # answers' nucleus: the smallest set of tokens holding this much probability
    max_similarity: float = 0.7  # a new task whose ROUGE-L with a known one reaches this is a near duplicate
    topk: int = 64  # teacher log-probs kept per held-out position for KL
    seed: int = 0  # shuffling and sampling seed

    def __post_init__(self):
        for name in ("block_size", "calib_blocks", "train_blocks", "heldout_blocks", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")
        if not self.text_field:
            raise ValueError("text_field is empty; name the field of the .jsonl lines that holds the text, e.g. text")
        if self.generate < 0 or self.gen_tokens < 1:
            raise ValueError(f"generate = {self.generate} must be >= 0 and gen_tokens = {self.gen_tokens} >= 1")
        self._check_generation()

    def _check_generation(self) -> None:
        from .generate import GGUF_TYPES, get_generator

        get_generator(self.generator)
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type '{self.gguf_type}' is not supported; use one of {', '.join(GGUF_TYPES)}")
        for name in ("instructions", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 0")
        if self.parallel < 1:
            raise ValueError(f"parallel = {self.parallel} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature = {self.temperature} must be >= 0 and top_p = {self.top_p} in (0, 1]")
        for name in ("gen_share", "max_similarity"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1]")

    def validate_paths(self) -> None:
        """The corpus and prompts files exist and read as the stage will read them (called when a recipe is loaded,
        so that a bad file fails then, not after the teacher has generated); InputError naming file and line."""
        for name in ("corpus", "prompts"):
            value = getattr(self, name)
            if value == "default" or name == "corpus" and value.startswith("hf:"):
                continue
            if not value.strip():
                raise InputError(f'{name} is empty; name a file, or "default"')
            field = self.text_field if name == "corpus" and Path(value).suffix == ".jsonl" else None
            if not check_text_file(Path(value), name, field) and (name == "corpus" or self.generate):
                fix = "fill it, or fix [data] corpus" if name == "corpus" else \
                    "write one task a line, or set [data] generate = 0"
                raise InputError(f"{name} file {value} holds no text; {fix}")


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
        return [jsonl_text(path, n, line, cfg.text_field)
                for n, line in enumerate(read_text(path, "corpus").split("\n"), 1) if line.strip()]
    text = read_text(path, "corpus").replace("\r", "")
    return [d.strip() for d in text.split("\n\n") if d.strip()] or [text]


def read_text(path: Path, key: str) -> str:
    """A UTF-8 text file named by `[data] key`; InputError naming it when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{key} file {path} cannot be read ({type(e).__name__}); make it a UTF-8 text file you "
                         f"may read, or fix [data] {key}") from None


def check_text_file(path: Path, key: str, field: str | None = None) -> bool:
    """Read the file of `[data] key` once, streamed, as the stage will: UTF-8 throughout and, with `field`, each
    line a JSON object holding that string (`jsonl_text`). Whether it holds any text; InputError naming the line."""
    if not path.is_file():
        raise InputError(f"{key} file {path} {'is not a file' if path.exists() else 'does not exist'}; "
                         f"fix [data] {key}")
    text = False
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: the lines `read_corpus` numbers
            pieces = enumerate(f, 1) if field else enumerate(iter(lambda: f.read(CHUNK), ""), 1)
            for n, piece in pieces:
                if field and piece.strip():
                    jsonl_text(path, n, piece, field)
                text = text or bool(piece.strip())
    except OSError as e:
        raise InputError(f"{key} file {path} cannot be read ({type(e).__name__}: {e.strerror}); make it a file "
                         f"you may read, or fix [data] {key}") from None
    except UnicodeDecodeError:
        raise InputError(f"{key} file {path} {not_utf8(path)}; save it as UTF-8, or fix [data] {key}") from None
    return text


def not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8: "line N is not UTF-8 (byte 0xNN at column C)" (read in binary, streamed)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    return "is not UTF-8"


def jsonl_text(path: Path, n: int, line: str, field: str) -> str:
    """The text `field` of line `n` (1-based) of a JSONL corpus; InputError naming the file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove the line") from None
    if not isinstance(row, dict):
        raise InputError(f"{path} line {n} is a JSON {type(row).__name__}, not an object; each line must be an "
                         f"object such as {{\"{field}\": \"...\"}}")
    if field not in row:
        raise InputError(f"{path} line {n} has no field '{field}'; set [data] text_field to the field that holds "
                         "the text")
    if not isinstance(row[field], str):
        raise InputError(f"{path} line {n}: '{field}' is a JSON {type(row[field]).__name__}, not a string; "
                         "fix the line or set [data] text_field to the field that holds the text")
    return row[field]


def _hf_dataset(spec: str, field: str) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        import datasets
        rows = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # not installed, offline, unknown name
        raise InputError(f"dataset '{spec}' could not be loaded ({type(e).__name__}: {e}); "
                         "fix: pass a local .txt or .jsonl file as [data] corpus") from e
    if field not in rows.column_names:
        raise InputError(f"dataset '{spec}' has no field '{field}' (it has {', '.join(rows.column_names)}); set "
                         "[data] text_field to the field that holds the text")
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
        raise InputError(f"corpus has {len(stream)} tokens, fewer than {n_blocks} blocks x {block_size}; "
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
        text = read_text(Path(cfg.prompts), "prompts")
    return [line.strip() for line in text.splitlines() if line.strip()]


def teacher_generated(cfg: DataConfig, folder: Path, tok) -> tuple[list[dict], list[dict], dict]:
    """Self-Instruct with the teacher (`cfg.generator`): `cfg.instructions` new tasks written from the seed tasks,
    then `cfg.generate` sampled answers, new tasks first. Returns the rows {prompt, response, source}, one record
    per proposed task, and the metrics (counts by outcome, generation throughput)."""
    from .generate import Sampling, get_generator
    from .selfinstruct import answer_tasks, propose

    seeds = read_prompts(cfg)
    if not seeds:
        raise InputError(f"[data] prompts file {cfg.prompts} holds no task; write one task a line")
    gen = get_generator(cfg.generator)(folder, cfg.parallel, cfg.threads, cfg.gguf_type)
    try:
        new, records, counts = propose(gen, tok, seeds, cfg.instructions, cfg.max_similarity, cfg.seed)
        sampling = Sampling(cfg.gen_tokens, cfg.temperature, cfg.top_p, cfg.seed)
        rows, answers = answer_tasks(gen, tok, new + shuffled(seeds, cfg.seed), cfg.generate, sampling)
    finally:
        gen.close()
    new_tasks = set(new)
    for row in rows:
        row["source"] = "self-instruct" if row["prompt"] in new_tasks else "seed"
    stats = gen.stats.as_dict()
    log.info("data: %d new tasks kept of %d proposed, %d answers; %d tokens generated at %.0f tokens/s (%s)",
             counts["kept"], counts["proposed"], len(rows), stats["new_tokens"], stats["tokens_per_s"], cfg.generator)
    metrics = {"self_instruct": counts, "answers": answers, "gen_tokens_per_s": stats["tokens_per_s"],
               "generation": {"generator": cfg.generator, "parallel": cfg.parallel, **stats,
                              "setup_s": round(gen.setup_s, 2)}
               | ({"gguf_type": cfg.gguf_type} if cfg.generator == "llama_cpp" else {})}
    return rows, records, metrics


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


def load_token_bytes(data: Artifact) -> np.ndarray:
    """(V,) UTF-8 bytes of every teacher token (0 for special tokens): bits per byte's denominator."""
    path = data.path / "token_bytes.npy"
    if not path.is_file():
        raise InputError(f"{data.path} has no token_bytes.npy (a data artifact from before bits per byte); "
                         "rebuild it: pistill run RECIPE --force data")
    return np.load(path)


def token_bytes(tok) -> np.ndarray:
    """(V,) int32 UTF-8 bytes of every token of an HF tokenizer: byte-level BPE tokens have one character per byte;
    other tokens are decoded; special tokens count 0 (they are not text)."""
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") or {} if backend is not None else {}
    byte_level = "ByteLevel" in json.dumps(decoder)  # the decoder alone or in a Sequence
    special, vocab = set(tok.all_special_ids), tok.get_vocab()
    out = np.zeros(max(vocab.values()) + 1, dtype=np.int32)
    for t, i in vocab.items():
        if i not in special:
            out[i] = len(t) if byte_level and i not in tok.added_tokens_decoder else \
                len(tok.convert_tokens_to_string([t]).encode())
    return out


def load_reference(data: Artifact) -> dict[str, np.ndarray]:
    with np.load(data.file("reference.npz")) as z:
        return {k: z[k] for k in z.files}


def pack_upto(docs: list[str], tokenizer, block_size: int, max_blocks: int) -> np.ndarray:
    """As `pack`, but as many whole blocks as the documents fill, at most `max_blocks`: (n, block_size) int32."""
    stream: list[int] = []
    for d in docs:
        if len(stream) >= max_blocks * block_size:
            break
        stream += tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    n = min(max_blocks, len(stream) // block_size)
    return np.asarray(stream[: n * block_size], dtype=np.int32).reshape(n, block_size)


def build_blocks(cfg: DataConfig, tok, generated: list[dict]) -> tuple[dict[str, np.ndarray], int]:
    """Calibration blocks from the first training documents; training blocks from the teacher's answers (chat
    template) and the other training documents, `gen_share` of them generated when both sources have enough (the
    other fills what one lacks), in a seeded order; held-out blocks from the held-out documents. Also returns how
    many training blocks are teacher-generated."""
    train_docs, heldout_docs = split_heldout(read_corpus(cfg))
    train_docs = shuffled(train_docs, cfg.seed)
    n = cfg.train_blocks
    gen = pack_upto(shuffled([chat_text(tok, r) for r in generated], cfg.seed + 1), tok, cfg.block_size, n)
    corpus = pack_upto(train_docs[len(train_docs) // 2:], tok, cfg.block_size, n)
    if len(gen) + len(corpus) < n:
        raise InputError(f"the corpus ({len(corpus)} blocks) and the teacher's answers ({len(gen)}) fill fewer than "
                         f"[data] train_blocks = {n} blocks of {cfg.block_size} tokens; lower train_blocks, raise "
                         "generate, or use a larger corpus")
    n_gen = max(min(len(gen), round(cfg.gen_share * n)), n - len(corpus))
    train = np.concatenate([gen[:n_gen], corpus[: n - n_gen]])[np.random.default_rng(cfg.seed + 1).permutation(n)]
    return {"calib": pack(train_docs, tok, cfg.block_size, cfg.calib_blocks), "train": train,
            "heldout": pack(heldout_docs, tok, cfg.block_size, cfg.heldout_blocks)}, n_gen


def check_topk(cfg: DataConfig, teacher_config: dict) -> None:
    """Fail before any weight loads when `topk` asks for more log-probs than the vocabulary has."""
    vocab = teacher_config.get("vocab_size") or 0
    if cfg.topk > vocab > 0:
        raise InputError(f"[data] topk = {cfg.topk} is more than the teacher's {vocab} tokens; set it to at most "
                         f"{vocab}")


def check_generator(cfg: DataConfig, teacher_dir: Path) -> None:
    """Fail before any weight loads when llama.cpp generation cannot have the teacher as a GGUF file."""
    if not cfg.generate or cfg.generator != "llama_cpp":
        return
    from .export.gguf_convert import check_folder

    try:
        check_folder(teacher_dir)
    except ValueError as e:
        raise InputError(f"[data] generator = \"llama_cpp\" writes the teacher as a GGUF file, which fails: {e}; "
                         "set [data] generator = \"transformers\"") from None


def run(inputs: Mapping[str, Artifact], cfg: DataConfig, out: Path) -> Artifact:
    """Build calibration / training / held-out blocks, teacher answers and the teacher reference."""
    from .models import load_model, load_tokenizer, read_config

    teacher = inputs["teacher"]
    check_topk(cfg, read_config(teacher.model_path()))
    check_generator(cfg, teacher.model_path())
    with ArtifactWriter(out, "data", cfg, inputs) as w:
        tok = load_tokenizer(teacher.model_path())
        generated, tasks = [], []
        if cfg.generate:  # before the torch teacher loads: llama.cpp holds its own copy
            generated, tasks, gen_metrics = teacher_generated(cfg, teacher.model_path(), tok)
            w.metrics.update(gen_metrics)
        blocks, gen_blocks = build_blocks(cfg, tok, generated)
        ref = teacher_reference(load_model(teacher.model_path()), blocks["heldout"], cfg.topk)
        for name, arr in blocks.items():
            np.save(w.dir / f"{name}.npy", arr)
        np.savez(w.dir / "reference.npz", **ref)
        nbytes = token_bytes(tok)
        np.save(w.dir / "token_bytes.npy", nbytes)
        (w.dir / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generated))
        (w.dir / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks))
        w.metrics.update(teacher_ppl=float(np.exp(ref["nll"].mean())), n_tokens=int(blocks["heldout"].size),
                         teacher_bpb=float(ref["nll"].astype(np.float64).sum() / math.log(2)
                                           / max(int(nbytes[blocks["heldout"][:, 1:]].sum()), 1)),
                         generated=len(generated), gen_blocks=gen_blocks,
                         topk_mass=float(np.exp(ref["topk_logp"]).sum(-1).mean()))
    return w.artifact
