"""Quantization-aware distillation: the student's weights fake-quantized in the export's own 4-bit layout.

From `[distill] qat_start` of the steps on, the forward pass sees each target weight W as fq(W), the round trip
through the exporter's 4-bit format, and the backward pass treats fq as the identity (the straight-through
estimator, Bengio et al. 2013, arXiv:1308.3432; Jacob et al. 2018, arXiv:1712.05877, Sec. 3): the latent weights
learn where rounding will put them. At the end the weights are replaced by fq(W) ("baked"), so the saved HF folder
is ordinary and each exporter finds its weights on its own grid and reproduces them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Callable

QK = 32  # weights per scale: llama.cpp's QK4_0, and the ONNX export's MatMulNBits block_size (ONNXConfig default)


# --- the two layouts: pure functions ------------------------------------------------------------------------------

def signed_absmax(x, first: bool):
    """The value of largest magnitude of each row of x (B, QK), with its sign -> (B, 1). When max and min tie in
    magnitude: the one that comes first in the row (`first`, llama.cpp's loop) or the minimum (MLAS)."""
    import torch

    hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    out = torch.where(hi.abs() > lo.abs(), hi, lo)
    tie = ((hi == -lo) & (hi != 0))[:, 0]
    if first and tie.any():  # rare: only those rows are searched
        rows = x[tie]
        hi_first = (rows == hi[tie]).int().argmax(-1) < (rows == lo[tie]).int().argmax(-1)
        out[tie] = torch.where(hi_first[:, None], hi[tie], lo[tie])
    return out


def fake_q4_0(w):
    """W -> dequantize(quantize(W)) as a llama.cpp Q4_0 GGUF written by pistill stores it: (..., in) -> same.

    The GGUF exporter writes F16, then llama.cpp's `quantize_row_q4_0_ref` quantizes each block of QK weights along
    the input dimension: d = (the signed value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)), stored
    with d in F16; `dequantize_row_q4_0` gives (q - 8) d. Float32 arithmetic as there (gguf-py's `quants.Q4_0`
    matches it bit for bit). Rows whose width is not a multiple of QK are returned unchanged (llama.cpp gives such
    tensors another type).
    """
    import torch

    if w.shape[-1] % QK:
        return w
    x = w.detach().to(torch.float16).float().reshape(-1, QK)  # (blocks, QK), as read from the F16 file
    d = signed_absmax(x, first=True) / -8  # (blocks, 1)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = x.mul_(inv).add_(8.5).trunc_().clamp_(max=15)  # in place: x is a fresh copy
    return q.sub_(8).mul_(d.half().float()).reshape(w.shape).to(w.dtype)


def fake_int4(w):
    """W -> dequantize(quantize(W)) as the ONNX int4 export stores it: (..., in) -> same.

    onnxruntime-genai's builder quantizes every MatMul with onnxruntime's `MatMulNBitsQuantizer` (default algorithm,
    symmetric), i.e. MLAS blockwise quantization (`quantize_matmul_4bits`) of the float32 weights in blocks of QK
    along the input dimension: scale = (the block's max if |max| > |min|, else its min) / -8 kept in float32, q =
    clamp(round-half-away(x / scale + 8), 0, 15), dequantized (q - 8) scale. The tests check it against that kernel.
    Rows whose width is not a multiple of QK are returned unchanged.
    """
    import torch

    if w.shape[-1] % QK:
        return w
    x = w.detach().float().reshape(-1, QK).clone()
    d = signed_absmax(x, first=False) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = x.mul_(inv).add_(8.5).trunc_().clamp_(max=15)  # x / d + 8 >= 0: trunc(. + 0.5) rounds half away from zero
    return q.sub_(8).mul_(d).reshape(w.shape).to(w.dtype)


@dataclass(frozen=True)
class Layout:
    """One export's 4-bit format and which of the student's weights it quantizes."""

    fake_quantize: Callable  # (out, in) tensor -> same, the round trip through the format
    output: bool  # the output projection too (and the input embedding when tied to it)


LAYOUTS: dict[str, Layout] = {  # [distill] qat -> layout
    # llama.cpp Q4_0: the decoder's linear weights. The tied token_embd.weight (the output projection too) is not
    # 4-bit: in pistill's Q4_0 export of SmolLM2-135M, gguf_stats gives 210 Q4_0 tensors (7 per layer) and
    # token_embd Q8_0 (llama.cpp gives the output tensor Q6_K, or Q8_0 when its rows are not a multiple of 256).
    "q4_0": Layout(fake_q4_0, output=False),
    # ONNX MatMulNBits int4: every MatMul, lm_head included; a tied embedding is read from the same int4 weights
    # (GatherBlockQuantized), so it is fake-quantized with it.
    "int4": Layout(fake_int4, output=True),
}
QAT_CHOICES = ("none", *LAYOUTS)


def ste(w, fake_quantize: Callable):
    """Straight-through estimator: the value fake_quantize(w), the gradient of w (Bengio et al. 2013)."""
    return w + (fake_quantize(w) - w).detach()


# --- modules ------------------------------------------------------------------------------------------------------

@cache
def fake_quant_class(base: type) -> type:
    """A subclass of nn.Linear or nn.Embedding whose forward reads its weight through `ste`. The module keeps its
    Parameter objects, so the optimizer state, the state_dict keys and the checkpoints are those of the plain model."""
    import torch.nn.functional as F

    def linear(self, x):
        return F.linear(x, ste(self.weight, self.fake_quantize), self.bias)

    def embedding(self, ids):
        return F.embedding(ids, ste(self.weight, self.fake_quantize), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    forward = {"Linear": linear, "Embedding": embedding}[base.__name__]
    return type(f"FakeQuant{base.__name__}", (base,), {"forward": forward, "plain_class": base})


def targets(model, layout: Layout) -> list:
    """The modules whose weights the layout quantizes: every nn.Linear but the output projection, plus (layout.output)
    the output projection and, when its weight is the input embedding's, that embedding."""
    import torch

    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    mods = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not out_emb]
    if layout.output and out_emb is not None:
        mods.append(out_emb)
        if in_emb is not None and in_emb.weight is out_emb.weight:
            mods.append(in_emb)
    return mods


def enable(model, qat: str) -> int:
    """Fake-quantize the model's target weights in layout `qat` from now on; the number of modules."""
    if qat not in LAYOUTS:
        raise ValueError(f"qat '{qat}' is not a layout; use one of {', '.join(QAT_CHOICES)}")
    mods = targets(model, LAYOUTS[qat])
    for m in mods:
        m.__class__ = fake_quant_class(type(m))
        m.fake_quantize = LAYOUTS[qat].fake_quantize
    return len(mods)


def disable(model, bake: bool = True) -> None:
    """Plain modules again; with `bake`, each fake-quantized weight is set to its fake-quantized value (a tied
    weight once), which is what the exporters then store."""
    import torch

    baked = set()
    for m in model.modules():
        plain = getattr(type(m), "plain_class", None)
        if plain is None:
            continue
        if bake and id(m.weight) not in baked:
            with torch.no_grad():
                m.weight.copy_(m.fake_quantize(m.weight))
            baked.add(id(m.weight))
        m.__class__ = plain
        del m.fake_quantize


def is_enabled(model) -> bool:
    return any(hasattr(type(m), "plain_class") for m in model.modules())


def start_step(steps: int, qat_start: float) -> int:
    """The first optimizer step (0-based) that trains with fake-quantized weights."""
    return min(steps - 1, int(qat_start * steps))
