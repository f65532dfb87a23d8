"""Export fidelity figures: every GGUF and ONNX file of a model against the torch model itself.

    python bench/export.py [--model smollm2-135m-instruct | HF_FOLDER] [--out runs/bench-export] [--threads 2]

Runs the teacher, data (no generation), gguf and onnx stages into `--out` (skipping those already there with the
same inputs), then prints a Markdown table per file: size, bits per weight, and against the torch model top-1
agreement, KL(torch || file) and perplexity delta on the held-out blocks, plus tokenizer parity; writes the same
rows with the machine and package versions to `<out>/export.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GGUF_QUANTS = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0")
PLAIN_QUANTS = ("Q4_0", "Q4_K_M")  # also quantized without the importance matrix, to show what it buys


def stages(model: str, out: Path, threads: int) -> dict:
    """The artifacts, each run unless an identical one is already in `out`."""
    from pistill.data import DataConfig
    from pistill.export.gguf import GGUFConfig
    from pistill.export.onnx import ONNXConfig
    from pistill.pipeline import run_stage, stage
    from pistill.teacher import TeacherConfig

    teacher = {"distill": "teacher", "data": "data"}  # the exporters take the teacher as their student
    plan = [("teacher", "teacher", TeacherConfig(source=model), {}),
            ("data", "data", DataConfig(generate=0), {"teacher": "teacher"}),
            ("gguf", "gguf", GGUFConfig(quants=GGUF_QUANTS, threads=threads), teacher),
            ("gguf-plain", "gguf", GGUFConfig(quants=PLAIN_QUANTS, threads=threads, imatrix=False,
                                              keep_unquantized=False), teacher),
            ("onnx", "onnx", ONNXConfig(verify_fp32=False), teacher),
            ("onnx-acc1", "onnx", ONNXConfig(accuracy_level=1, verify_fp32=False), teacher),
            ("onnx-fp32", "onnx", ONNXConfig(precision="fp32"), teacher)]
    arts = {}
    for name, kind, cfg, inputs in plan:  # inputs: {input stage: artifact name in `arts`}
        arts[name], ran = run_stage(stage(kind), {k: arts[v] for k, v in inputs.items()}, cfg, out / name,
                                    force=False)
        print(f"{name}: {'ran' if ran else 'reused'} ({arts[name].manifest['wall_s']:.0f} s)", flush=True)
    return arts


def row(name: str, scores: dict, tokens: dict | None) -> dict:
    vs = scores.get("vs_student", {})
    ok = None if tokens is None else f"{tokens['texts'] - len(tokens['text_mismatches'])}/{tokens['texts']} texts, " \
        f"{tokens['chats'] - len(tokens['chat_mismatches'])}/{tokens['chats']} chats"
    return {"file": name, "bytes": scores["bytes"], "bits_per_weight": scores.get("bits_per_weight"),
            "agreement": vs.get("agreement"), "kl": vs.get("kl"), "ppl_delta": vs.get("ppl_delta"),
            "ppl": vs.get("ppl"), "torch_ppl": vs.get("ref_ppl"), "tokenizer_parity": ok}


def rows(arts: dict) -> list[dict]:
    out = []
    for name in ("gguf", "gguf-plain"):
        tokens = arts[name].metrics.get("tokenizer_parity") or arts["gguf"].metrics.get("tokenizer_parity")
        for file, scores in arts[name].manifest["files_detail"].items():
            label = file if name == "gguf" else file.replace(".gguf", " (no imatrix).gguf")
            if name == "gguf" or not file.endswith("f16.gguf"):
                out.append(row(label, scores, tokens))
    for name, label in (("onnx-fp32", "onnx fp32"), ("onnx", "onnx int4 (block 32, accuracy_level 4)"),
                        ("onnx-acc1", "onnx int4 (block 32, accuracy_level 1)")):
        m = arts[name].metrics
        out.append(row(label, m, m.get("tokenizer_parity")))
    return out


def table(rs: list[dict]) -> str:
    lines = ["| file | MB | bits/weight | top-1 agreement | KL | ppl delta | tokenizer parity |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rs:
        lines.append(f"| {r['file']} | {r['bytes'] / 1e6:.1f} | {r['bits_per_weight']:.2f} | {r['agreement']:.4f} "
                     f"| {r['kl']:.4f} | {r['ppl_delta']:+.2%} | {r['tokenizer_parity']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="teacher source: default, HF folder or .gguf")
    p.add_argument("--out", type=Path, default=Path("runs/bench-export"), help="folder for the artifacts and JSON")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = p.parse_args(argv)
    arts = stages(args.model, args.out, args.threads)
    rs = rows(arts)
    print(table(rs))
    from pistill.artifact import environment, machine_summary

    torch_ppl = arts["gguf"].manifest["files_detail"][next(iter(arts["gguf"].manifest["files_detail"]))]
    result = {"schema_version": 1, "model": args.model, "machine": machine_summary(), "environment": environment(),
              "heldout_tokens": torch_ppl["vs_student"]["n_tokens"], "torch_ppl": torch_ppl["vs_student"]["ref_ppl"],
              "generation_parity": {k: arts[k].metrics.get("generation_parity") for k in ("gguf", "onnx-fp32")},
              "rows": rs}
    (args.out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'export.json'} ({result['machine']})")


if __name__ == "__main__":
    main()
