"""Vocabulary trimming: a byte-level BPE tokenizer cut to its most used tokens (with every byte token, the
specials and the merges they need), the embedding and output rows sliced to match, and the id map between the
trimmed student and its teacher (pistill.vocab_map)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pistill.errors import InputError
from pistill.vocab_map import VocabMap


def token_counts(blocks, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: how often each teacher id occurs in `blocks` (any shape)."""
    ids = np.asarray(blocks, dtype=np.int64).ravel()
    return np.bincount(ids, minlength=vocab_size)[:vocab_size]


def _corpus_texts(path: Path) -> list[str]:
    """The texts of a .txt file (the whole text) or a .jsonl file (each line's "text", else its first string)."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix != ".jsonl":
        return [text]
    return [_row_text(json.loads(line)) for line in text.split("\n") if line.strip()]


def _row_text(row) -> str:
    """A JSONL row's "text", else its first string value; ValueError when it has neither."""
    if not isinstance(row, dict):
        raise ValueError(f"is a JSON {type(row).__name__}, not an object")
    if isinstance(row.get("text"), str):
        return row["text"]
    text = next((v for v in row.values() if isinstance(v, str)), None)
    if text is None:
        raise ValueError('holds no string (a "text" field, or any string field)')
    return text


def check_corpus(path: Path) -> None:
    """Read `[prune] vocab_corpus` once, streamed, as the prune stage will: UTF-8 throughout, each .jsonl line an
    object holding a string, some text in all; InputError naming the file and the line (before any model loads)."""
    where, text = f"[prune] vocab_corpus {path}", False
    try:
        if not Path(path).is_file():  # a folder, or a FIFO that would block the read
            raise InputError(f"{where} {'is not a file' if Path(path).exists() else 'does not exist'}; fix "
                             "[prune] vocab_corpus")
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):  # split at b"\n" only: a JSON string may hold U+2028
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{where} line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                     f"{e.start + 1}); save it as UTF-8") from None
                if Path(path).suffix == ".jsonl" and line.strip():
                    try:
                        line = _row_text(json.loads(line))
                    except ValueError as e:  # json.JSONDecodeError too
                        raise InputError(f"{where} line {n} {_why(e)}; fix or remove the line") from None
                text = text or bool(line.strip())
    except OSError as e:
        raise InputError(f"{where} cannot be read ({type(e).__name__}: {e.strerror}); make it a file you may "
                         "read, or set vocab_corpus = \"\"") from None
    if not text:
        raise InputError(f"{where} holds no text; fill it, or set vocab_corpus = \"\" to count the data stage's "
                         "training blocks")


def _why(e: ValueError) -> str:
    return f"is not valid JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)


def corpus_counts(tokenizer, path: Path, vocab_size: int) -> np.ndarray:
    """(vocab_size,) token counts of a user's .txt / .jsonl file encoded with the teacher's HF `tokenizer`."""
    check_corpus(path)
    texts = [t for t in _corpus_texts(path) if t.strip()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return token_counts(np.concatenate([np.asarray(i, dtype=np.int64) for i in ids]), vocab_size)


# --- which tokens -------------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the 256-character alphabet of byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + k) for k, b in enumerate(extra)}}


def _merge_pair(m) -> tuple[str, str]:
    """A merge in either tokenizer.json format ("a b" or ["a", "b"])."""
    return tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)


def mandatory_ids(tok_json: dict) -> set[int]:
    """Ids no trimmed vocabulary drops: the added/special tokens and the single-byte tokens (so any text encodes)."""
    alphabet = set(bytes_to_unicode().values())
    return ({a["id"] for a in tok_json.get("added_tokens", [])}
            | {i for t, i in tok_json["model"]["vocab"].items() if t in alphabet})


def merge_parts(tok_json: dict) -> dict[int, tuple[int, int]]:
    """Teacher id -> ids of the two parts of the first (highest-priority) merge that creates it."""
    vocab, parts = tok_json["model"]["vocab"], {}
    for m in tok_json["model"]["merges"]:
        a, b = _merge_pair(m)
        if _keeps_merge((a, b), vocab):
            parts.setdefault(vocab[a + b], (vocab[a], vocab[b]))
    return parts


def _closure(tid: int, parts: dict[int, tuple[int, int]], kept: set[int]) -> set[int]:
    """`tid` and, recursively, the parts of the merges that build it, less those already kept."""
    new, stack = set(), [tid]
    while stack:
        t = stack.pop()
        if t not in kept and t not in new:
            new.add(t)
            stack.extend(parts.get(t, ()))
    return new


