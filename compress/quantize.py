"""Teacher quantization with bitsandbytes (NF4 / INT8): a smaller, cheaper teacher for distillation.

Which model becomes the distillation teacher is `QuantizeConfig.source`. The default is the original teacher,
not the pruned model: distilling a pruned student from an equally pruned teacher cannot give back what pruning
removed, because that teacher has lost the same channels. `source = "pruned"` is there for comparison.

bitsandbytes 0.50 runs both types on CPU too (INT8 casts activations to float16 on the way), but on CPU the
dequantization makes the teacher's forward pass slower than float32: quantization buys memory, not speed, there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from pistill.artifact import Artifact, ArtifactWriter
from pistill.registry import lookup, register

log = logging.getLogger(__name__)

QUANT_TYPES: dict[str, Callable] = {}  # method -> fn(cfg, compute_dtype) -> transformers BitsAndBytesConfig | None
SOURCES = ("teacher", "pruned")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def quant_type(name: str):
    """Register a quantization method under `name` (the `method` of `QuantizeConfig`)."""
    return register(QUANT_TYPES, name)


@quant_type("nf4")
def nf4(cfg: "QuantizeConfig", compute_dtype):
    """4-bit NormalFloat weights in blocks of 64 (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314, Sec. 3)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=cfg.double_quant)


@quant_type("int8")
def int8(cfg: "QuantizeConfig", compute_dtype):
    """LLM.int8(): row-wise int8 weights, outlier features kept in 16 bit (Dettmers et al. 2022, arXiv:2208.07339)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


@quant_type("none")
def no_quant(cfg: "QuantizeConfig", compute_dtype):
    """Keep the teacher unquantized (in the compute dtype)."""
    return None


@dataclass(frozen=True)
class QuantizeConfig:
    """How the distillation teacher is stored."""

    VERSION: ClassVar[int] = 1
    method: str = "nf4"  # nf4 | int8 | none (bitsandbytes)
    double_quant: bool = True  # nf4: quantize the per-block scales too (QLoRA), about 0.4 bit/param less
    source: str = "teacher"  # teacher | pruned: which model becomes the distillation teacher (module docstring)
    compute_dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    bench_blocks: int = 2  # held-out blocks timed for forward_tps

    def __post_init__(self):
        lookup(QUANT_TYPES, self.method, "quantization method")
        if self.source not in SOURCES:
            raise ValueError(f"source '{self.source}' is unknown; use teacher (recommended) or pruned")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype '{self.compute_dtype}' is unknown; use {', '.join(COMPUTE_DTYPES)}")
        if self.bench_blocks < 1:
            raise ValueError(f"bench_blocks = {self.bench_blocks} must be at least 1")


def resolve_dtype(name: str, device: str):
    """The torch dtype for `compute_dtype`: auto is bfloat16 on CUDA and float32 on CPU (bf16 matmuls are slow
    there)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def _quiet_int8_cast_log() -> None:
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every int8 matmul on CPU
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def keep_cpu_layout(model):
    """Keep every NF4 layer in its stored layout and compute dtype on the CPU (returns `model`). On CPUs with
    AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight without double quantization in place, at its first
    no-grad forward in eval mode, into a bf16 layout its serialization does not record: a teacher saved after that
    reloads in another process as noise (perplexity about 10^8 on the default teacher), and a trained base would change
    under its adapters in mid-run."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def load_quantized(folder: Path, cfg: QuantizeConfig, device: str):
    """Load an HF folder quantized on the fly as `cfg.method` says, on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.compute_dtype, device)
    bnb = QUANT_TYPES[cfg.method](cfg, dtype)
    _quiet_int8_cast_log()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, quantization_config=bnb)
    return keep_cpu_layout(model).eval()


