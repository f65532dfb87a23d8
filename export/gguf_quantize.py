"""GGUF quantization: a GGUF file to a llama.cpp quant type (`llama_model_quantize`), with an importance matrix."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from pistill.errors import InputError, UserError
from pistill.rundir import scratch

from .imatrix import LlamaImatrix

log = logging.getLogger(__name__)

QUANT_FTYPES: dict[str, int] = {  # quant type -> llama_ftype in llama.h (llama_cpp.LLAMA_FTYPE_MOSTLY_<name>)
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
}
QK_K = 256  # k-quant super-block width; llama.cpp quantizes narrower rows with a legacy type instead
OUTPUT_TYPES = ("Q6_K", "Q4_0", "IQ4_NL", "Q8_0", "F16")  # types for the output projection (llama_cpp.GGML_TYPE_<name>)
OUTPUT_TENSORS = ("output.weight", "token_embd.weight")  # the output projection; the tied embedding when no output


class QuantizeError(UserError, RuntimeError):
    """llama.cpp could not quantize a GGUF file (its last log lines say why)."""


def check_quant(quant: str) -> int:
    """The llama_ftype of a quant type name, or a ValueError listing the valid names."""
    if quant not in QUANT_FTYPES:
        raise InputError(f"quant type '{quant}' is unknown; valid: {', '.join(QUANT_FTYPES)}")
    return QUANT_FTYPES[quant]


def check_output_type(name: str) -> str:
    """An output projection type name ("" = llama.cpp's choice), or a ValueError listing the valid names."""
    if name and name not in OUTPUT_TYPES:
        raise InputError(f"output_type = '{name}' is unknown; use one of {', '.join(OUTPUT_TYPES)} "
                         "(or \"\" for llama.cpp's choice)")
    return name


def block_size(name: str) -> int:
    """Weights per block of a ggml type (Q4_0: 32, Q6_K: 256, F16: 1): a row's width must be a multiple of it."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]


def check_output_width(name: str, width: int) -> None:
    """InputError when llama.cpp would quantize a `width`-wide output projection with another type than `name`
    (it falls back for rows not a multiple of the type's block)."""
    if name and width % block_size(name):
        fits = [t for t in OUTPUT_TYPES if width % block_size(t) == 0]
        raise InputError(f"[gguf] output_type = \"{name}\" needs rows that are a multiple of {block_size(name)}, but "
                         f"the output projection is {width} wide; use one of {', '.join(fits)} (blocks of "
                         f"{max(block_size(t) for t in fits)} or less), or \"\" for llama.cpp's choice")


def output_tensor(path: Path) -> tuple[str, int]:
    """(name, width) of a GGUF's output projection: output.weight, or token_embd.weight when they are tied."""
    import gguf

    found = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(path).tensors if t.name in OUTPUT_TENSORS}
    name = next(n for n in OUTPUT_TENSORS if n in found)
    return name, found[name]


def set_output_type(params, name: str, tensor: str) -> None:
    """Point llama.cpp at `name` for the output projection; a tied embedding (`tensor` token_embd.weight) gets it
    through both fields (llama.cpp takes output_tensor_type for it, and token_embedding_type over that)."""
    import llama_cpp

    params.output_tensor_type = getattr(llama_cpp, f"GGML_TYPE_{name}")
    if tensor == "token_embd.weight":
        params.token_embedding_type = params.output_tensor_type


def narrow_rows(path: Path, block: int = QK_K) -> int:
    """How many 2-D tensors have rows (ne0) not a multiple of `block`: k-quants fall back for them."""
    import gguf

    return sum(1 for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1 and int(t.shape[0]) % block)


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0, imatrix: LlamaImatrix | None = None,
                  output_type: str = "") -> Path:
    """Quantize a GGUF with llama.cpp (`llama_model_quantize`), through `<dst>.tmp` renamed when complete; the output
    projection at `output_type` ("" = llama.cpp's choice), InputError when its width does not fit that type."""
    import ctypes

    import llama_cpp

    from pistill.llama_build import ensure_works

    ensure_works()  # a crashing build stops here with one line, before anything is written
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = check_quant(quant)
    params.nthread = threads or os.cpu_count() or 1
    if check_output_type(output_type):
        tensor, width = output_tensor(src)
        check_output_width(output_type, width)
        set_output_type(params, output_type, tensor)
    if imatrix is not None:
        imatrix.apply(params)
    if "_K" in quant and (n := narrow_rows(src)):
        log.warning("%s: %d tensors have rows not a multiple of %d; llama.cpp quantizes them with a fallback type",
                    quant, n, QK_K)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    with scratch("quantize-log") as logdir:
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
