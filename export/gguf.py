"""GGUF export: an HF llama-family folder to a GGUF file (F32/F16), then quantized by llama.cpp."""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pistill.artifact import Artifact, ArtifactWriter
from pistill.errors import InputError, UserError
from pistill.hf_folder import Arch, architecture, check_hf_folder, read_json, tied_embeddings

from .imatrix import LlamaImatrix

log = logging.getLogger(__name__)

OUTTYPES = {"f32": 0, "f16": 1}  # outtype -> llama_ftype (ALL_F32, MOSTLY_F16)
QUANT_FTYPES: dict[str, int] = {  # quant type -> llama_ftype in llama.h (llama_cpp.LLAMA_FTYPE_MOSTLY_<name>)
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
}
QK_K = 256  # k-quant super-block width; llama.cpp quantizes narrower rows with a legacy type instead
EVALUATE = ("model", "all", "none")


class QuantizeError(UserError, RuntimeError):
    """llama.cpp could not quantize a GGUF file (its last log lines say why)."""


LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS: dict[tuple, str] = {  # tokenizer.json pre_tokenizer signature -> llama.cpp tokenizer.ggml.pre
    (("ByteLevel", False, True),): "gpt-2",
    (("Digits", True), ("ByteLevel", False, True)): "smollm",
    (("Split", LLAMA3_RE), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", QWEN2_RE), ("ByteLevel", False, False)): "qwen2",
}


@dataclass(frozen=True)
class GGUFConfig:
    """What GGUF files to write, and how they are checked against the torch student."""

    VERSION: ClassVar[int] = 2
    outtype: str = "f16"  # "f16" or "f32": the unquantized file that llama.cpp quantizes from
    quants: tuple[str, ...] = ("Q4_0",)  # llama.cpp quant types; the first is the artifact's model (none: outtype)
    threads: int = 0  # quantization and evaluation threads; 0 = every core
    keep_unquantized: bool = True  # keep model-<outtype>.gguf in the artifact beside the quantized files
    evaluate: str = "model"  # held-out metrics for "model" (the artifact's model file), "all" files, or "none"
    verify: bool = True  # tokenizer, logit and greedy parity with torch; fails the stage if outtype misses them
    gen_tokens: int = 16  # greedy tokens per prompt compared with torch when verifying
    imatrix: bool = True  # weight quantization error by calibration activations (llama.cpp importance matrix)
    num_ctx: int = 2048  # Modelfile PARAMETER num_ctx for ollama (capped at the model's context length)

    def __post_init__(self):
        object.__setattr__(self, "quants", tuple(self.quants))  # TOML gives a list
        if self.outtype not in OUTTYPES:
            raise ValueError(f"outtype = '{self.outtype}' is not supported; use one of {', '.join(OUTTYPES)}")
        for q in self.quants:
            check_quant(q)
        if len(set(self.quants)) != len(self.quants):
            raise ValueError(f"quants = {list(self.quants)} repeats a type; list each once")
        if self.threads < 0:
            raise ValueError(f"threads = {self.threads} must be >= 0 (0 = every core)")
        if self.evaluate not in EVALUATE:
            raise ValueError(f"evaluate = '{self.evaluate}' is unknown; use one of {', '.join(EVALUATE)}")
        if not self.quants and not self.keep_unquantized:
            raise ValueError("quants is empty and keep_unquantized = false: nothing to keep; set one of them")
        for name in ("gen_tokens", "num_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")


def check_quant(quant: str) -> int:
    """The llama_ftype of a quant type name, or a ValueError listing the valid names."""
    if quant not in QUANT_FTYPES:
        raise InputError(f"quant type '{quant}' is unknown; valid: {', '.join(QUANT_FTYPES)}")
    return QUANT_FTYPES[quant]


# --- checks (cheap: no weights loaded) ----------------------------------------------------------------------------

def gguf_quant(manifest: dict) -> str | None:
    """The llama.cpp type of a GGUF artifact's model file: the export's first `quants` entry, else its outtype."""
    cfg = manifest.get("config") or {}
    quants = cfg.get("quants")
    if isinstance(quants, (list, tuple)) and quants:
        return str(quants[0])
    if isinstance(cfg.get("outtype"), str):  # no quants: the model is the unquantized file
        return cfg["outtype"].upper()
    return None


def check_folder(folder: Path) -> tuple[dict, Arch]:
    """The HF config and its registry entry: `check_hf_folder` plus what only the GGUF writer needs (a byte-level
    BPE tokenizer, a rope type llama.cpp knows); ValueError for anything the writer cannot convert."""
    config, arch = check_hf_folder(folder, "the GGUF writer")
    check_tokenizer(Path(folder) / "tokenizer.json")
    rope_type(config)
    return config, arch


def check_tokenizer(path: Path) -> None:
    tok_json = read_json(path)
    byte_level = any(part[0] == "ByteLevel" for part in _pre_signature(tok_json.get("pre_tokenizer")))
    if tok_json.get("model", {}).get("type") != "BPE" or not byte_level:
        raise InputError(f"{path} is not a byte-level BPE tokenizer; the GGUF writer supports only those")


def rope_params(config: dict) -> dict:
    """Rope settings from transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def rope_type(config: dict) -> str:
    rope = rope_params(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise InputError(f"rope_type '{kind}' is not supported by the GGUF writer; "
                         "supported: default, linear, yarn, llama3")
    return kind


# --- the math -----------------------------------------------------------------------------------------------------

def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head * head_dim, ...) -> same shape, each head's rows reordered from HF's halves to adjacent pairs.

    HF llama rotates dimension i with i + head_dim/2 (rotate_half); llama.cpp's LLAMA rope rotates 2i with 2i+1.
    Works for weights (out, in) and biases (out,); pass n_kv_heads for K under GQA.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """(head_dim / 2,) divisors of the rope frequencies for Llama 3.1 "llama3" scaling (llama.cpp `rope_freqs`).

    Wavelengths under original_ctx / high_freq_factor keep their frequency, those over original_ctx /
    low_freq_factor are divided by `factor`, the band between is interpolated (Meta's `apply_scaling`).
    """
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


# --- hyperparameters ----------------------------------------------------------------------------------------------

def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def add_hparams(w, config: dict, outtype: str) -> None:
    """Model shape, rope and norm settings (llama.cpp reads them as `<arch>.*` keys)."""
    n_head, hd = config["num_attention_heads"], head_dim(config)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    if hd * n_head != config["hidden_size"]:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(rope_params(config)["rope_theta"]))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(OUTTYPES[outtype])
    add_rope_scaling(w, config)


def add_rope_scaling(w, config: dict) -> None:
    import gguf

    rope, kind = rope_params(config), rope_type(config)
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
    if kind == "yarn" and "original_max_position_embeddings" in rope:
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if kind == "llama3":  # llama.cpp takes the per-frequency factors as a tensor
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim(config)))


# --- tokenizer ----------------------------------------------------------------------------------------------------

def _pre_signature(pre: dict | None) -> tuple:
    parts = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre] if pre else []
    sig = {"ByteLevel": lambda p: (p.get("add_prefix_space", True), p.get("use_regex", True)),
           "Digits": lambda p: (p.get("individual_digits", False),),
           "Split": lambda p: (p["pattern"].get("Regex", p["pattern"].get("String")),)}
    return tuple((p["type"], *sig.get(p["type"], lambda p: ())(p)) for p in parts)


def pre_tokenizer_name(tok_json: dict) -> str:
    """The llama.cpp pre-tokenizer whose regex matches tokenizer.json's, or "default" with a warning."""
    name = PRE_TOKENIZERS.get(_pre_signature(tok_json.get("pre_tokenizer")))
    if name is None:
        log.warning("pre-tokenizer %s is not one llama.cpp knows; writing 'default' (tokenization may differ)",
                    tok_json.get("pre_tokenizer"))
    return name or "default"


def bpe_vocab(tok_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens (byte-level strings) and gguf.TokenType values, padded to the model's vocab size."""
    import gguf

    by_id = {i: (t, gguf.TokenType.NORMAL) for t, i in tok_json["model"]["vocab"].items()}
    for a in tok_json.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise InputError(f"tokenizer has id {max(by_id)} but vocab_size = {vocab_size}; resize the embeddings")
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in tokens], [int(k) for _, k in tokens]


def _token_id(value, vocab: dict[str, int]) -> int | None:
    text = value.get("content") if isinstance(value, dict) else value
    return vocab.get(text) if isinstance(text, str) else None


def special_ids(folder: Path, config: dict, vocab: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json's tokens first, config.json's ids otherwise."""
    tok_cfg = read_json(folder / "tokenizer_config.json")
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = _token_id(tok_cfg.get(f"{kind}_token"), vocab)
        if tid is None:
            tid = config.get(f"{kind}_token_id")
            tid = tid[0] if isinstance(tid, list) else tid
        if tid is not None:
            ids[kind] = int(tid)
    return ids


def adds_special(folder: Path, ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether the HF tokenizer prepends bos / appends eos (tokenizer_config flags, else the post-processor)."""
    from tokenizers import Tokenizer

    tok_cfg = read_json(folder / "tokenizer_config.json")
    enc = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("a").ids
    bos = tok_cfg.get("add_bos_token", "bos" in ids and enc[:1] == [ids["bos"]])
    eos = tok_cfg.get("add_eos_token", "eos" in ids and enc[-1:] == [ids["eos"]])
    return bool(bos), bool(eos)


def chat_template(folder: Path) -> str | list | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return read_json(folder / "tokenizer_config.json").get("chat_template")


def add_tokenizer(w, folder: Path, config: dict) -> None:
    """Byte-level BPE ("gpt2" in llama.cpp): tokens, types, merges, pre-tokenizer, special ids, chat template."""
    tok_json = read_json(folder / "tokenizer.json")
    model = tok_json["model"]
    tokens, types = bpe_vocab(tok_json, config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tok_json))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    ids = special_ids(folder, config, {t: i for i, t in enumerate(tokens)})
    for kind, tid in ids.items():
        getattr(w, f"add_{kind}_token_id")(tid)
    add_bos, add_eos = adds_special(folder, ids)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if (template := chat_template(folder)) is not None:
        w.add_chat_template(template)


# --- tensors ------------------------------------------------------------------------------------------------------

def tensor_names(folder: Path, config: dict) -> dict[str, str]:
    """HF tensor name -> GGUF name for every tensor to write; ValueError for one llama.cpp has no place for."""
    import gguf
    from safetensors import safe_open

    arch = gguf.MODEL_ARCH[architecture(config).gguf_arch.upper()]
    tmap = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    names, tied = {}, tied_embeddings(config)
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and tied):
                    continue
                if (new := tmap.get_name(name, try_suffixes=(".weight", ".bias"))) is None:
                    raise InputError(f"tensor '{name}' in {shard.name} has no GGUF name for {arch.name.lower()}")
                names[name] = new
    return names


def convert_tensor(name: str, arr: np.ndarray, config: dict, outtype: str) -> np.ndarray:
    """One HF tensor as llama.cpp wants it: Q/K rope-permuted (LLAMA arch), 2-D in outtype, 1-D in F32."""
    if architecture(config).permute_qk:
        n_head = config["num_attention_heads"]
        if ".self_attn.q_proj." in name:
            arr = permute_rope(arr, n_head)
        elif ".self_attn.k_proj." in name:
            arr = permute_rope(arr, config.get("num_key_value_heads") or n_head)
    return arr.astype(np.float16 if outtype == "f16" and arr.ndim > 1 else np.float32)


def add_tensors(w, folder: Path, config: dict, names: dict[str, str], outtype: str) -> None:
    from safetensors import safe_open

    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if name in names:
                    arr = f.get_tensor(name).float().numpy()
                    w.add_tensor(names[name], convert_tensor(name, arr, config, outtype))


# --- files --------------------------------------------------------------------------------------------------------

def write_gguf(folder: Path, path: Path, outtype: str = "f16") -> Path:
    """Convert an HF llama-family folder to one GGUF file, written to `<path>.tmp` and renamed when complete."""
    import gguf

    folder, path = Path(folder), Path(path)
    if outtype not in OUTTYPES:
        raise InputError(f"outtype = '{outtype}' is not supported; use one of {', '.join(OUTTYPES)}")
    config, arch = check_folder(folder)
    names = tensor_names(folder, config)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch.gguf_arch)
    try:
        w.add_name(config.get("_name_or_path") or folder.resolve().name)
        add_hparams(w, config, outtype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, folder, config)
        add_tensors(w, folder, config, names, outtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    log.info("wrote %s (%s, %d tensors)", path, outtype, len(names))
    return path


def narrow_rows(path: Path, block: int = QK_K) -> int:
    """How many 2-D tensors have rows (ne0) not a multiple of `block`: k-quants fall back for them."""
    import gguf

    return sum(1 for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1 and int(t.shape[0]) % block)


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0, imatrix: LlamaImatrix | None = None) -> Path:
    """Quantize a GGUF with llama.cpp (`llama_model_quantize`), through `<dst>.tmp` renamed when complete."""
    import ctypes

    import llama_cpp

    from pistill.llama_build import ensure_works

    ensure_works()  # a crashing build stops here with one line, before anything is written
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = check_quant(quant)
    params.nthread = threads or os.cpu_count() or 1
    if imatrix is not None:
        imatrix.apply(params)
    if "_K" in quant and (n := narrow_rows(src)):
        log.warning("%s: %d tensors have rows not a multiple of %d; llama.cpp quantizes them with a fallback type",
                    quant, n, QK_K)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    with tempfile.TemporaryDirectory() as logdir:
        with _stderr_to(Path(logdir) / "quantize.log"):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        llama_log = (Path(logdir) / "quantize.log").read_text(errors="replace").strip().splitlines()
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp failed to quantize {src} to {quant} (return code {rc}): "
                            + " | ".join(llama_log[-3:]) + "; check the free disk space or try another [gguf] quants")
    os.replace(tmp, dst)
    log.info("quantized %s -> %s", quant, dst)
    return dst


