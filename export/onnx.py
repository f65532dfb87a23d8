"""ONNX export: an HF folder to an int4 (MatMulNBits) or fp32 decoder through the onnxruntime-genai model builder."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter
from pistill.vocab_map import VocabMap
from pistill.errors import InputError
from pistill.hf_folder import check_hf_folder, copy_tokenizer_files
from pistill.rundir import check_free, scratch

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "fp32")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits accepts
ACCURACY_LEVELS = {1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}  # MatMulNBits activation type
MODEL_DIR = "model"  # the exported folder inside the artifact: model.onnx(.data), genai_config.json, tokenizer
USER = "the ONNX export"  # how check_hf_folder's errors name this exporter


@dataclass(frozen=True)
class ONNXConfig:
    """An ONNX decoder for onnxruntime on the CPU (the Pi's runtime when llama.cpp is not used)."""

    VERSION: ClassVar[int] = 2
    precision: str = "int4"  # int4: MatMulNBits weights, what ships; fp32: unquantized, for parity checks
    block_size: int = 32  # int4 weights per scale (16, 32, 64, 128, 256); smaller is more accurate and larger
    accuracy_level: int = 4  # MatMulNBits activations: 4 int8 (the Pi 5's dot-product path), 3 bf16, 2 fp16, 1 fp32
    verify: bool = True  # tokenizer and logit parity with torch; fails the stage if the fp32 export misses them
    verify_fp32: bool = True  # for int4, also build a throwaway fp32 export to prove the exporter (a few seconds)
    gen_tokens: int = 16  # greedy tokens per prompt compared with torch (fp32 export) when verifying

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision '{self.precision}' is not supported; use one of {', '.join(PRECISIONS)}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size {self.block_size} is not supported; "
                             f"use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            levels = ", ".join(f"{k} ({v})" for k, v in ACCURACY_LEVELS.items())
            raise ValueError(f"accuracy_level {self.accuracy_level} is not supported; use one of {levels}")
        if self.gen_tokens < 1:
            raise ValueError(f"gen_tokens = {self.gen_tokens} must be at least 1")

    def builder_options(self) -> list[str]:
        """The model builder's KEY=VALUE extra options."""
        if self.precision != "int4":
            return []
        return [f"block_size={self.block_size}", f"accuracy_level={self.accuracy_level}"]


def export(hf_dir: Path, out: Path, cfg: ONNXConfig) -> Path:
    """Build `out/` (model.onnx, model.onnx.data, genai_config.json, tokenizer files) atomically."""
    hf_dir, out = Path(hf_dir), Path(out)
    check_hf_folder(hf_dir, USER)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t0 = time.time()
        _build(hf_dir, tmp, cfg)
        copy_tokenizer_files(hf_dir, tmp)  # the ones the builder left out, so the folder is self-contained
        log.info("built %s ONNX model from %s in %.1fs", cfg.precision, hf_dir, time.time() - t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _build(hf_dir: Path, out: Path, cfg: ONNXConfig) -> None:
    with _builder_output(), scratch("ortgenai") as cache:  # the builder's download cache, unused for a folder
        from onnxruntime_genai.models import builder

        args = (None, str(hf_dir), str(out), cfg.precision, "cpu", cache)  # model_name, input, output, ..., cache
        options = builder.parse_extra_options(*args, cfg.builder_options())
        builder.create_model(*args, **options)  # the builder's own option dict, as its CLI passes it
    if not (out / "genai_config.json").is_file():
        raise RuntimeError(f"the model builder wrote no genai_config.json into {out}; rerun with --debug logging")


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.debug("%s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def _builder_output():
    """Route the builder's prints, progress bars and onnxruntime quantizer logs to this module's debug log."""
    buf, ort_log, handler = io.StringIO(), logging.getLogger("onnxruntime"), _ToDebug()
    root_handlers, root_level, propagate = list(logging.root.handlers), logging.root.level, ort_log.propagate
    ort_log.addHandler(handler)
    ort_log.propagate = False
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except Exception:
        log.error("the model builder failed; its last output:\n%s", "\n".join(_lines(buf.getvalue())[-20:]))
        raise
    finally:
        ort_log.removeHandler(handler)
        ort_log.propagate = propagate
        logging.root.handlers[:] = root_handlers  # onnxruntime's quantizer calls logging.basicConfig on import
        logging.root.setLevel(root_level)
        log.debug("model builder output:\n%s", "\n".join(_lines(buf.getvalue())))


def _lines(text: str) -> list[str]:
    """Output lines with progress-bar redraws (carriage returns) collapsed to their final state."""
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]


def model_bytes(folder: Path) -> int:
    """Bytes of the ONNX graph and its external weights (model.onnx + model.onnx.data)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith((".onnx", ".onnx.data")))


def score_exports(folders: dict[str, Path], data: Artifact, reference=None, vocab=None) -> dict[str, dict]:
    """Held-out metrics per export name against the teacher; with a torch `reference`, also `vs_student`
    (`vocab`: the VocabMap of a trimmed student)."""
    from pistill.device.runtimes import OnnxRuntime
    from pistill.evaluate import evaluate_path

    from .verify import score

    if reference is None:
        return {name: evaluate_path(f, "onnx", data, vocab=vocab) for name, f in folders.items()}
    return score(reference, {name: OnnxRuntime(str(f)) for name, f in folders.items()}, data, vocab)


def verify_unquantized(fp32_dir: Path, hf_dir: Path, reference, parity: dict, cfg: ONNXConfig) -> dict:
    """Greedy parity of an fp32 export with torch, and its logit parity checked; VerificationError if it is off."""
    from pistill.device.runtimes import OnnxRuntime

    from .verify import check_unquantized, generation_parity, prompt_ids, unquantized_metrics

    gen = generation_parity(reference, OnnxRuntime(str(fp32_dir)), prompt_ids(hf_dir), cfg.gen_tokens)
    check_unquantized(f"the fp32 ONNX export of {hf_dir}", parity, gen)
    return unquantized_metrics(parity, gen)


def verify(folder: Path, hf_dir: Path, data: Artifact, cfg: ONNXConfig, work: Path | None = None) -> dict:
    """Scores of the export (teacher and `vs_student`), tokenizer parity, and the fp32 checks (on the export itself,
    or on a throwaway fp32 build when `cfg.verify_fp32`, made in `work`: the stage's temporary folder, so a killed
    run leaves it where the stage's own leftovers are removed; None: the temp folder)."""
    from .verify import TorchLM, onnx_tokenizer_parity

    reference = TorchLM(hf_dir)
    with scratch("onnx-fp32", work) as tmp:
        folders = {"model": folder}
        if cfg.precision == "int4" and cfg.verify_fp32:
            folders["fp32"] = export(hf_dir, Path(tmp) / MODEL_DIR, dataclasses.replace(cfg, precision="fp32"))
        scores = score_exports(folders, data, reference, VocabMap.load(hf_dir))
        out = {**scores["model"], "tokenizer_parity": onnx_tokenizer_parity(folder, hf_dir)}
        fp32 = "fp32" if "fp32" in folders else "model" if cfg.precision == "fp32" else None
        if fp32:
            out.update(verify_unquantized(folders[fp32], hf_dir, reference, scores[fp32]["vs_student"], cfg))
    return out


def run(inputs: Mapping[str, Artifact], cfg: ONNXConfig, out: Path) -> Artifact:
    """Export the student to ONNX, score it on the held-out blocks with onnxruntime against the teacher and the
    torch student, and fail if the unquantized (fp32) export does not reproduce torch."""
    from pistill.evaluate import evaluate_path

    student, data = inputs["distill"], inputs["data"]
    if (student.model or {}).get("format") != "hf":
        raise InputError(f"{student.path} (stage '{student.stage}') holds no Hugging Face folder to export")
    check_hf_folder(student.model_path(), USER)
    # an fp32 model (the export itself, or the throwaway build that verifies int4) at 4 bytes per parameter, plus
    # the int4 model at ~0.6 (block_size 32): 5 bytes per parameter for int4
    check_free(out, (student.metrics.get("params") or 0) * (5 if cfg.precision == "int4" else 4), "the ONNX export")
    with ArtifactWriter(out, "onnx", cfg, inputs) as w:
        t0 = time.time()
        folder = export(student.model_path(), w.dir / MODEL_DIR, cfg)
        w.model = {"format": "onnx", "file": MODEL_DIR}
        params, size = student.metrics.get("params"), model_bytes(folder)
        w.metrics.update(params=params, bytes=size, export_s=round(time.time() - t0, 2),
                         bits_per_weight=8 * size / params if params else None)
        w.metrics.update(verify(folder, student.model_path(), data, cfg, w.dir) if cfg.verify
                         else evaluate_path(folder, "onnx", data, vocab=VocabMap.load(student.model_path())))
        log.info("onnx %s: %.1f MB, %.3f bits per byte, ppl %.2f", cfg.precision, w.metrics["bytes"] / 1e6,
                 w.metrics["bpb"], w.metrics["ppl"])
    return w.artifact
