"""Tiny random-initialised llama models with a real byte-level BPE tokenizer, for fast tests (no download)."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text(limit: int = 400) -> list[str]:
    """Docstrings from the standard library: real English and code, present on every machine."""
    stdlib = Path(sys.modules["os"].__file__).parent
    docs = []
    for path in sorted(stdlib.glob("*.py"))[:limit]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs += [d for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                 and (d := ast.get_docstring(node))]
    return docs


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(out: Path, vocab_size: int = 512, hidden: int = 64, ffn_dim: int = 128, n_layer: int = 2,
               n_head: int = 4, kv_heads: int = 2, tie: bool = True, seed: int = 0) -> Path:
    """Save a random llama with a trained tokenizer as a standard HF folder and return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn_dim,
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


@dataclass(frozen=True)
class FakeConfig:
    """A config for artifacts that tests build by hand (no stage wrote them)."""

    note: str = "test"


def model_artifact(root: Path, stage: str, fmt: str, fill):
    """An artifact of `stage` whose model (format `fmt`) is whatever `fill(dir)` writes; returns the Artifact."""
    from pistill.artifact import ArtifactWriter

    with ArtifactWriter(root / stage, stage, FakeConfig(), []) as w:
        w.model = {"format": fmt, "file": fill(w.dir)}
    return w.artifact


def gguf_baseline(root: Path, model: Path, files: dict[str, tuple[str, str]], outtype: str = "f32"):
    """A baseline artifact holding one GGUF of `model` per entry of `files` ({model key: (file name, quant label)},
    the first entry its main model), as the baseline stage lays them out; returns the Artifact."""
    from pistill.artifact import ArtifactWriter
    from pistill.export.gguf_convert import write_gguf

    with ArtifactWriter(root / "baseline", "baseline", FakeConfig(), []) as w:
        for name, _ in files.values():
            write_gguf(model, w.dir / name, outtype)
        w.models = [{"key": key, "format": "gguf", "file": name, "quant": quant}
                    for key, (name, quant) in files.items()]
        w.model = {"format": "gguf", "file": w.models[0]["file"]}
    return w.artifact


def first_layers(model: Path, out: Path, n_layer: int = 1) -> Path:
    """`model`'s first `n_layer` layers with its tokenizer, as an HF folder: a pruned student that agrees with it on
    some tokens (a draft for speculative decoding)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    pruned = LlamaForCausalLM.from_pretrained(model)
    pruned.model.layers, pruned.config.num_hidden_layers = pruned.model.layers[:n_layer], n_layer
    pruned.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return Path(out)


@dataclass(frozen=True)
class GGUFTypeConfig:
    """The gguf stage's config fields that name its file's type (`export.gguf.gguf_quant`: no quants, the outtype)."""

    outtype: str = "f32"
    quants: tuple[str, ...] = ()


def gguf_student(root: Path, model: Path, outtype: str = "f32"):
    """A gguf artifact holding `model` as one GGUF file of `outtype`, typed as the gguf stage types it (F32 for f32);
    returns the Artifact."""
    from pistill.artifact import ArtifactWriter
    from pistill.export.gguf_convert import write_gguf

    with ArtifactWriter(root / "gguf", "gguf", GGUFTypeConfig(outtype), []) as w:
        w.model = {"format": "gguf", "file": write_gguf(model, w.dir / f"model-{outtype}.gguf", outtype).name}
    return w.artifact


def named(artifacts) -> dict:
    """Artifacts of distinct stages as a stage's inputs: {stage: artifact}, in the order given."""
    return {a.stage: a for a in artifacts}