@contextmanager
def _stderr_to(path: Path):
    """Point the process's stderr (fd 2, where llama.cpp logs a line per tensor) at a file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def gguf_stats(path: Path) -> dict:
    """params (rope_freqs excluded), file bytes, bits per weight over tensor data, and tensor counts per type."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(path).tensors if t.name != "rope_freqs.weight"]
    params = sum(int(t.n_elements) for t in tensors)
    types: dict[str, int] = {}
    for t in tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"params": params, "bytes": Path(path).stat().st_size,
            "bits_per_weight": 8 * sum(int(t.n_bytes) for t in tensors) / params, "tensor_types": types}


# --- stage --------------------------------------------------------------------------------------------------------

def importance(reference, data: Artifact, names: dict[str, str]) -> LlamaImatrix:
    """The torch student's importance matrix on the data artifact's calibration blocks."""
    from pistill.data import load_blocks

    from .imatrix import collect

    calib = load_blocks(data, "calib")
    imatrix = collect(reference.model, calib, names)
    log.info("importance matrix: %d tensors from %d calibration blocks", len(imatrix), len(calib))
    return LlamaImatrix(imatrix, len(calib), f"pistill calib {data.id[:12]}")


def score_files(files: list[Path], data: Artifact, threads: int, reference=None,
                kv_type: str = "f16") -> dict[str, dict]:
    """Held-out metrics per file name against the teacher; with a torch `reference`, also `vs_student`. `kv_type`
    "f32" caches keys and values in F32, so an F32 file computes in F32 throughout."""
    from pistill.data import load_blocks
    from pistill.device.runtimes import LlamaCppRuntime
    from pistill.evaluate import evaluate_path

    from .verify import score

    if reference is None:
        return {f.name: evaluate_path(f, "gguf", data, threads) for f in files}
    n_ctx = max(int(load_blocks(data, "heldout").shape[1]), 512)
    runtimes = {}
    try:
        for f in files:
            runtimes[f.name] = LlamaCppRuntime(str(f), threads, n_ctx, kv_type)
        return score(reference, runtimes, data)
    finally:
        for rt in runtimes.values():
            rt.close()


