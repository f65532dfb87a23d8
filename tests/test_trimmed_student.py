"""A student with a trimmed vocabulary through the chain: pruned and trimmed, distilled against the full-vocabulary
teacher (its logits gathered onto the kept tokens), exported to GGUF and ONNX with their parity gates, and scored
in bits per byte on the same held-out text as the teacher."""

import numpy as np
import pytest

from pistill.compress.distill import DistillConfig
from pistill.compress.prune import PruneConfig
from pistill.compress.quantize import QuantizeConfig
from pistill.export.gguf import GGUFConfig
from pistill.export.onnx import ONNXConfig
from pistill.vocab_map import VocabMap


@pytest.fixture(scope="module")
def chain(tiny_teacher, tiny_data, tmp_path_factory):
    from pistill.compress import distill, prune, quantize

    root = tmp_path_factory.mktemp("trimmed")
    arts = {"teacher": tiny_teacher, "data": tiny_data}
    arts["prune"] = prune.run(arts, PruneConfig(ffn_ratio=0.5, n_layer=1, vocab=300, mend="linear"), root / "prune")
    arts["quantize"] = quantize.run(arts, QuantizeConfig(method="none"), root / "quantize")
    arts["distill"] = distill.run(arts, DistillConfig(steps=3, batch_size=2, eval_every=2, eval_blocks=1,
                                                      ckpt_every=0), root / "distill")
    return arts, root


def test_distillation_gathers_the_teacher_onto_the_kept_tokens(chain):
    arts, _ = chain
    m = arts["distill"].metrics
    assert 0 < m["teacher_dropped_mass"] < 1  # 212 of 512 tokens dropped: some mass, not all
    assert np.isfinite(m["loss_first"]) and np.isfinite(m["loss_last"])
    assert m["agreement"] is None and m["kl"] is None and 0 < m["bpb"] < 20
    assert VocabMap.load(arts["distill"].model_path()).size == 300


def test_bits_per_byte_compare_with_the_teacher(chain, tiny_data):
    """The same text for both: the trimmed student's ppl is per teacher token, so ppl and bpb rank alike."""
    arts, _ = chain
    p, d = arts["prune"].metrics, tiny_data.metrics
    ratio = np.log(p["ppl"]) / np.log(d["teacher_ppl"])
    assert p["bpb"] / d["teacher_bpb"] == pytest.approx(ratio, rel=1e-6)


def test_gguf_of_the_trimmed_student_passes_its_parity_gate(chain):
    from pistill.export import gguf

    arts, root = chain
    art = gguf.run({"distill": arts["distill"], "data": arts["data"]}, GGUFConfig(quants=["Q8_0"], gen_tokens=8),
                   root / "gguf")
    m = art.metrics
    assert m["tokenizer_parity"]["ok"] and m["generation_parity"]["ok"]
    assert m["unquantized_decided_agreement"] >= 0.99 and m["agreement"] is None
    assert m["bpb"] == pytest.approx(arts["distill"].metrics["bpb"], rel=0.05)


def test_onnx_of_the_trimmed_student_passes_its_parity_gate(chain):
    from pistill.export import onnx

    arts, root = chain
    art = onnx.run({"distill": arts["distill"], "data": arts["data"]}, ONNXConfig(gen_tokens=8), root / "onnx")
    m = art.metrics
    assert m["tokenizer_parity"]["ok"] and m["generation_parity"]["ok"] and m["agreement"] is None
    assert m["bpb"] == pytest.approx(arts["distill"].metrics["bpb"], rel=0.1)
