"""Inference runtimes behind one small interface (`Runtime`), importable on a Pi with only numpy and the runtime.

Each runtime is greedy and stateful: `prefill(ids)` runs a prompt into a fresh cache and returns the next token,
`decode(token)` appends one token and returns the next. `logits(ids)` is a full forward from an empty cache,
used for quality checks. This file must work both as `pistill.device.runtimes` and as a standalone script file
copied beside `agent.py`, so it imports nothing from pistill. pistill/formats.py names the runtime of each format.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np


class Runtime(Protocol):
    """What every runtime implements, and all that agent.py, pistill.evaluate and export verification call
    (pistill.mc_eval's scorers also reach into their own runtime's model)."""

    name: str  # the registry key, set by `register`
    version: str  # the runtime package's version, for the agent's JSON

    def __init__(self, model_path: str, threads: int = 0, max_ctx: int = 2048) -> None:
        """Load a model file or folder; `threads` 0 is the runtime's default, `max_ctx` the longest sequence run."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS or other special token added."""

    def logits(self, ids: list[int]) -> np.ndarray:
        """(T, V) float32 logits of a full forward of `ids` from an empty cache."""

    def prefill(self, ids: list[int]) -> int:
        """Run a prompt into a fresh cache; the greedy next token."""

    def decode(self, token: int) -> int:
        """Append one token to the cache; the greedy next token."""

    def close(self) -> None:
        """Free the model (the object is not used again)."""


RUNTIMES: dict[str, type[Runtime]] = {}


def register(name: str):
    # pistill.registry's register/lookup, kept as a copy here: this file runs on a Pi without pistill
    def deco(cls):
        RUNTIMES[name] = cls
        cls.name = name
        return cls
    return deco


def get_runtime(name: str) -> type[Runtime]:
    if name not in RUNTIMES:
        raise ValueError(f"runtime '{name}' is not supported; supported: {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[name]


@register("torch")
class TorchRuntime:
    """A Hugging Face folder through transformers (bitsandbytes-quantized folders included)."""

    def __init__(self, model_path: str, threads: int = 0, max_ctx: int = 2048, dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:  # the checkpoint's dtype on CUDA; float32 on the CPU, where bf16 matmuls are slow
            dtype = "auto" if self.device == "cuda" else "float32"
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=self.device)
        self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.version = torch.__version__
        self.past = None

    def tokenize(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _forward(self, ids: list[int], past):
        t = self.torch.tensor([ids], device=self.device)
        with self.torch.inference_mode():
            out = self.model(input_ids=t, past_key_values=past, use_cache=True)
        return out.logits[0], out.past_key_values

    def logits(self, ids: list[int]) -> np.ndarray:
        logits, _ = self._forward(ids, None)
        return logits.float().cpu().numpy()

    def prefill(self, ids: list[int]) -> int:
        logits, self.past = self._forward(ids, None)
        return int(logits[-1].argmax())

    def decode(self, token: int) -> int:
        logits, self.past = self._forward([token], self.past)
        return int(logits[-1].argmax())

    def close(self) -> None:
        self.model = self.past = None


@register("llama_cpp")
class LlamaCppRuntime:
    """A GGUF file through llama.cpp (llama-cpp-python)."""

    def __init__(self, model_path: str, threads: int = 0, max_ctx: int = 2048, kv_type: str = "f16"):
        """`kv_type`: the KV cache's element type, "f16" (llama.cpp's default) or "f32" (an F32 file then
        computes in F32 throughout, as export verification needs)."""
        import llama_cpp

        _check_llama_build()
        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type '{kv_type}' is not supported; use f16 or f32")
        # llama.cpp's own default (F16) passes no argument, so an older llama-cpp-python on a device works too
        kv = {} if kv_type == "f16" else {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        n = threads or os.cpu_count()  # batches too (prefill): llama-cpp-python's default for them is every core
        self.llm = llama_cpp.Llama(model_path=model_path, n_ctx=max_ctx, n_threads=n, n_threads_batch=n,
                                   n_batch=512, logits_all=True, verbose=False, **kv)
        self.version = llama_cpp.__version__

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def _last_argmax(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_argmax()

    def decode(self, token: int) -> int:
        self.llm.eval([token])
        return self._last_argmax()

    def close(self) -> None:
        self.llm.close()


def _check_llama_build() -> None:
    """Under pistill, stop with one line if this llama.cpp build crashes on Q4_0 (probed in a child process once per
    build); standalone on a device the agent's caller reports a crash by its signal instead."""
    try:
        from pistill.llama_build import ensure_works
    except ImportError:
        return
    ensure_works()


@register("onnxruntime")
class OnnxRuntime:
    """An onnxruntime-genai-built ONNX folder through plain onnxruntime and numpy (`ortlm.OrtLM`)."""

    def __init__(self, model_path: str, threads: int = 0, max_ctx: int = 2048):
        try:
            from . import ortlm
        except ImportError:  # standalone on the device
            import ortlm
        import onnxruntime

        self.lm = ortlm.OrtLM(model_path, threads=threads)
        self.version = onnxruntime.__version__
        self._tok = None
        self.model_path = model_path

    def tokenize(self, text: str) -> list[int]:
        if self._tok is None:  # the `tokenizers` package, when present (tokenizer.json ships in the folder)
            from tokenizers import Tokenizer
            self._tok = Tokenizer.from_file(os.path.join(self.model_path, "tokenizer.json"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.lm.logits(ids)

    def prefill(self, ids: list[int]) -> int:
        return self.lm.prefill(ids)

    def decode(self, token: int) -> int:
        return self.lm.decode(token)

    def close(self) -> None:
        self.lm = None
