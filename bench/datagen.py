"""Teacher data generation throughput: llama.cpp, many sequences at once (the data stage's default), against
transformers' `generate`, on the same prompts and machine.

    python bench/datagen.py [--teacher smollm2-135m-instruct] [--prompts 32] [--gen-tokens 64] [--threads 2]
                            [--parallel 1,16] [--gguf-types Q8_0,f16] [--hf-batch 8] [--out runs/bench-datagen]

Every generator answers the same chat prompts (the first `--prompts` of pistill's seed tasks) with the data stage's
sampling (temperature 0.7, top-p 0.9, at most `--gen-tokens` new tokens, stopping at the end of the turn) on
`--threads` threads. Prints a Markdown table: generator, teacher file, sequences decoded at once, setup seconds
(the GGUF conversion and load, or the torch load), prompt and generated tokens, seconds, generated tokens/s; and
for each teacher GGUF its fidelity to the torch teacher on the data artifact's held-out blocks (top-1 agreement,
KL, perplexity). Writes the rows, the machine and the package versions to `<out>/datagen.json`. The teacher and a
data artifact without generation are built in `--out` (reused when already there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def stages(teacher: str, out: Path) -> dict:
    """The teacher and a small data artifact (no generation) for the fidelity figures, reused when present."""
    from pistill.data import DataConfig
    from pistill.pipeline import run_stage, stage
    from pistill.teacher import TeacherConfig

    arts = {}
    for name, cfg in (("teacher", TeacherConfig(source=teacher)), ("data", DataConfig(generate=0, train_blocks=8))):
        t0 = time.perf_counter()
        arts[name], ran = run_stage(stage(name), arts, cfg, out / name, force=False)
        print(f"{name}: {'ran' if ran else 'reused'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return arts


def measure(gen, tok, prompts: list[str], max_new: int) -> dict:
    """Answer `prompts` once; the generator's figures for that call."""
    from pistill.generate import Sampling, answer

    keys = ("sequences", "prompt_tokens", "new_tokens", "seconds")
    before = [getattr(gen.stats, k) for k in keys]
    answers = answer(gen, tok, prompts, Sampling(max_new=max_new, temperature=0.7, top_p=0.9, seed=0))
    figures = {k: getattr(gen.stats, k) - b for k, b in zip(keys, before)}
    return figures | {"tokens_per_s": figures["new_tokens"] / figures["seconds"], "setup_s": gen.setup_s,
                      "empty_answers": sum(not a for a in answers)}


def llama_rows(folder: Path, tok, prompts: list[str], args, data) -> list[dict]:
    """One row per (GGUF type, parallel), with the file's fidelity to the torch teacher."""
    import tempfile

    from pistill.evaluate import evaluate_path
    from pistill.generate import LlamaCppGenerator, teacher_gguf

    rows = []
    for gguf_type in args.gguf_types:
        with tempfile.TemporaryDirectory(prefix="pistill-datagen-") as tmp:
            t0 = time.perf_counter()
            path = teacher_gguf(folder, Path(tmp), gguf_type, args.threads)
            convert_s = time.perf_counter() - t0
            fidelity = evaluate_path(path, "gguf", data, args.threads)
            for parallel in args.parallel:
                gen = LlamaCppGenerator(folder, parallel, args.threads, gguf=path)
                try:
                    row = measure(gen, tok, prompts, args.gen_tokens)
                finally:
                    gen.close()
                rows.append({"generator": "llama_cpp", "model": f"teacher {gguf_type} GGUF", "parallel": parallel,
                             **row, "setup_s": convert_s + row["setup_s"],
                             "fidelity": {k: fidelity[k] for k in ("agreement", "kl", "ppl")}})
                print(f"llama_cpp {gguf_type} x{parallel}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    return rows


def transformers_row(folder: Path, tok, prompts: list[str], args) -> dict:
    from pistill.generate import TransformersGenerator

    gen = TransformersGenerator(folder, args.hf_batch, args.threads)
    row = {"generator": "transformers", "model": "teacher (torch float32)", "parallel": args.hf_batch,
           **measure(gen, tok, prompts, args.gen_tokens), "fidelity": None}
    print(f"transformers x{args.hf_batch}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| generator | model | at once | setup s | prompt tokens | generated tokens | s | tokens/s | "
             "agreement | KL | ppl |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r["fidelity"] or {}
        fid = f"{f['agreement']:.4f} | {f['kl']:.4f} | {f['ppl']:.2f}" if f else "(reference) | | "
        lines.append(f"| {r['generator']} | {r['model']} | {r['parallel']} | {r['setup_s']:.1f} | "
                     f"{r['prompt_tokens']} | {r['new_tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {fid} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="teacher source: default, HF folder, .gguf")
    p.add_argument("--prompts", type=int, default=32, help="seed tasks answered by every generator")
    p.add_argument("--gen-tokens", type=int, default=64, help="max new tokens per answer")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp and torch CPU threads")
    p.add_argument("--parallel", default="1,16", help="llama.cpp sequences at once, comma-separated")
    p.add_argument("--gguf-types", default="Q8_0,f16", help="teacher GGUF types, comma-separated (Q8_0, f16)")
    p.add_argument("--hf-batch", type=int, default=8, help="transformers batch size")
    p.add_argument("--skip-transformers", action="store_true", help="time llama.cpp only")
    p.add_argument("--out", type=Path, default=Path("runs/bench-datagen"), help="folder for the artifacts and JSON")
    args = p.parse_args(argv)
    args.parallel = [int(x) for x in args.parallel.split(",")]
    args.gguf_types = args.gguf_types.split(",")
    return args


def main(argv: list[str] | None = None) -> dict:
    from pistill.artifact import environment, machine_summary
    from pistill.data import DataConfig, read_prompts
    from pistill.models import load_tokenizer

    args = parse_args(argv)
    arts = stages(args.teacher, args.out)
    folder = arts["teacher"].model_path()
    tok, prompts = load_tokenizer(folder), read_prompts(DataConfig())[: args.prompts]
    rows = llama_rows(folder, tok, prompts, args, arts["data"])
    if not args.skip_transformers:
        rows.append(transformers_row(folder, tok, prompts, args))
    print(table(rows))
    result = {"schema_version": 1, "teacher": args.teacher, "machine": machine_summary(), "threads": args.threads,
              "prompts": len(prompts), "gen_tokens": args.gen_tokens, "environment": environment(), "rows": rows}
    (args.out / "datagen.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'datagen.json'} ({result['machine']})")
    return result


if __name__ == "__main__":
    main()
