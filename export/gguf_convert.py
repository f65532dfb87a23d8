"""GGUF conversion: an HF llama-family folder as one F32/F16 GGUF file (hparams, tokenizer, tensors) for llama.cpp."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from pistill.errors import InputError
from pistill.hf_folder import Arch, architecture, check_hf_folder, read_json, tied_embeddings

log = logging.getLogger(__name__)

OUTTYPES = {"f32": 0, "f16": 1}  # outtype -> llama_ftype (ALL_F32, MOSTLY_F16)
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS: dict[tuple, str] = {  # tokenizer.json pre_tokenizer signature -> llama.cpp tokenizer.ggml.pre
    (("ByteLevel", False, True),): "gpt-2",
    (("Digits", True), ("ByteLevel", False, True)): "smollm",
    (("Split", LLAMA3_RE), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", QWEN2_RE), ("ByteLevel", False, False)): "qwen2",
}


# --- checks (cheap: no weights loaded) ----------------------------------------------------------------------------

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