def greedy_parity(path: Path, folder: Path, reference, cfg: GGUFConfig, kv_type: str = "f16") -> dict:
    from pistill.device.runtimes import LlamaCppRuntime

    from .verify import generation_parity, prompt_ids

    rt = LlamaCppRuntime(str(path), cfg.threads, 512, kv_type)
    try:
        return generation_parity(reference, rt, prompt_ids(folder), cfg.gen_tokens)
    finally:
        rt.close()


def verify_unquantized(base: Path, folder: Path, reference, data: Artifact, parity: dict, cfg: GGUFConfig) -> dict:
    """Tokenizer, logit and greedy parity of the unquantized file with torch. When an F16 file misses the gate, an F32
    export decides: F16 rounding can be too coarse for a model with extreme activations (a heavily pruned, barely
    distilled one), but an F32 file that misses too means the exporter is broken (VerificationError)."""
    from .verify import VerificationError, check_unquantized, gguf_tokenizer_parity, unquantized_metrics

    gen = greedy_parity(base, folder, reference, cfg)
    metrics = {"tokenizer_parity": gguf_tokenizer_parity(base, folder), **unquantized_metrics(parity, gen),
               "verified_with": base.name}
    try:
        check_unquantized(base.name, parity, gen)
    except VerificationError as err:
        if cfg.outtype != "f16":
            raise
        log.warning("%s misses the parity gate (%s); an F32 export decides whether the exporter is broken",
                    base.name, "; ".join(err.problems))
        metrics["f32_check"] = check_f32(folder, reference, data, cfg)
        metrics["verified_with"] = "f32"
    return metrics