def token_ids(tok_json: dict) -> np.ndarray:
    """Ascending ids the tokenizer defines: its vocabulary's and its added tokens'."""
    ids = {*tok_json["model"]["vocab"].values(), *(a["id"] for a in tok_json.get("added_tokens", []))}
    return np.asarray(sorted(ids), dtype=np.int64)


def kept_count(vocab: int | float, tok_json: dict, teacher_vocab_size: int) -> int:
    """The number of tokens `[prune] vocab` keeps (a count, or a share of teacher_vocab_size); InputError when it is
    more than the teacher has or fewer than its specials and single-byte tokens, or not a byte-level BPE."""
    if tok_json.get("model", {}).get("type") != "BPE" or '"ByteLevel"' not in json.dumps(tok_json.get("pre_tokenizer")):
        raise InputError("[prune] vocab trims byte-level BPE tokenizers only (SmolLM2, Llama 3, Qwen2, GPT-2); the "
                         "teacher's tokenizer.json is not one: unset vocab")
    n = round(vocab * teacher_vocab_size) if isinstance(vocab, float) else int(vocab)
    low, high = len(mandatory_ids(tok_json)), int((token_ids(tok_json) < teacher_vocab_size).sum())
    if not low <= n <= high:
        raise InputError(f"[prune] vocab = {vocab} keeps {n} tokens, but the teacher's tokenizer needs between {low} "
                         f"(its specials and single-byte tokens) and {high} (all of them); set vocab in that range or "
                         "unset it to keep the whole vocabulary")
    return n


def choose_kept(tok_json: dict, counts: np.ndarray, n: int) -> np.ndarray:
    """(n,) ascending teacher ids of a byte-level BPE tokenizer to keep: the specials and byte tokens, then the most
    counted tokens (ties: lower id) each with the merges that build it while they fit, then unused ones by id."""
    kept_count(n, tok_json, len(counts))
    parts, kept = merge_parts(tok_json), mandatory_ids(tok_json)
    ids = token_ids(tok_json)
    ids = ids[ids < len(counts)]
    c = np.asarray(counts, dtype=np.int64)[ids]
    for tid in ids[np.lexsort((ids, -c))][: np.count_nonzero(c)].tolist():  # descending count, then ascending id
        new = _closure(tid, parts, kept)
        if len(kept) + len(new) <= n:
            kept |= new
    while len(kept) < n:  # each pass adds at least the earliest-merged token left (its parts are kept)
        for tid in ids.tolist():
            new = _closure(tid, parts, kept)
            if new and len(kept) + len(new) <= n:
                kept |= new
    return np.asarray(sorted(kept), dtype=np.int64)


# --- the trimmed tokenizer and model ------------------------------------------------------------------------------

def _remap_ids(obj, inv: dict[int, int]):
    """A post-processor with its token ids in student ids: TemplateProcessing's "ids" lists, Roberta/Bert's
    [token, id] pairs."""
    if isinstance(obj, dict):
        return {k: [inv[i] for i in v] if k == "ids" else _remap_ids(v, inv) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) == 2 and isinstance(obj[0], str) and type(obj[1]) is int:
            return [obj[0], inv[obj[1]]]
        return [_remap_ids(v, inv) for v in obj]
    return obj


def _keeps_merge(pair: tuple[str, str], vocab: dict[str, int]) -> bool:
    return pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab


