"""The output projection's GGUF type: what `[gguf] output_type` buys in file size, quality and decode speed.

    python bench/output_type.py [--recipe recipes/default.toml] [--student FOLDER] [--quant Q4_0]
                                [--types ,Q6_K,Q4_0,IQ4_NL] [--heldout-blocks 32] [--speed-rounds 3]
                                [--out runs/bench-output-type]

For the recipe's teacher (and `--student`, an HF folder or a pistill artifact folder holding one), runs the gguf
stage once per output type (`--quant` for every other tensor, the importance matrix as the stage makes it, no
parity check) into `<out>/<model>-<type>/`, reusing any artifact already there. "" is llama.cpp's own choice; a K-quant
type whose 256-weight blocks do not divide the model's width is skipped with a note (llama.cpp would fall back).
Per file it records the file bytes, the output tensor's bytes and type, held-out perplexity, KL and top-1 agreement
against the teacher on `--heldout-blocks` blocks of the recipe's corpus, and decode / prefill tok/s with the bench
agent on this machine (the recipe's [bench] settings), every file in turn `--speed-rounds` times, medians kept.
Prints a Markdown table and writes `<out>/output_type.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

TYPES = ("", "Q6_K", "Q4_0", "IQ4_NL")


def shared(rec, out: Path, heldout_blocks: int) -> dict:
    """The recipe's teacher, and its data without generation (held-out blocks and the teacher's reference logits)."""
    from pistill.pipeline import run_stage, stage

    data = dataclasses.replace(rec.configs["data"], instructions=0, generate=0, heldout_blocks=heldout_blocks)
    arts: dict = {}
    for name, cfg in (("teacher", rec.configs["teacher"]), ("data", data)):
        arts[name], ran = run_stage(stage(name), arts, cfg, out / name, force=False)
        print(f"{name}: {'ran' if ran else 'reused'}", flush=True)
    return arts


def student_artifact(folder: Path, out: Path):
    """`folder` as an HF model artifact: itself when a stage wrote it, else through the teacher stage."""
    from pistill.artifact import Artifact
    from pistill.pipeline import run_stage, stage
    from pistill.teacher import TeacherConfig

    if (folder / "manifest.json").is_file():
        return Artifact.load(folder)
    return run_stage(stage("teacher"), {}, TeacherConfig(source=str(folder)), out / "student", force=False)[0]


def output_tensor(path: Path) -> dict:
    """Name, type and bytes of a GGUF's output projection (the tied embedding when there is no output.weight)."""
    import gguf

    found = {t.name: t for t in gguf.GGUFReader(path).tensors if t.name in ("output.weight", "token_embd.weight")}
    t = found.get("output.weight") or found["token_embd.weight"]
    return {"tensor": t.name, "type": t.tensor_type.name, "bytes": int(t.n_bytes)}


def export(name: str, model, data, quant: str, output_type: str, threads: int, out: Path) -> dict:
    """The gguf stage at `quant` with `output_type` (reused when already there); the row of its figures."""
    from pistill.export.gguf import GGUFConfig
    from pistill.pipeline import run_stage, stage

    cfg = GGUFConfig(quants=(quant,), output_type=output_type, threads=threads, keep_unquantized=False,
                     verify=False)
    folder = out / f"{name}-{quant}-{output_type or 'default'}"
    art, ran = run_stage(stage("gguf"), {"distill": model, "data": data}, cfg, folder, force=False)
    m = art.metrics
    row = {"model": name, "quant": quant, "output_type": output_type or "(llama.cpp)", "path": str(art.path),
           "bytes": m["bytes"], "output": output_tensor(art.model_path()), "ppl": m.get("ppl"), "kl": m.get("kl"),
           "agreement": m.get("agreement"), "gguf_s": art.manifest.get("wall_s")}
    print(f"  {name} {row['output_type']}: {'ran' if ran else 'reused'}, {row['bytes'] / 1e6:.1f} MB, "
          f"output {row['output']['type']}, ppl {row['ppl']:.3f}", flush=True)
    return row


