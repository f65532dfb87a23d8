"""The draft recipe's student as the teacher's speculative draft, before and after its distillation for acceptance.

    python bench/draft.py [--recipe recipes/draft.toml] [--prompts 4] [--gen-tokens 128] [--threads 2]
                          [--out runs/bench-draft]

Builds (or reuses: content-keyed, in the recipe's run folder) the recipe's teacher, data, pruned draft, distilled
draft, their GGUF files (the pruned one in `<run>/gguf-pruned`) and the teacher's GGUF of the same type
(`<run>/baseline`), then runs `bench/speculative.py` twice with the same teacher file and prompts: once with the
pruned draft before any distillation, once with the distilled one. Prints and writes `<out>/draft.md` (and
`<out>/before/`, `<out>/after/` from speculative.py): per draft, its file size against the teacher's, its held-out
perplexity and top-1 agreement with the teacher (the gguf stage's), the acceptance rate, alpha and tokens per
teacher pass at adaptive k, decode tok/s with and without it, and the cost model's draft step and verify steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(recipe_path: Path) -> dict:
    """The recipe's artifacts up to the GGUF files and the teacher's baseline, and the pruned draft's GGUF."""
    from pistill import pipeline, recipe

    rec = recipe.load(recipe_path)
    run = Path(rec.out)
    arts: dict = {}
    for name in ("teacher", "data", "prune", "quantize", "distill", "gguf", "baseline"):
        arts[name] = pipeline.run_stage(pipeline.stage(name), arts, rec.configs[name], run / name, False)[0]
    arts["gguf-pruned"] = pipeline.run_stage(pipeline.stage("gguf"), {"distill": arts["prune"], "data": arts["data"]},
                                             rec.configs["gguf"], run / "gguf-pruned", False)[0]
    return arts


def row(name: str, gguf, result: dict) -> dict:
    spec = result["decoders"][1]
    s, c = spec["speculative"], result["cost"]
    verify = {str(r["k"]): r["verify_over_decode"] for r in c["rows"]}  # str keys: the same in JSON
    nbytes = result["draft"]["bytes"]
    return {"draft": name, "bytes": nbytes, "share": nbytes / result["teacher"]["bytes"],
            "ppl": gguf.metrics.get("ppl"), "agreement": gguf.metrics.get("agreement"),
            "acceptance": s["acceptance_rate"], "alpha": s["alpha"], "tokens_per_step": s["tokens_per_step"],
            "teacher_tps": result["decoders"][0]["decode_tps"], "spec_tps": spec["decode_tps"],
            "speedup": spec["speedup"], "draft_over_decode": c["draft_over_decode"], "verify_over_decode": verify,
            "same_as_plain": spec["same_as_plain"], "prompts": len(result["prompts"])}


def table(rows: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}.", "",
             "| draft | file MB | ÷ teacher file | held-out ppl | top-1 agreement | acceptance | alpha | "
             "tokens/pass | teacher alone tok/s | with draft tok/s | × | draft step ÷ teacher step | "
             "verify(2) ÷ step | "
             "verify(4) ÷ step | same answers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['draft']} | {r['bytes'] / 1e6:.1f} | {r['share']:.2f} | {r['ppl']:.1f} | "
                     f"{r['agreement']:.3f} | {r['acceptance']:.2f} | {r['alpha']:.2f} | {r['tokens_per_step']:.2f} | "
                     f"{r['teacher_tps']:.1f} | {r['spec_tps']:.1f} | {r['speedup']:.2f} | "
                     f"{r['draft_over_decode']:.2f} | {r['verify_over_decode']['2']:.2f} | "
                     f"{r['verify_over_decode']['4']:.2f} | {r['same_as_plain']}/{r['prompts']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    import speculative

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=Path("recipes/draft.toml"))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-draft"))
    args = p.parse_args(argv)
    t0 = time.time()
    arts = build(args.recipe)
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    teacher = arts["baseline"].model_path()
    rows, machine = [], ""
    for name, key in (("pruned, not distilled", "gguf-pruned"), ("distilled (tv loss)", "gguf")):
        out = args.out / ("before" if key == "gguf-pruned" else "after")
        result = speculative.main(["--teacher", str(teacher), "--draft", str(arts[key].model_path()),
                                   "--threads", str(args.threads), "--prompts", str(args.prompts),
                                   "--gen-tokens", str(args.gen_tokens), "--out", str(out)])
        rows.append(row(name, arts[key], result))
        machine = result["machine"]
    text = table(rows, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft.md").write_text(text + "\n")
    (args.out / "draft.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    print(f"wrote {args.out / 'draft.md'} in {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
