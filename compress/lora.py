"""QLoRA healing: low-rank adapters trained on a frozen (4-bit NF4) student, then merged into an ordinary HF model.

`[distill] method = "lora"` trains, instead of every weight, a pair (A, B) of rank r beside each linear weight W of
the decoder layers: the layer computes x W^T + (alpha / r) x A^T B^T, with B = 0 at the start (Hu et al. 2021,
"LoRA", arXiv:2106.09685, Eq. 3). With `lora_base = "nf4"` the frozen W is stored as bitsandbytes NF4 with double
quantization, so the base costs about 4.1 bits a weight in memory (Dettmers et al. 2023, "QLoRA",
arXiv:2305.14314, Sec. 3); with "none" it stays float32 (plain LoRA). Training is `distill.train`'s: the same loss,
data order, schedule and checkpoints, which hold the adapters alone (`checkpoints.trainable_state`).

The merge writes dequantize(NF4(W)) + (alpha / r) B A into a float32 copy of the student: the adapters were trained
against the dequantized base, not against W, so adding them to W would give a model no step ever evaluated.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .quantize import keep_cpu_layout

log = logging.getLogger(__name__)

LORA_BASES = ("nf4", "none")  # [distill] lora_base: the frozen base's storage


def target_names(model) -> list[str]:
    """The leaf names of every nn.Linear in the decoder layers (q, k, v, o, gate, up, down projections on a llama):
    the modules that get adapters. Not lm_head nor the embeddings, which stay frozen."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.model.layers.named_modules()
                   if isinstance(m, torch.nn.Linear)})


def lora_config(cfg, targets: list[str]):
    """peft's LoraConfig for a DistillConfig `cfg`."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def load_base(s_dir: Path, lora_base: str, device: str):
    """The student in `s_dir` as the frozen base: NF4 with double quantization and float32 compute, or float32."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = None if lora_base == "none" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32, device_map=device,
                                                 quantization_config=bnb)
    return keep_cpu_layout(model)  # the base must not change under the adapters in mid-run


def load_adapted(s_dir: Path, cfg, device: str):
    """The student in `s_dir` as a peft model: a frozen base (`cfg.lora_base`) with fresh adapters of rank
    `cfg.lora_rank` on every decoder linear layer; only the adapters require gradients. A is initialised from
    torch's RNG seeded with `cfg.seed`, so every run (and a resumed one) starts from the same adapters."""
    import torch
    from peft import get_peft_model

    base = load_base(s_dir, cfg.lora_base, device)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, lora_config(cfg, target_names(base)))
    log.info("distill: LoRA rank %d on %s (%s base), %d trainable parameters", cfg.lora_rank,
             ", ".join(target_names(base)), cfg.lora_base, trainable_params(model))
    return model


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_summary(model, cfg) -> dict:
    """What the distill artifact records of a LoRA run: rank, trainable parameters and the adapters' bytes."""
    return {"lora_rank": cfg.lora_rank, "trainable_params": trainable_params(model),
            "adapter_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)}


def base_weight(layer):
    """The weight a peft LoRA layer's frozen base computes with, as float32: dequantize(NF4(W)) for a 4-bit base
    (its own stored blocks and scales, so the merge is exact whichever device quantized it), W otherwise."""
    w = layer.get_base_layer().weight
    if getattr(w, "quant_state", None) is None:
        return w.detach().float()
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(w.data, w.quant_state).float()


def merge(adapted, s_dir: Path, cfg):
    """An ordinary float32 HF model computing what the trained `adapted` (peft) model does: the student in `s_dir`
    reloaded, each adapted weight replaced by its base's value (`base_weight`), the adapters merged in
    (W' = base + (alpha / r) B A, peft's `merge_and_unload`); no peft modules or keys are left."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    device = next(adapted.parameters()).device
    plain = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32, device_map=str(device))
    targets = target_names(plain)
    with torch.no_grad():
        for name, layer in adapted.base_model.model.named_modules():
            if isinstance(layer, LoraLayer):
                plain.get_submodule(name).weight.copy_(base_weight(layer))
    merged = get_peft_model(plain, lora_config(cfg, targets))
    loaded = set_peft_model_state_dict(merged, get_peft_model_state_dict(adapted))
    if loaded.unexpected_keys:  # the two models' adapters must correspond one to one
        raise RuntimeError(f"LoRA merge: adapters {loaded.unexpected_keys[:3]} have no layer in the reloaded student")
    return merged.merge_and_unload().eval()
