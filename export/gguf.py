"""The gguf stage: the student as GGUF files (converted, quantized by llama.cpp), checked against torch and scored."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pistill.artifact import Artifact, ArtifactWriter
from pistill.rundir import check_free, scratch
from pistill.vocab_map import VocabMap

from .gguf_convert import OUTTYPES, check_folder, tensor_names, write_gguf
from .gguf_quantize import check_output_type, check_output_width, check_quant, quantize_gguf
from .imatrix import LlamaImatrix

log = logging.getLogger(__name__)

EVALUATE = ("model", "all", "none")


@dataclass(frozen=True)
class GGUFConfig:
    """What GGUF files to write, and how they are checked against the torch student."""

    VERSION: ClassVar[int] = 3
    outtype: str = "f16"  # "f16" or "f32": the unquantized file that llama.cpp quantizes from
    quants: tuple[str, ...] = ("Q4_0",)  # llama.cpp quant types; the first is the artifact's model (none: outtype)
    output_type: str = ""  # llama.cpp type of the output projection (the tied embedding when there is no
    # output.weight): "" keeps llama.cpp's choice (Q8_0 at Q4_0 for a 576-wide model), or Q6_K, Q4_0, IQ4_NL, Q8_0, F16
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
        check_output_type(self.output_type)
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


# --- what a GGUF artifact holds -----------------------------------------------------------------------------------

def gguf_quant(manifest: dict) -> str | None:
    """The llama.cpp type of a GGUF artifact's model file: the export's first `quants` entry, else its outtype."""
    cfg = manifest.get("config") or {}
    quants = cfg.get("quants")
    if isinstance(quants, (list, tuple)) and quants:
        return str(quants[0])
    if isinstance(cfg.get("outtype"), str):  # no quants: the model is the unquantized file
        return cfg["outtype"].upper()
    return None


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

def importance(reference, data: Artifact, names: dict[str, str], vocab=None) -> LlamaImatrix:
    """The torch student's importance matrix on the data artifact's calibration blocks (in a trimmed student's
    ids when `vocab`, its VocabMap, is given)."""
    from pistill.data import load_blocks

    from .imatrix import collect

    calib = load_blocks(data, "calib")
    calib = calib if vocab is None else vocab.to_student_blocks(calib)
    imatrix = collect(reference.model, calib, names)
    log.info("importance matrix: %d tensors from %d calibration blocks", len(imatrix), len(calib))
    return LlamaImatrix(imatrix, len(calib), f"pistill calib {data.id[:12]}")


def score_files(files: list[Path], data: Artifact, threads: int, reference=None,
                kv_type: str = "f16", vocab=None) -> dict[str, dict]:
    """Held-out metrics per file name against the teacher; with a torch `reference`, also `vs_student`. `kv_type`
    "f32" caches keys and values in F32, so an F32 file computes in F32 throughout. `vocab`: the VocabMap of a
    trimmed student."""
    from pistill.device.runtimes import LlamaCppRuntime
    from pistill.evaluate import evaluate_path, heldout_ctx

    from .verify import score

    if reference is None:
        return {f.name: evaluate_path(f, "gguf", data, threads, vocab) for f in files}
    n_ctx = heldout_ctx(data, vocab)
    runtimes = {}
    try:
        for f in files:
            runtimes[f.name] = LlamaCppRuntime(str(f), threads, n_ctx, kv_type)
        return score(reference, runtimes, data, vocab)
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
        metrics["f32_check"] = check_f32(folder, reference, data, cfg, base.parent)  # base: in the stage's folder
        metrics["verified_with"] = "f32"
    return metrics


def check_f32(folder: Path, reference, data: Artifact, cfg: GGUFConfig, work: Path | None = None) -> dict:
    """Parity figures of a throwaway F32 export of `folder` (written in `work`, the stage's temporary folder; None:
    the temp folder), run with an F32 KV cache; VerificationError if it misses the gate."""
    from .verify import check_unquantized, unquantized_metrics

    with scratch("gguf-f32", work) as tmp:
        path = write_gguf(folder, Path(tmp) / "model-f32.gguf", "f32")
        parity = score_files([path], data, cfg.threads, reference, "f32", VocabMap.load(folder))[path.name]
        parity = parity["vs_student"]
        gen = greedy_parity(path, folder, reference, cfg, kv_type="f32")
        check_unquantized(f"the F32 GGUF of {folder}", parity, gen)
    log.warning("the F32 export matches torch: F16 loses precision on this model; prefer outtype = \"f32\"")
    return unquantized_metrics(parity, gen)


def describe(files: list[Path], model_file: Path, data: Artifact, cfg: GGUFConfig, reference,
             vocab=None) -> dict[str, dict]:
    """File name -> size, bits per weight, tensor types, and held-out scores for the files `cfg` asks to score
    (`vocab`: the VocabMap of a trimmed student)."""
    detail = {f.name: gguf_stats(f) for f in files}
    scored = files if cfg.verify or cfg.evaluate == "all" else [model_file] if cfg.evaluate == "model" else []
    scores_of = score_files(scored, data, cfg.threads, reference if cfg.verify else None, vocab=vocab)
    for name, scores in scores_of.items():
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
    check_output_width(cfg.output_type, config["hidden_size"])  # the output rows are hidden_size wide
    # model-<outtype>.gguf at 2 (f16) or 4 (f32) bytes per parameter, then each quantized file at most ~1.1 (Q8_0 is
    # 8.5 bits per weight; an F16 output tensor adds a little)
    per_param = {"f32": 4}.get(cfg.outtype, 2) + 1.1 * len(cfg.quants)
    check_free(out, int((student.metrics.get("params") or 0) * per_param), "the GGUF export")
    with ArtifactWriter(out, "gguf", cfg, inputs) as w:
        base = write_gguf(folder, w.dir / f"model-{cfg.outtype}.gguf", cfg.outtype)
        use_imatrix = cfg.imatrix and any(q != "Q8_0" for q in cfg.quants)  # Q8_0 rounds without it
        reference = TorchLM(folder) if cfg.verify or use_imatrix else None
        vocab = VocabMap.load(folder)  # a trimmed student's ids differ from the data's
        imatrix = importance(reference, data, names, vocab) if use_imatrix else None
        files = [base] + [quantize_gguf(base, w.dir / f"model-{q}.gguf", q, cfg.threads, imatrix,
                                        cfg.output_type)
                          for q in cfg.quants]
        model_file = files[1] if cfg.quants else base
        detail = describe(files, model_file, data, cfg, reference, vocab)
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