def speeds(rows: list[dict], bench_cfg, rounds: int) -> None:
    """Decode and prefill tok/s of every row's file with the bench agent, the files taken in turn `rounds` times
    (a slow spell of the machine falls on every file alike), medians kept."""
    from pistill.artifact import Artifact
    from pistill.device.local import bench_model

    runs: list[list[dict]] = [[] for _ in rows]
    for i in range(rounds):
        for r, got in zip(rows, runs):
            res = bench_model(Artifact.load(r["path"]), bench_cfg)
            if "error" in res:
                raise SystemExit(f"bench failed for {r['model']} {r['output_type']}: {res['error']}")
            got.append(res)
            print(f"  speed round {i + 1}: {r['model']} {r['output_type']} {res['decode_tps']:.1f} tok/s", flush=True)
    for r, got in zip(rows, runs):
        r["decode_tps"] = statistics.median(x["decode_tps"] for x in got)
        r["prefill_tps"] = statistics.median(x["prefill_tps"] for x in got)
        r["decode_tps_runs"] = [round(x["decode_tps"], 1) for x in got]
        r["busy"] = [b for x in got if (b := (x.get("load") or {}).get("busy"))]


def table(rows: list[dict], notes: list[str]) -> str:
    lines = ["| model | type | output_type | output tensor | file MB | output MB | held-out ppl | KL | top-1 agreement "
             "| decode tok/s | prefill tok/s |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        o = r["output"]
        lines.append(f"| {r['model']} | {r['quant']} | {r['output_type']} | {o['type']} | {r['bytes'] / 1e6:.2f} | "
                     f"{o['bytes'] / 1e6:.2f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['agreement']:.4f} | "
                     f"{r['decode_tps']:.1f} | {r['prefill_tps']:.1f} |")
    return "\n".join(lines + [f"\n{n}" for n in notes])


def main(argv: list[str] | None = None) -> dict:
    from pistill import recipe
    from pistill.artifact import machine_summary
    from pistill.export.gguf_quantize import OUTPUT_TYPES, block_size
    from pistill.models import read_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/default.toml")
    p.add_argument("--student", type=Path, help="also a student: an HF folder or a pistill artifact folder")
    p.add_argument("--quant", default="Q4_0", help="llama.cpp type of every other tensor")
    p.add_argument("--types", default=",".join(TYPES), help=f"output types, comma-separated; '' = llama.cpp's "
                                                            f"choice; of {', '.join(OUTPUT_TYPES)}")
    p.add_argument("--heldout-blocks", type=int, default=32, help="held-out blocks scored (of the recipe's size)")
    p.add_argument("--speed-rounds", type=int, default=3, help="times every file is benchmarked, in turn")
    p.add_argument("--out", type=Path, default=Path("runs/bench-output-type"))
    args = p.parse_args(argv)
    rec = recipe.load(args.recipe)
    arts = shared(rec, args.out, args.heldout_blocks)
    models = {"teacher": arts["teacher"]}
    if args.student:
        models["student"] = student_artifact(args.student, args.out)
    rows, notes = [], []
    for name, model in models.items():
        width = read_config(model.model_path())["hidden_size"]
        for output_type in args.types.split(","):
            if output_type and width % block_size(output_type):
                notes.append(f"{name}: output_type {output_type} skipped: its blocks of {block_size(output_type)} "
                             f"do not divide the {width}-wide rows (llama.cpp would fall back to another type)")
                print(notes[-1], flush=True)
                continue
            rows.append(export(name, model, arts["data"], args.quant, output_type, rec.configs["gguf"].threads,
                               args.out))
    speeds(rows, rec.configs["bench"], args.speed_rounds)
    notes += [f"{r['model']} {r['output_type']}: decode runs {r['decode_tps_runs']} tok/s; busy: {'; '.join(r['busy'])}"
              for r in rows if r["busy"]]
    bench = rec.configs["bench"]
    notes.append(f"{machine_summary()}; decode {bench.gen_tokens} tokens after a {bench.prompt_tokens[0]}-token "
                 f"prompt at {bench.threads} threads, median of {args.speed_rounds} interleaved rounds; held-out "
                 f"{args.heldout_blocks} blocks of {rec.configs['data'].block_size} tokens")
    result = {"schema_version": 1, "recipe": args.recipe, "machine": machine_summary(), "quant": args.quant,
              "rows": rows, "notes": notes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "output_type.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows, notes))
    return result


if __name__ == "__main__":
    main()
