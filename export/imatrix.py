"""Importance matrix for llama.cpp quantization: each weight column's mean squared input activation, from torch."""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from pistill.hooks import forward_hooks

log = logging.getLogger(__name__)


def collect(model, blocks: np.ndarray, names: dict[str, str]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> (in_features,) float32 mean of x_j^2 over every calibration token, for each linear
    layer of the decoder blocks (`blk.*`, what llama.cpp's imatrix tool collects by default).

    llama.cpp's quantizers weight the rounding error of column j by it (importance matrix, llama.cpp PR #4861):
    minimising sum_j E[x_j^2] (w_j - q_j)^2 minimises the expected output error for those activations.
    `model` is the HF model in float32, `blocks` (N, T) token ids, `names` HF tensor name -> GGUF name.
    """
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(gguf_name):
        def fn(module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (B * T, in)
            sums[gguf_name] = sums.get(gguf_name, 0) + x.pow(2).sum(0, dtype=torch.float64)
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]
        return fn

    hooks = [(m, hook(names[f"{n}.weight"])) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and names.get(f"{n}.weight", "").startswith("blk.")]
    with forward_hooks(hooks, pre=True), torch.inference_mode():
        for block in blocks:
            model(input_ids=torch.as_tensor(block[None].astype(np.int64), device=model.device))
    return {k: (s / counts[k]).cpu().numpy().astype(np.float32) for k, s in sums.items()}


class LlamaImatrix:
    """An importance matrix in llama.cpp's C form: `llama_model_imatrix_data {name, data, size}` entries ended by a
    NULL name, plus the `quantize.imatrix.*` metadata llama-quantize records. Keep it alive while quantizing."""

    def __init__(self, imatrix: dict[str, np.ndarray], n_chunks: int, dataset: str):
        import llama_cpp

        self.n_chunks = n_chunks
        self.arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]  # owns the memory
        self.names = [k.encode() for k in imatrix]
        self.entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # last one zeroed: the end
        for e, name, arr in zip(self.entries, self.names, self.arrays):
            e.name, e.size = name, arr.size
            e.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.overrides = metadata_overrides({"quantize.imatrix.dataset": dataset,
                                             "quantize.imatrix.entries_count": len(imatrix),
                                             "quantize.imatrix.chunks_count": n_chunks})

    def apply(self, params) -> None:
        """Point `llama_model_quantize_params` at this matrix and its metadata."""
        import llama_cpp

        params.imatrix = ctypes.cast(self.entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(self.overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))


def metadata_overrides(values: dict[str, str | int]):
    """GGUF key -> str / int value as a `llama_model_kv_override` array (an empty key ends it)."""
    import llama_cpp

    out = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for o, (key, value) in zip(out, values.items()):
        o.key = key.encode()
        if isinstance(value, str):
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
        else:
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
    return out