def check_f32(folder: Path, reference, data: Artifact, cfg: GGUFConfig) -> dict:
    """Parity figures of a throwaway F32 export of `folder`, run with an F32 KV cache; VerificationError if it
    misses the gate."""
    from .verify import check_unquantized, unquantized_metrics

    with tempfile.TemporaryDirectory(prefix="pistill-gguf-f32-") as tmp:
        path = write_gguf(folder, Path(tmp) / "model-f32.gguf", "f32")
        parity = score_files([path], data, cfg.threads, reference, kv_type="f32")[path.name]["vs_student"]
        gen = greedy_parity(path, folder, reference, cfg, kv_type="f32")
        check_unquantized(f"the F32 GGUF of {folder}", parity, gen)
    log.warning("the F32 export matches torch: F16 loses precision on this model; prefer outtype = \"f32\"")
    return unquantized_metrics(parity, gen)


def describe(files: list[Path], model_file: Path, data: Artifact, cfg: GGUFConfig, reference) -> dict[str, dict]:
    """File name -> size, bits per weight, tensor types, and held-out scores for the files `cfg` asks to score."""
    detail = {f.name: gguf_stats(f) for f in files}
    scored = files if cfg.verify or cfg.evaluate == "all" else [model_file] if cfg.evaluate == "model" else []
    for name, scores in score_files(scored, data, cfg.threads, reference if cfg.verify else None).items():
        detail[name].update(scores)
    return detail


