"""The teacher stage: the model to compress, materialized once as a standard HF folder artifact."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .artifact import Artifact, ArtifactWriter
from .models import (DEFAULT_TEACHER, check_architecture, check_source, count_params, load_model, materialize,
                     read_config, save_model, weight_bytes)
from .rundir import check_free


@dataclass(frozen=True)
class TeacherConfig:
    """The model to compress."""

    VERSION: ClassVar[int] = 1
    source: str = DEFAULT_TEACHER  # HF id, local HF folder, .gguf file, or the offline default
    dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of the saved teacher folder

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype '{self.dtype}' is not supported; use float32, bfloat16 or float16")

    def validate_paths(self) -> None:
        """Fail fast (no weights loaded) when the source cannot be found, or is an empty, truncated or non-GGUF
        .gguf file."""
        check_source(self.source)


def run(inputs: Mapping[str, Artifact], cfg: TeacherConfig, out: Path) -> Artifact:
    """Materialize the teacher as a standard HF folder artifact (`inputs` is empty: the teacher reads none)."""
    with ArtifactWriter(out, "teacher", cfg, inputs) as w:
        folder = materialize(cfg.source)
        check_architecture(read_config(folder), str(folder))
        model = load_model(folder, cfg.dtype)
        # safetensors: the parameters at the saved dtype's width (a tied embedding counted once), tokenizer aside
        check_free(out, count_params(model) * model.dtype.itemsize, "the teacher folder")
        save_model(model, folder, w.dir)
        w.model = {"format": "hf", "file": "."}
        w.metrics.update(params=count_params(model), bytes=weight_bytes(w.dir),
                         model_type=model.config.model_type, n_layer=model.config.num_hidden_layers,
                         hidden=model.config.hidden_size, ffn_dim=model.config.intermediate_size)
        w.extra["source"] = cfg.source
    return w.artifact
