"""Hugging Face model folders: the architecture registry, and the one check every exporter runs before writing."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "vocab_map.json")  # copied beside weights, exports
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Arch:
    """What pruning, GGUF and ONNX need to know about one HF architecture (llama.cpp and onnxruntime-genai
    take uniform llama-like layers; the onnxruntime-genai builder exports every entry)."""

    gguf_arch: str  # llama.cpp architecture name
    permute_qk: bool  # HF rotate_half rope -> llama.cpp LLAMA's interleaved-pair rope (qwen2 runs NEOX rope)
    qkv_bias: bool = False  # q/k/v always have biases (Qwen2); otherwise config.json's attention_bias decides
    tie_default: bool = False  # tie_word_embeddings when config.json leaves it out: transformers' config default


ARCHITECTURES: dict[str, Arch] = {  # HF model_type -> its entry
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2", permute_qk=False, qkv_bias=True),
}


def read_json(path: Path) -> dict:
    """A JSON file's object, {} when the file is missing; InputError naming the file when it is unreadable, not
    UTF-8 JSON, or not an object (a damaged download)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise InputError(f"{path} cannot be read as JSON ({why}); download or save the model folder again") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} holds a JSON {type(value).__name__}, not an object; download or save the model "
                         "folder again")
    return value


def check_architecture(config: dict, where: str, user: str = "pistill") -> str:
    """The model_type of an HF config dict, or an InputError naming the supported ones."""
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise InputError(f"architecture '{model_type}' is not supported by {user} ({where}); "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return model_type


def architecture(config: dict) -> Arch:
    """The registry entry of an HF config dict (InputError for an unsupported one)."""
    return ARCHITECTURES[check_architecture(config, "config.json")]


def tied_embeddings(config: dict) -> bool:
    """Whether lm_head shares the embedding matrix, with transformers' default when config.json is silent."""
    return bool(config.get("tie_word_embeddings", architecture(config).tie_default))


def qkv_bias(config: dict) -> bool:
    """Whether the q/k/v projections carry biases."""
    return architecture(config).qkv_bias or bool(config.get("attention_bias"))


def copy_tokenizer_files(src: Path, out: Path) -> None:
    """Copy the tokenizer and generation files of `src` that `out` lacks, so `out` is self-contained."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and not (Path(out) / name).exists():
            shutil.copy2(Path(src) / name, Path(out) / name)


def check_hf_folder(folder: Path, user: str) -> tuple[dict, Arch]:
    """The config and registry entry of an unquantized HF folder with a fast tokenizer, safetensors weights and
    uniform layers, for `user` (e.g. "the GGUF writer") to read; a one-line InputError otherwise. Loads no weights."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if not config:
        raise InputError(f"{folder} has no config.json; {user} needs a Hugging Face model folder")
    model_type = check_architecture(config, str(folder), user)
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise InputError(f"{folder} holds a {method}-quantized model; {user} needs an unquantized (distilled) folder")
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder} has no tokenizer.json ({user} and the device tokenize with it); save the fast "
                         "tokenizer there (AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    if not sorted(folder.glob("*.safetensors")):
        raise InputError(f"{folder} has no *.safetensors weights; save the model with save_pretrained()")
    check_uniform_layers(folder, config)
    return config, ARCHITECTURES[model_type]


def layer_shapes(folder: Path) -> dict[int, dict[str, tuple[int, ...]]]:
    """layer index -> {tensor suffix: shape} from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, framework="np") as f:
            for name in f.keys():
                if m := _LAYER.match(name):
                    layers.setdefault(int(m[1]), {})[m[2]] = tuple(f.get_slice(name).get_shape())
    return layers


def check_uniform_layers(folder: Path, config: dict) -> None:
    """ValueError unless every decoder layer has layer 0's tensors and shapes and the MLP width is config's.

    llama.cpp and onnxruntime-genai take one `intermediate_size` / head layout for every layer.
    """
    layers = layer_shapes(folder)
    if sorted(layers) != list(range(config["num_hidden_layers"])):
        raise InputError(f"{folder}: the weights hold layers {sorted(layers)[:5]}... but config.json says "
                         f"num_hidden_layers = {config['num_hidden_layers']}; save the model again")
    first = layers[0]
    for i, shapes in layers.items():
        for name in sorted(set(first) | set(shapes)):
            if shapes.get(name) != first.get(name):
                raise InputError(f"{folder}: layer {i} {name} has shape {shapes.get(name)} but layer 0 has "
                                 f"{first.get(name)}; llama.cpp and onnxruntime-genai need uniform layers "
                                 "(prune every layer to the same ffn_dim)")
    ffn = first.get("mlp.gate_proj.weight", (config["intermediate_size"],))[0]
    if ffn != config["intermediate_size"]:
        raise InputError(f"{folder}: the MLP weights are {ffn} wide but config.json says intermediate_size = "
                         f"{config['intermediate_size']}; fix config.json")