def run(inputs: Mapping[str, Artifact], cfg: GGUFConfig, out: Path) -> Artifact:
    """Write the student as `model-<outtype>.gguf`, quantize it to each of `cfg.quants` (with an importance matrix),
    score every file against the teacher and the torch student, fail if the unquantized file is off, and write
    an ollama Modelfile."""
    from .modelfile import for_folder
    from .verify import TorchLM

    student, data = inputs["distill"], inputs["data"]
    folder = student.model_path()
    config = check_folder(folder)[0]
    names = tensor_names(folder, config)  # every check before anything is written
    with ArtifactWriter(out, "gguf", cfg, inputs) as w:
        base = write_gguf(folder, w.dir / f"model-{cfg.outtype}.gguf", cfg.outtype)
        use_imatrix = cfg.imatrix and any(q != "Q8_0" for q in cfg.quants)  # Q8_0 rounds without it
        reference = TorchLM(folder) if cfg.verify or use_imatrix else None
        imatrix = importance(reference, data, names) if use_imatrix else None
        files = [base] + [quantize_gguf(base, w.dir / f"model-{q}.gguf", q, cfg.threads, imatrix)
                          for q in cfg.quants]
        model_file = files[1] if cfg.quants else base
        detail = describe(files, model_file, data, cfg, reference)
        if cfg.verify:
            w.metrics.update(verify_unquantized(base, folder, reference, data, detail[base.name]["vs_student"], cfg))
        num_ctx = min(cfg.num_ctx, config["max_position_embeddings"])
        (w.dir / "Modelfile").write_text(for_folder(folder, model_file.name, num_ctx))
        if not cfg.keep_unquantized and cfg.quants:
            base.unlink()
        w.model = {"format": "gguf", "file": model_file.name}
        w.metrics.update({k: v for k, v in detail[model_file.name].items() if k != "tensor_types"})
        w.metrics["imatrix"] = {"tensors": len(imatrix.names), "chunks": imatrix.n_chunks} if imatrix else None
        w.extra["files_detail"] = detail
    return w.artifact
