"""Pruning quality: every structured axis and importance method at matched parameter counts, plus sparsity.

    python bench/prune.py [--model smollm2-135m-instruct | HF_FOLDER] [--out runs/bench-prune]
                          [--calib-blocks 8] [--heldout-blocks 6] [--block-size 256]
                          [--settings "depth -9,depth -9 mend"] [--methods activation]

Runs the teacher and data (no generation) stages into `--out` (reused when already there), then for each pruning
setting and importance method (activation, magnitude, random) prunes a fresh copy of the teacher and scores it on
the held-out blocks: perplexity, top-1 agreement and KL against the teacher. Within a setting every method gives
the same shape, hence the same parameter count. Prints a Markdown table; writes the rows, the machine and package
versions to `<out>/prune.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

SETTINGS = {  # name -> PruneConfig fields (beyond method / calib_blocks); 576 hidden, 1536 ffn, 30 layers, 9/3 heads
    "mlp -25%": {"ffn_ratio": 0.75},
    "mlp -50%": {"ffn_ratio": 0.5},
    "depth -2": {"ffn_ratio": 1.0, "n_layer": -2},
    "depth -6": {"ffn_ratio": 1.0, "n_layer": -6},
    "depth -9": {"ffn_ratio": 1.0, "n_layer": -9},  # Block Influence, one layer at a time
    "depth -9 angular": {"ffn_ratio": 1.0, "n_layer": -9, "layer_metric": "angular"},  # one contiguous block
    "depth -9 mend": {"ffn_ratio": 1.0, "n_layer": -9, "mend": "linear"},  # ReplaceMe on the influence choice
    "depth -9 angular mend": {"ffn_ratio": 1.0, "n_layer": -9, "layer_metric": "angular", "mend": "linear"},
    "heads 9/3 -> 6/3": {"ffn_ratio": 1.0, "n_heads": 6},
    "hidden 576 -> 448": {"ffn_ratio": 1.0, "hidden": 448},
}
METHODS = ("activation", "magnitude", "random")
SPARSE = {  # unstructured, for comparison: same file size and Pi speed as the teacher
    "wanda 50%": {"ffn_ratio": 1.0, "sparsity": 0.5, "sparsity_method": "wanda"},
    "magnitude 50%": {"ffn_ratio": 1.0, "sparsity": 0.5, "sparsity_method": "magnitude"},
    "wanda 2:4": {"ffn_ratio": 1.0, "nm": "2:4", "sparsity_method": "wanda"},
    "magnitude 2:4": {"ffn_ratio": 1.0, "nm": "2:4", "sparsity_method": "magnitude"},
}


def artifacts(model: str, out: Path, args) -> tuple:
    from pistill.data import DataConfig
    from pistill.pipeline import run_stage, stage
    from pistill.teacher import TeacherConfig

    teacher, _ = run_stage(stage("teacher"), {}, TeacherConfig(source=model), out / "teacher", force=False)
    cfg = DataConfig(generate=0, block_size=args.block_size, calib_blocks=args.calib_blocks, train_blocks=1,
                     heldout_blocks=args.heldout_blocks, topk=16)
    data, _ = run_stage(stage("data"), {"teacher": teacher}, cfg, out / "data", force=False)
    return teacher, data


def measure(teacher, data, fields: dict, n_layer: int) -> dict:
    """Prune a fresh teacher with `fields` and score it on the held-out blocks."""
    from pistill.compress.prune import PruneConfig, prune
    from pistill.compress.sparsity import zero_fraction
    from pistill.data import load_blocks
    from pistill.evaluate import evaluate_torch
    from pistill.models import count_params, load_model

    if fields.get("n_layer", 0) < 0:
        fields = {**fields, "n_layer": n_layer + fields["n_layer"]}
    cfg = PruneConfig(**fields)
    model = load_model(teacher.model_path())
    t0, notes = time.perf_counter(), {}
    shape = prune(model, load_blocks(data, "calib"), cfg, notes)
    prune_s = time.perf_counter() - t0
    scores = evaluate_torch(model, data)
    return {"params": count_params(model), "shape": shape.__dict__, "sparsity": zero_fraction(model),
            "prune_s": round(prune_s, 1), **notes, **{k: scores[k] for k in ("ppl", "bpb", "agreement", "kl")
                                                       if k in scores}}


def table(rows: list[dict], teacher_ppl: float, teacher_params: int) -> str:
    lines = [f"teacher: {teacher_params / 1e6:.1f}M params, held-out ppl {teacher_ppl:.2f}", "",
             "| setting | method | params (M) | zeros | held-out ppl | top-1 agreement | KL |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | {r['params'] / 1e6:.1f} | {r['sparsity']:.2f} | "
                     f"{r['ppl']:,.2f} | {r['agreement']:.3f} | {r['kl']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    from pistill.models import DEFAULT_TEACHER, read_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_TEACHER)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-prune"))
    ap.add_argument("--calib-blocks", type=int, default=8)
    ap.add_argument("--heldout-blocks", type=int, default=6)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--settings", default="", help="comma-separated setting names to run (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated importance methods")
    args = ap.parse_args()
    chosen = set(args.settings.split(",")) if args.settings else set(SETTINGS) | set(SPARSE)
    if chosen - set(SETTINGS) - set(SPARSE):
        ap.error(f"unknown settings {sorted(chosen - set(SETTINGS) - set(SPARSE))}; "
                 f"known: {', '.join([*SETTINGS, *SPARSE])}")
    teacher, data = artifacts(args.model, args.out, args)
    n_layer = read_config(teacher.model_path())["num_hidden_layers"]
    rows = []
    plan = [(s, m, {**f, "method": m, "calib_blocks": args.calib_blocks}) for s, f in SETTINGS.items()
            for m in args.methods.split(",") if s in chosen]
    plan += [(s, f["sparsity_method"], {**f, "calib_blocks": args.calib_blocks}) for s, f in SPARSE.items()
             if s in chosen]
    report = {"rows": rows, "teacher_ppl": data.metrics["teacher_ppl"], "teacher_params": teacher.metrics["params"],
              "calib_blocks": args.calib_blocks, "heldout_blocks": args.heldout_blocks, "block_size": args.block_size,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads()},
              "packages": {"torch": torch.__version__}}
    for setting, method, fields in plan:
        rows.append({"setting": setting, "method": method, **measure(teacher, data, fields, n_layer)})
        print(f"{setting} / {method}: ppl {rows[-1]['ppl']:.2f}, dropped {rows[-1].get('dropped_layers', [])}",
              flush=True)
        (args.out / "prune.json").write_text(json.dumps(report, indent=1))  # after every row: a cut-off run keeps them
    print(table(rows, data.metrics["teacher_ppl"], teacher.metrics["params"]))


if __name__ == "__main__":
    main()