def _write_json(path: Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")


def trim_tokenizer(src: Path, dst: Path, kept) -> None:
    """Write into `dst` the tokenizer files of `src` cut to the teacher ids `kept`, renumbered to student ids
    (their index in kept): tokenizer.json (vocab, merges whose parts and result are kept, added tokens,
    post-processor), tokenizer_config.json (added_tokens_decoder), special_tokens_map.json and chat_template.jinja."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    inv = {int(t): i for i, t in enumerate(kept)}
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    vocab = {t: inv[i] for t, i in model["vocab"].items() if i in inv}
    model["merges"] = [m for m in model["merges"] if _keeps_merge(_merge_pair(m), vocab)]
    model["vocab"] = vocab
    tok["added_tokens"] = [{**a, "id": inv[a["id"]]} for a in tok.get("added_tokens", [])]
    tok["post_processor"] = _remap_ids(tok.get("post_processor"), inv)
    _write_json(dst / "tokenizer.json", tok)
    if (src / "tokenizer_config.json").is_file():
        cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {str(inv[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
        _write_json(dst / "tokenizer_config.json", cfg)
    for name in ("special_tokens_map.json", "chat_template.jinja"):  # no ids in them
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _student_id(value, inv: dict[int, int]):
    """A config's token id (an int, a list of them, or None) in student ids; None for a dropped id."""
    if isinstance(value, list):
        return [inv[v] for v in value if v in inv]
    return None if value is None else inv.get(int(value))


def trim_model(model, kept) -> None:
    """Keep only the embedding and output rows of the teacher ids `kept` (tied stays tied), in place, and renumber
    the config's (and generation config's) bos/eos/pad ids."""
    import torch

    embed, head = model.model.embed_tokens, model.lm_head
    idx = torch.as_tensor(np.asarray(kept), device=embed.weight.device)
    inv = {int(t): i for i, t in enumerate(kept)}
    tied = head.weight is embed.weight
    embed.weight = torch.nn.Parameter(embed.weight.data[idx].clone())  # (N, hidden)
    embed.num_embeddings = len(kept)
    if embed.padding_idx is not None:
        embed.padding_idx = inv.get(embed.padding_idx)
    head.weight = embed.weight if tied else torch.nn.Parameter(head.weight.data[idx].clone())
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(head.bias.data[idx].clone())
    head.out_features = len(kept)
    model.config.vocab_size = len(kept)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if cfg is not None and getattr(cfg, name, None) is not None:
                setattr(cfg, name, _student_id(getattr(cfg, name), inv))


def build_map(dst_folder: Path, src_tok_json: dict, kept, teacher_vocab_size: int) -> VocabMap:
    """The VocabMap of a trimmed folder: each dropped teacher token expands to the pieces the trimmed BPE model
    splits its string into (always possible: every byte token is kept)."""
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(Path(dst_folder) / "tokenizer.json")).model
    kept_set, expand = set(np.asarray(kept).tolist()), {}
    for token, tid in src_tok_json["model"]["vocab"].items():
        if tid not in kept_set:
            pieces = bpe.tokenize(token)
            assert "".join(p.value for p in pieces) == token and all(p.id < len(kept_set) for p in pieces), token
            expand[tid] = tuple(p.id for p in pieces)
    return VocabMap(np.asarray(kept), teacher_vocab_size, expand)


def trim_folder(model, src: Path, dst: Path, counts: np.ndarray, n: int) -> VocabMap:
    """Trim `model` (in place) and the tokenizer of HF folder `src` to `n` tokens chosen by `counts`, writing the
    tokenizer files and vocab_map.json into `dst`; the caller saves the weights."""
    tok_json = json.loads((Path(src) / "tokenizer.json").read_text(encoding="utf-8"))
    kept = choose_kept(tok_json, counts, n)
    teacher_vocab_size = model.config.vocab_size
    trim_model(model, kept)
    trim_tokenizer(src, dst, kept)
    vmap = build_map(dst, tok_json, kept, teacher_vocab_size)
    vmap.save(dst)
    return vmap


# --- coverage -----------------------------------------------------------------------------------------------------

def coverage(src_folder: Path, dst_folder: Path, texts: list[str]) -> dict:
    """Tokens per UTF-8 byte of `texts` with the teacher's and the trimmed tokenizer, and fallback_share: the share
    of the trimmed tokens that are single-byte tokens beyond those the teacher's encoding of the same text holds
    (per text, the multiset excess of byte tokens over the teacher's)."""
    from collections import Counter

    from tokenizers import Tokenizer

    alphabet = set(bytes_to_unicode().values())
    n_bytes, n_teacher, n_student, fallback = sum(len(t.encode()) for t in texts), 0, 0, 0
    teacher, student = (Tokenizer.from_file(str(Path(f) / "tokenizer.json")) for f in (src_folder, dst_folder))
    for text in texts:
        t, s = (tok.encode(text, add_special_tokens=False).tokens for tok in (teacher, student))
        n_teacher, n_student = n_teacher + len(t), n_student + len(s)
        fallback += sum((Counter(x for x in s if x in alphabet) - Counter(x for x in t if x in alphabet)).values())
    return {"tokens_per_byte_teacher": n_teacher / max(n_bytes, 1), "tokens_per_byte": n_student / max(n_bytes, 1),
            "fallback_share": fallback / max(n_student, 1)}