def load_teacher(folder: Path, device: str):
    """Load a teacher folder this stage wrote (bitsandbytes-serialized or plain), on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    _quiet_int8_cast_log()
    return keep_cpu_layout(AutoModelForCausalLM.from_pretrained(folder, device_map=device)).eval()


def forward_tps(model, blocks: np.ndarray) -> float:
    """Forward-pass tokens per second of `model` over `blocks` (N, T), one block at a time, after a warm-up pass."""
    import torch

    x = torch.as_tensor(blocks.astype(np.int64), device=model.device)
    with torch.inference_mode():
        model(input_ids=x[:1], use_cache=False)  # allocations and kernel selection happen outside the timing
        t0 = time.perf_counter()
        for row in x:
            model(input_ids=row[None], use_cache=False)
        if x.is_cuda:
            torch.cuda.synchronize()
    return x.numel() / (time.perf_counter() - t0)


def measure(model, data: Artifact, blocks: np.ndarray, vocab=None) -> dict:
    """Quality (pistill.evaluate; `vocab`: the model's VocabMap when trimmed), memory footprint and forward speed of
    an in-memory model."""
    from pistill.evaluate import evaluate_torch

    return {**evaluate_torch(model, data, vocab), "memory_footprint": int(model.get_memory_footprint()),
            "forward_tps": forward_tps(model, blocks)}


def verify_reload(folder: Path, model, block: np.ndarray) -> None:
    """Reload the saved folder and check it computes the same logits as the in-memory model."""
    import torch

    x = torch.as_tensor(block[None].astype(np.int64), device=model.device)
    with torch.inference_mode():
        want = model(input_ids=x).logits.float()
        got = load_teacher(folder, str(model.device.type))(input_ids=x).logits.float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"the saved teacher in {folder} does not reproduce the in-memory logits "
                           f"(max difference {(got - want).abs().max().item():.3g}); bitsandbytes serialization")


def key_inputs(cfg: QuantizeConfig) -> tuple[str, ...]:
    """The inputs this config reads, which its key covers: the pruned model only when it is the source (so the
    default, the original teacher, is not quantized again when only the pruning changed)."""
    return ("teacher", "prune", "data") if cfg.source == "pruned" else ("teacher", "data")


def run(inputs: Mapping[str, Artifact], cfg: QuantizeConfig, out: Path) -> Artifact:
    """Quantize the distillation teacher, measure it against its unquantized source, save it as an HF folder."""
    from pistill.data import load_blocks
    from pistill.models import check_architecture, count_params, read_config, save_model, torch_device, weight_bytes

    from pistill.vocab_map import VocabMap

    data = inputs["data"]
    folder = inputs["teacher" if cfg.source == "teacher" else "prune"].model_path()
    check_architecture(read_config(folder), str(folder))
    device, blocks = torch_device(), load_blocks(data, "heldout")[: cfg.bench_blocks]
    vocab = VocabMap.load(folder)  # a pruned source may have a trimmed vocabulary
    blocks = blocks if vocab is None else vocab.to_student_blocks(blocks)
    read = {n: inputs[n] for n in key_inputs(cfg)}
    with ArtifactWriter(out, "quantize", cfg, read) as w:  # the whole run inside, so wall_s counts it
        base = load_quantized(folder, QuantizeConfig(method="none", compute_dtype=cfg.compute_dtype), device)
        params, src = count_params(base), measure(base, data, blocks, vocab)
        del base
        model = load_quantized(folder, cfg, device)
        metrics = measure(model, data, blocks, vocab)
        log.info("quantize: %s teacher (%s), memory %.1f -> %.1f MB, ppl %.3f -> %.3f", cfg.method, cfg.source,
                 src["memory_footprint"] / 1e6, metrics["memory_footprint"] / 1e6, src["ppl"], metrics["ppl"])
        save_model(model, folder, w.dir)
        verify_reload(w.dir, model, blocks[0])
        w.model = {"format": "hf", "file": "."}
        w.metrics.update(params=params, bytes=weight_bytes(w.dir), **metrics, ppl_delta=metrics["ppl"] - src["ppl"],
                         source_bytes=weight_bytes(folder), **{f"source_{k}": v for k, v in src.items()})
    return w.artifact
