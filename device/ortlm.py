"""OrtLM: greedy decoding of an onnxruntime-genai-built decoder with plain onnxruntime and numpy (runs on a Pi).

onnxruntime-genai has no aarch64 wheels, so the device runs the builder's `model.onnx` directly. The graph is
a GroupQueryAttention decoder: inputs `input_ids` (1, T), `attention_mask` (1, past + T), optionally
`position_ids` (1, T), and per layer `past_key_values.N.key/value` (1, kv_heads, past, head_size); outputs
`logits` (1, T, V) and `present.N.key/value`. The cache is one buffer per tensor bound as both past and present
(GQA writes the new keys in place, as onnxruntime-genai's `past_present_share_buffer` does), so a decode step
copies no cache; the buffers grow by doubling. This file imports only the stdlib, numpy and onnxruntime so it
can be copied beside the agent script.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
_ROLES = ("input_ids", "attention_mask", "position_ids")  # (1, T), (1, past + T), (1, T) integer inputs
_MIN_CACHE = 256  # tokens a fresh cache holds before its first doubling


@dataclass(frozen=True)
class DecoderSpec:
    """What OrtLM needs from `genai_config.json` (model.decoder section)."""

    filename: str
    n_layer: int
    kv_heads: int
    head_size: int
    context_length: int
    eos_ids: tuple[int, ...]
    inputs: dict  # role -> graph name: input_ids, attention_mask, position_ids?, past_key_names (%d) ...
    outputs: dict  # role -> graph name: logits, present_key_names (%d), present_value_names (%d)

    @classmethod
    def load(cls, model_dir: str) -> "DecoderSpec":
        path = os.path.join(model_dir, "genai_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{model_dir} has no genai_config.json; pass a folder the onnx export wrote")
        with open(path, encoding="utf-8") as f:
            model = json.load(f)["model"]
        dec = model["decoder"]
        eos = model.get("eos_token_id", [])
        return cls(filename=dec.get("filename", "model.onnx"), n_layer=dec["num_hidden_layers"],
                   kv_heads=dec["num_key_value_heads"], head_size=dec["head_size"],
                   context_length=model["context_length"], eos_ids=tuple(eos if isinstance(eos, list) else [eos]),
                   inputs=dec["inputs"], outputs=dec["outputs"])

    def cache_names(self) -> list[tuple[str, str]]:
        """(past input, present output) name pairs, keys then values per layer."""
        i, o = self.inputs, self.outputs
        return [(i[f"past_{kv}_names"] % n, o[f"present_{kv}_names"] % n)
                for n in range(self.n_layer) for kv in ("key", "value")]


class KVCache:
    """Per-layer key/value buffers (1, kv_heads, capacity, head_size); the first `n` positions are filled."""

    def __init__(self, spec: DecoderSpec, dtype, capacity: int):
        self.spec, self.dtype, self.n = spec, dtype, 0
        self.buffers = [self._empty(capacity) for _ in spec.cache_names()]

    def _empty(self, capacity: int) -> np.ndarray:
        return np.zeros((1, self.spec.kv_heads, capacity, self.spec.head_size), dtype=self.dtype)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def reserve(self, total: int) -> None:
        """Make room for `total` positions, doubling and copying the filled part."""
        if total <= self.capacity:
            return
        capacity = max(total, min(2 * self.capacity, self.spec.context_length))
        grown = []
        for old in self.buffers:
            new = self._empty(capacity)
            new[:, :, : self.n] = old[:, :, : self.n]
            grown.append(new)
        self.buffers = grown


class OrtLM:
    """A greedy, stateful decoder: `prefill` a prompt, then `decode` one token at a time."""

    def __init__(self, model_dir: str, threads: int = 0):
        self.spec = DecoderSpec.load(model_dir)
        self.session = _session(os.path.join(model_dir, self.spec.filename), threads)
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._kv_dtype = _NP_TYPES[types[self.spec.cache_names()[0][0]]]
        names = {role: self.spec.inputs.get(role, role) for role in _ROLES}
        # role -> (graph name, dtype) for the inputs this graph has (RoPE inside GQA: no position_ids)
        self._io = {role: (n, _NP_TYPES[types[n]]) for role, n in names.items() if n in types}
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1])
        self.cache = self._new_cache(_MIN_CACHE)

    def _new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.spec, self._kv_dtype, min(capacity, self.spec.context_length))

    def reset(self) -> None:
        """Forget the prompt and everything decoded."""
        self.cache = self._new_cache(_MIN_CACHE)

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), V) float32 logits of a full forward from an empty cache; the decoding state is untouched."""
        return self._forward(ids, self._new_cache(len(ids))).astype(np.float32)

    def prefill(self, ids: list[int]) -> int:
        """Run a prompt into a fresh cache and return the greedy next token."""
        self.reset()
        return int(self._forward(ids, self.cache)[-1].argmax())

    def decode(self, token: int) -> int:
        """Append one token to the cache and return the greedy next token."""
        if self.cache.n == 0:
            raise RuntimeError("decode() before prefill(); run the prompt first")
        return int(self._forward([token], self.cache)[-1].argmax())

    def extend(self, ids: list[int], keep: int) -> np.ndarray:
        """(len(ids), V) float32 logits of `ids` run after the first `keep` cached positions, which stay; those
        after them are dropped. Scoring several continuations of one context reuses the context's cache so."""
        if not 0 <= keep <= self.cache.n:
            raise ValueError(f"keep = {keep} must be in 0..{self.cache.n} (the positions in the cache)")
        self.cache.n = keep
        return self._forward(ids, self.cache).astype(np.float32)

    def generate(self, ids: list[int], n: int, stop_at_eos: bool = False) -> list[int]:
        """`n` greedy tokens after the prompt `ids` (fewer if `stop_at_eos` and an eos id comes)."""
        out: list[int] = []
        while len(out) < n and not (stop_at_eos and out and out[-1] in self.spec.eos_ids):
            out.append(self.prefill(ids) if not out else self.decode(out[-1]))
        return out

    def _forward(self, ids: list[int], cache: KVCache) -> np.ndarray:
        """Run `ids` after the cache's `n` positions; returns logits (T, V) and advances the cache."""
        start, total = cache.n, cache.n + len(ids)
        if not ids or total > self.spec.context_length:
            raise ValueError(f"{total} positions (cache {start} + {len(ids)} new) must be in 1.."
                             f"{self.spec.context_length} (context_length); pass fewer ids or reset()")
        cache.reserve(total)
        binding = self.session.io_binding()
        feeds = {"input_ids": [ids], "attention_mask": np.ones((1, total)), "position_ids": [range(start, total)]}
        for role, (name, dtype) in self._io.items():
            binding.bind_cpu_input(name, np.asarray(feeds[role], dtype=dtype))
        binding.bind_output(self.spec.outputs["logits"])
        for (past, present), buf in zip(self.spec.cache_names(), cache.buffers):
            _bind_shared(binding, past, present, buf)
        self.session.run_with_iobinding(binding)
        cache.n = total
        return binding.get_outputs()[0].numpy()[0]


def _bind_shared(binding, past: str, present: str, buf: np.ndarray) -> None:
    """Bind one numpy buffer as both past input and present output: GQA then appends in place."""
    from onnxruntime import OrtValue

    value = OrtValue.ortvalue_from_numpy(buf)  # shares memory with `buf` on CPU
    binding.bind_ortvalue_input(past, value)
    binding.bind_ortvalue_output(present, value)


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime picks (one per physical core)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
