"""pistill.compress.qat: the two 4-bit layouts against their reference quantizers, the straight-through estimator,
the module switch, and QAT students whose GGUF and ONNX exports store exactly the weights they were trained for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pistill.compress import qat
from pistill.compress.qat import LAYOUTS, fake_int4, fake_q4_0, ste

torch.set_num_threads(1)


def weights(rows: int = 64, cols: int = 96, seed: int = 0) -> np.ndarray:
    """Heavy-tailed weights with the edge cases: a zero block, a block whose extremes tie (+-0.5), a constant block."""
    w = (np.random.default_rng(seed).standard_t(3, size=(rows, cols)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = np.tile([0.5, -0.5], 16)
    w[2, 32:64] = 0.25
    return w


def q4_0_reference(w: np.ndarray) -> np.ndarray:
    """gguf-py's numpy Q4_0 (llama.cpp's reference quantizer) of the F16 file pistill's exporter writes."""
    import gguf

    f16 = w.astype(np.float16).astype(np.float32)
    kind = gguf.GGMLQuantizationType.Q4_0
    return gguf.quants.dequantize(gguf.quants.quantize(f16, kind), kind)


def int4_reference(w: np.ndarray, block: int = 32) -> np.ndarray:
    """onnxruntime's MatMulNBits quantizer kernel (symmetric, what the onnxruntime-genai builder calls), dequantized.
    `w` is (out, in); MatMul weights are (in, out) with blocks along `in`."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = w.shape
    kb = k // block
    packed = np.zeros((n, kb, block // 2), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zero_points = np.zeros((n, (kb + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T), scales, zero_points, block, n, k, True)
    return dequantize_nbits(packed, scales, k)


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """MatMulNBits int4 blobs (N, k_blocks, block / 2), low nibble first, zero point 8 -> (N, K) float32."""
    q = np.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:2], -1).astype(np.float32)
    return ((q - 8) * scales.reshape(*packed.shape[:2], 1)).reshape(len(packed), -1)[:, :k]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_0_equals_gguf_py_bit_for_bit(seed):
    w = weights(seed=seed)
    assert np.array_equal(fake_q4_0(torch.from_numpy(w)).numpy(), q4_0_reference(w))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_equals_onnxruntime_matmulnbits_bit_for_bit(seed):
    w = weights(seed=seed)
    assert np.array_equal(fake_int4(torch.from_numpy(w)).numpy(), int4_reference(w))


def test_the_layouts_differ_where_their_quantizers_do():
    """Q4_0 rounds through F16 and keeps an F16 scale; MatMulNBits keeps a float32 one; on +-0.5 ties Q4_0 takes
    the first value and MLAS the minimum."""
    w = torch.from_numpy(weights())
    a, b = fake_q4_0(w), fake_int4(w)
    assert not torch.equal(a, b)
    assert a[1, 0] == 0.5 and b[1, 0] == 0.4375  # scale 0.5 / -8 vs -0.5 / -8: +0.5 is code 0 or 15
    assert torch.equal(fake_q4_0(a), a) and torch.equal(fake_int4(b), b)  # on the grid: a fixed point


@pytest.mark.parametrize("fn", [fake_q4_0, fake_int4])
def test_rows_not_a_multiple_of_32_are_left_alone(fn):
    w = torch.randn(4, 40)
    assert fn(w) is w


def test_the_straight_through_gradient_is_the_identity():
    w = torch.from_numpy(weights()).requires_grad_()
    g = torch.randn_like(w)
    out = ste(w, fake_q4_0)
    (out * g).sum().backward()
    assert torch.equal(out.detach(), fake_q4_0(w.detach())) and torch.equal(w.grad, g)


# --- the module switch --------------------------------------------------------------------------------------------

def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("name, n", [("q4_0", 14), ("int4", 16)])  # 2 layers x 7; int4 adds lm_head and the tied
def test_targets_and_switch_keep_parameters_and_state_dict(tiny_model, name, n):  # embedding
    model = load(tiny_model)
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    x = torch.randint(0, 500, (1, 16))
    plain = model(x).logits
    assert qat.enable(model, name) == n and qat.is_enabled(model)
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    fake = model(x).logits
    qat.disable(model, bake=False)
    assert not qat.is_enabled(model) and torch.equal(model(x).logits, plain)
    reference = load(tiny_model)
    with torch.no_grad():
        for m in qat.targets(reference, LAYOUTS[name]):
            m.weight.copy_(LAYOUTS[name].fake_quantize(m.weight))
    torch.testing.assert_close(fake, reference(x).logits)
    qat.enable(model, name)
    qat.disable(model)  # baked: the plain model now computes what the fake-quantized one did
    torch.testing.assert_close(model(x).logits, fake)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_unknown_layout_is_refused(tiny_model):
    with pytest.raises(ValueError, match="use one of none, q4_0, int4"):
        qat.enable(load(tiny_model), "q4_k")


@pytest.mark.parametrize("steps, start, want", [(50, 0.5, 25), (4, 0.0, 0), (3, 0.99, 2), (10, 0.34, 3)])
def test_start_step(steps, start, want):
    assert qat.start_step(steps, start) == want


# --- QAT students through the exporters ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(tiny_teacher, tiny_data, tmp_path_factory):
    from pistill.compress.prune import PruneConfig
    from pistill.compress.prune import run as prune_run

    return prune_run({"teacher": tiny_teacher, "data": tiny_data}, PruneConfig(calib_blocks=2),
                     tmp_path_factory.mktemp("p") / "prune")


def qat_student(layout: str, tiny_teacher, pruned, tiny_data, out):
    from pistill.compress import distill

    cfg = distill.DistillConfig(steps=4, lr=3e-3, warmup_steps=1, eval_every=0, ckpt_every=0, qat=layout,
                                qat_start=0.5)
    return distill.run({"quantize": tiny_teacher, "prune": pruned, "data": tiny_data}, cfg, out)


def decoder_weights(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if k.startswith("model.layers.") and v.ndim == 2}


def test_a_q4_0_qat_student_is_stored_exactly_by_the_gguf_stage(tiny_teacher, pruned, tiny_data, tmp_path):
    """The gguf stage (F16, then Q4_0 with an importance matrix) stores every decoder matrix of a Q4_0-QAT student
    exactly as trained: the weights are on the Q4_0 grid, so the quantizer's scale search finds them again. The
    Q4_0 file then matches the torch student as closely as the unquantized one does."""
    import gguf

    from pistill.export.gguf import GGUFConfig
    from pistill.export.gguf_convert import permute_rope
    from pistill.export.gguf import run as gguf_run

    student = qat_student("q4_0", tiny_teacher, pruned, tiny_data, tmp_path / "distill")
    assert student.metrics["qat"] == "q4_0" and student.metrics["qat_from_step"] == 3
    saved = decoder_weights(student.model_path())
    for w in saved.values():
        assert np.array_equal(fake_q4_0(torch.from_numpy(w)).numpy(), w)  # baked
    art = gguf_run({"distill": student, "data": tiny_data}, GGUFConfig(quants=("Q4_0",), threads=1), tmp_path / "gguf")
    config = json.loads((student.model_path() / "config.json").read_text())
    stored = {t.name: t for t in gguf.GGUFReader(art.path / "model-Q4_0.gguf").tensors}
    for name, w in saved.items():
        layer, proj = name.split(".")[2], name.split(".")[-2]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        t = stored[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, name
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}.get(proj)
        want = permute_rope(w, heads) if heads else w
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape), want), name
    detail = art.manifest["files_detail"]
    assert detail["model-Q4_0.gguf"]["vs_student"]["agreement"] >= 0.99


def test_an_int4_qat_student_is_stored_exactly_by_the_onnx_stage(tiny_teacher, pruned, tiny_data, tmp_path):
    """Every MatMulNBits weight of the ONNX int4 export (q, k, v fused; lm_head, which the tied embedding reads too)
    dequantizes exactly to the int4-QAT student's baked weights."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from pistill.export.onnx import ONNXConfig, export

    student = qat_student("int4", tiny_teacher, pruned, tiny_data, tmp_path / "distill")
    w = load_file(str(student.model_path() / "model.safetensors"))
    folder = export(student.model_path(), tmp_path / "onnx", ONNXConfig(verify=False))
    graph = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    checked = 0
    for node in (n for n in graph.graph.node if n.op_type == "MatMulNBits"):
        k = next(a.i for a in node.attribute if a.name == "K")
        got = dequantize_nbits(inits[node.input[1]], inits[node.input[2]], k)
        parts = node.name.split("/")  # /model/layers.0/attn/qkv_proj/MatMul_Q4, /lm_head/MatMul_Q4
        if parts[1] == "lm_head":
            want = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        else:
            prefix = f"model.{parts[2]}.{'self_attn' if parts[3] == 'attn' else 'mlp'}"
            names = ["q_proj", "k_proj", "v_proj"] if parts[4] == "qkv_proj" else [parts[4]]
            want = np.concatenate([w[f"{prefix}.{n}.weight"] for n in names])
        assert np.array_equal(got, want), node.name
        checked += 1
    assert checked == 2 * 5 + 1  # per layer qkv, o, gate, up, down; and lm_head


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["q4_0", "int4"])
def test_qat_on_cuda_with_bf16_autocast(tiny_model, layout):
    """On CUDA the student trains under bf16 autocast; the fake-quantized weights stay float32 and end on the grid."""
    from pistill.compress.distill import DistillConfig, train

    teacher, student = load(tiny_model).cuda().eval(), load(tiny_model).cuda()
    teacher.model.norm.weight.data *= 20
    data = np.random.default_rng(0).integers(0, 500, (8, 32)).astype(np.int32)
    cfg = DistillConfig(steps=6, lr=3e-3, warmup_steps=1, eval_every=0, ckpt_every=0, qat=layout, qat_start=0.5)
    summary = train(student, teacher, data, data[:2], cfg)
    assert summary["qat_from_step"] == 4 and np.isfinite(summary["loss_last"])
    for m in qat.targets(student, LAYOUTS[layout]):
        assert m.weight.dtype == torch.float32 and torch.equal(LAYOUTS[layout].fake_quantize(m.weight), m.weight)
