"""The baseline stage: the teacher's own GGUF files, made as the student's are, for the report to compare against.

A Pi user's first alternative to pistill is to quantize the teacher and run it. This stage writes that file with
the same exporter (`write_gguf`, `quantize_gguf`) at the student GGUF's quant type, output projection type and
importance-matrix policy (read from the gguf artifact's manifest), and at the other `quants` (Q8_0 by default), and
scores each on the same held-out blocks. The artifact holds several models (manifest `models`, keyed "baseline" for
the first file and "baseline:<TYPE>" for the others); bench, eval and report take each of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter
from pistill.errors import InputError

from . import gguf
from .gguf_convert import check_folder, tensor_names, write_gguf
from .gguf_quantize import QUANT_FTYPES, check_output_width, check_quant, quantize_gguf

log = logging.getLogger(__name__)

STUDENT = "student"  # in `quants`: the student GGUF's own type
UNQUANTIZED = ("F16", "F32")  # in `quants`: the teacher unquantized, as the converter writes it


@dataclass(frozen=True)
class BaselineConfig:
    """Which teacher GGUF files to write and score."""

    VERSION: ClassVar[int] = 1
    quants: tuple[str, ...] = (STUDENT, "Q8_0")  # llama.cpp types, F16, F32; "student" = the student GGUF's type
    threads: int = 0  # quantization and evaluation threads; 0 = every core
    evaluate: bool = True  # held-out ppl / agreement / KL of each file against the teacher

    def __post_init__(self):
        object.__setattr__(self, "quants", tuple(self.quants))  # TOML gives a list
        if not self.quants:
            raise ValueError('quants is empty; name at least one type, e.g. ["student", "Q8_0"]')
        for q in self.quants:
            if q not in (STUDENT, *UNQUANTIZED):
                check_quant(q)
        if len(set(self.quants)) != len(self.quants):
            raise ValueError(f"quants = {list(self.quants)} repeats a type; list each once")
        if self.threads < 0:
            raise ValueError(f"threads = {self.threads} must be >= 0 (0 = every core)")


def student_policy(manifest: dict) -> tuple[str, str, bool]:
    """(type, outtype, imatrix) of a gguf artifact's model: its first quant type (its unquantized outtype, upper
    case, when it has none), the unquantized type it was quantized from, and whether an importance matrix was used."""
    cfg = manifest.get("config") or {}
    outtype = cfg.get("outtype", "f16")
    quants = list(cfg.get("quants") or [])
    kind = quants[0] if quants else outtype.upper()
    imatrix = bool(cfg.get("imatrix", True)) and any(q != "Q8_0" for q in quants)  # as the gguf stage decides
    return kind, outtype, imatrix


def output_types(cfg: BaselineConfig, student: dict, student_type: str, hidden: int) -> dict[str, str]:
    """{type: output projection type}: the student GGUF's `output_type` for the file of the student's type (like for
    like), when the teacher's `hidden`-wide rows fit it; {} otherwise (llama.cpp's choice)."""
    chosen = (student.get("config") or {}).get("output_type") or ""  # "" in manifests from before the option
    if not chosen or STUDENT not in cfg.quants:
        return {}
    try:
        check_output_width(chosen, hidden)
    except InputError as err:
        log.warning("baseline: the teacher's %s file keeps llama.cpp's output type: %s", student_type, err)
        return {}
    return {student_type: chosen}


def file_types(cfg: BaselineConfig, student_type: str) -> list[str]:
    """The types to write, in order, "student" resolved and repeats dropped (the student's type may be Q8_0)."""
    return list(dict.fromkeys(student_type if q == STUDENT else q for q in cfg.quants))


def model_key(i: int, kind: str) -> str:
    """"baseline" for the first file, "baseline:<TYPE>" for the others."""
    return "baseline" if i == 0 else f"baseline:{kind}"


def write_files(folder: Path, data: Artifact, kinds: list[str], outtype: str, use_imatrix: bool, out: Path,
                threads: int, outputs: dict[str, str] | None = None) -> list[Path]:
    """The teacher folder as `teacher-<TYPE>.gguf` for each type: written at `outtype`, then quantized by llama.cpp,
    with the teacher's importance matrix on the calibration blocks when `use_imatrix`, and the output projection
    at `outputs[TYPE]` where given."""
    from .verify import TorchLM

    base = write_gguf(folder, out / f"teacher-{outtype}.gguf", outtype)
    needs = [k for k in kinds if k in QUANT_FTYPES]
    imatrix = None
    if use_imatrix and needs:
        names = tensor_names(folder, check_folder(folder)[0])
        imatrix = gguf.importance(TorchLM(folder), data, names)
    files = []
    for kind in kinds:
        if kind in QUANT_FTYPES:
            files.append(quantize_gguf(base, out / f"teacher-{kind}.gguf", kind, threads, imatrix,
                                       (outputs or {}).get(kind, "")))
        elif kind.lower() == outtype:
            files.append(base)
        else:  # the other unquantized type
            files.append(write_gguf(folder, out / f"teacher-{kind}.gguf", kind.lower()))
    if base not in files:
        base.unlink()
    return files


def run(inputs: Mapping[str, Artifact], cfg: BaselineConfig, out: Path) -> Artifact:
    """Write the teacher's GGUF at the student GGUF's type and at each other `cfg.quants` type, each scored on the
    held-out blocks; one artifact holding every file as a model."""
    teacher, data, student = inputs["teacher"], inputs["data"], inputs["gguf"]
    folder = teacher.model_path()
    config = check_folder(folder)[0]  # every check before anything is written
    student_type, outtype, use_imatrix = student_policy(student.manifest)
    kinds = file_types(cfg, student_type)
    outputs = output_types(cfg, student.manifest, student_type, config["hidden_size"])
    with ArtifactWriter(out, "baseline", cfg, inputs) as w:
        files = write_files(folder, data, kinds, outtype, use_imatrix, w.dir, cfg.threads, outputs)
        scores = gguf.score_files(files, data, cfg.threads) if cfg.evaluate else {}
        models, stats_of = [], {p.name: gguf.gguf_stats(p) for p in files}
        for i, (kind, path) in enumerate(zip(kinds, files)):
            stats = stats_of[path.name]
            metrics = {**{k: v for k, v in stats.items() if k != "tensor_types"}, **scores.get(path.name, {})}
            models.append({"key": model_key(i, kind), "format": "gguf", "file": path.name, "quant": kind,
                           "metrics": metrics})
            log.info("baseline %s: %s, %.1f MB%s", kind, path.name, stats["bytes"] / 1e6,
                     f", ppl {metrics['ppl']:.2f}" if "ppl" in metrics else "")
        w.model = {"format": "gguf", "file": files[0].name}
        w.models = models
        w.metrics.update(models[0]["metrics"])
        w.metrics["imatrix"] = use_imatrix
        w.extra["student_type"] = student_type
        w.extra["output_type"] = outputs.get(student_type, "")
        w.extra["files_detail"] = {name: st["tensor_types"] for name, st in stats_of.items()}
    return w.artifact
