"""Model formats: the one table of what runs each format (runtime, device packages, label, how a device gets it).

Beside the export stage that writes it, a format takes two edits: its `Format` entry below, and, when no existing
runtime runs it, a runtime class registered in device/runtimes.py (the `Runtime` protocol there). Evaluation,
provisioning, the device probe, the agent's files and the bench's jobs read this table. Zero-shot accuracy in a new
runtime also wants a scorer in pistill/mc_eval.py's SCORERS; without one the eval stage reports that model's error.
"""

from __future__ import annotations

from dataclasses import dataclass

from .llama_build import LLAMA_CPP_VERSION
from .registry import lookup


@dataclass(frozen=True)
class Format:
    """A model format as manifests name it (`model["format"]`) and what runs it on a device."""

    name: str  # the manifest's model["format"]
    runtime: str  # the runtime class that runs it, as registered in device/runtimes.py
    label: str  # how notes and reports name it: "GGUF"
    distribution: str  # the runtime's package as importlib.metadata names it (what the device probe reports)
    requirements: tuple[str, ...]  # pip requirements that install the runtime on a device
    job: str  # how the bench ships it (device/fleet.py JOBS): "file" (one file), "folder", "hf" (per hf_on_device)
    agent_files: tuple[str, ...] = ()  # device/ modules the runtime needs beside agent.py and runtimes.py
    version: str | None = None  # the exact release a device must have, where files are written for it


FORMATS = {f.name: f for f in (
    Format("hf", "torch", "HF", "torch", ("torch", "transformers", "numpy"), "hf"),
    # the llama.cpp this machine quantizes with: an older one may not load the files, a newer one may read them
    # differently, so a device runs the same release (cross-built here, or built there)
    Format("gguf", "llama_cpp", "GGUF", "llama_cpp_python", (f"llama-cpp-python=={LLAMA_CPP_VERSION}",), "file",
           ("speculative.py",), version=LLAMA_CPP_VERSION),  # the agent's --draft (speculative decoding)
    Format("onnx", "onnxruntime", "ONNX", "onnxruntime",  # the pin of pyproject.toml
           ("onnxruntime>=1.20,!=1.21.0", "numpy", "tokenizers"), "folder", ("ortlm.py",)),
)}


def get_format(name: str) -> Format:
    """The table entry of a model format; ValueError listing the supported ones."""
    return lookup(FORMATS, name, "model format")


def runtime_for_format(fmt: str) -> str:
    """The runtime that runs a model artifact of this format."""
    return get_format(fmt).runtime
