"""Is the student better than the teacher's own 4-bit file? Pruning shapes, distillation budgets and QAT, measured.

    python bench/front.py [--recipe recipes/default.toml] [--variants mlp-50,depth-9,depth-6+vocab-16k+mend,...]
                          [--mc-data DIR] [--mc-start 1000] [--mc-items 500] [--formats gguf,onnx]
                          [--pruned | --pruned-only] [--out runs/bench-front]

Every variant is the recipe with some stage options changed (a pruning shape, distillation steps, QAT, data), named
in VARIANTS or composed with "+" from the levers of `lever` (depth-N: N layers dropped; vocab-Kk: K x 1024 tokens
kept; mend: the linear map across each run of dropped layers; angular: layers chosen by angular distance): the
script runs its prune, quantize, distill and gguf stages (and onnx with `--formats gguf,onnx`) into
`<out>/<variant>/`, sharing the recipe's teacher and data artifacts (a variant that changes [data] gets its own)
and reusing any stage already there, then for the student's GGUF (the recipe's first quant type) and ONNX folder
measures
  - decode and prefill tok/s with the bench agent on this machine (the recipe's [bench] settings), every model in
    turn `--speed-rounds` times, medians kept; rows of the same format and bytes (same shapes and types) share
    one measurement,
  - zero-shot ARC-Easy and PIQA acc_norm with standard errors on `--mc-items` items of each task starting at item
    `--mc-start` of the files in `--mc-data` (by default items the report's shipped 500 do not contain: choosing
    a default on the items it is then judged by would flatter it),
  - held-out perplexity from the artifacts.
`--pruned` adds the pruned model before distillation, exported and measured like the student; `--pruned-only`
measures that model alone (no quantize or distill stage: what pruning, trimming and mending keep). The teacher's own
GGUF at the same type (the baseline stage) is measured the same way, and every row is compared
with it: decode speed-up, and the share of the teacher file's accuracy above chance that the row keeps (mean over
the tasks; chance 0.25 and 0.5). Prints a Markdown table and writes `<out>/front.json` after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

TASKS = {"arc_easy": ("ARC-Easy", 0.25), "piqa": ("PIQA", 0.5)}  # file stem -> (label, chance accuracy)
VARIANTS: dict[str, dict[str, dict]] = {  # name -> {stage: config changes on top of the recipe}
    "recipe": {},
    "mlp-50": {"prune": {"ffn_ratio": 0.5}},
    "depth-5": {"prune": {"ffn_ratio": 1.0, "n_layer": 25}},
    "depth-6": {"prune": {"ffn_ratio": 1.0, "n_layer": 24}},
    "depth-8": {"prune": {"ffn_ratio": 1.0, "n_layer": 22}},
    "depth-9": {"prune": {"ffn_ratio": 1.0, "n_layer": 21}},
    "depth-10": {"prune": {"ffn_ratio": 1.0, "n_layer": 20}},
    "depth-8 qat": {"prune": {"ffn_ratio": 1.0, "n_layer": 22}, "distill": {"qat": "q4_0"}},
    "depth-8 general": {"prune": {"ffn_ratio": 1.0, "n_layer": 22},
                        "data": {"instructions": 150, "generate": 600, "gen_share": 0.9}},
    "depth-8 int4 qat": {"prune": {"ffn_ratio": 1.0, "n_layer": 22}, "distill": {"qat": "int4"}},
    "depth-8 x4 steps": {"prune": {"ffn_ratio": 1.0, "n_layer": 22}, "distill": {"steps": 200}},
    "depth-8 x8 steps": {"prune": {"ffn_ratio": 1.0, "n_layer": 22}, "distill": {"steps": 400}},
}
STUDENT_STAGES = ("prune", "quantize", "distill", "gguf")
TEACHER_LAYERS = 30  # SmolLM2-135M's depth, for depth-N


def lever(token: str) -> dict[str, dict]:
    """One lever of a composed variant name as stage config changes."""
    import re

    if m := re.fullmatch(r"depth-(\d+)", token):
        return {"prune": {"ffn_ratio": 1.0, "n_layer": TEACHER_LAYERS - int(m[1])}}
    if m := re.fullmatch(r"vocab-(\d+)k", token):
        return {"prune": {"vocab": int(m[1]) * 1024}}
    fixed = {"mend": {"prune": {"mend": "linear"}}, "angular": {"prune": {"layer_metric": "angular"}},
             "qat": {"distill": {"qat": "q4_0"}}}
    if token not in fixed:
        raise SystemExit(f"unknown lever '{token}' in a variant; use depth-N, vocab-Kk, mend, angular or qat")
    return fixed[token]


def changes_of(name: str) -> dict[str, dict]:
    """A variant's stage config changes: from VARIANTS, or its "+"-joined levers merged in order."""
    if name in VARIANTS:
        return VARIANTS[name]
    out: dict[str, dict] = {}
    for token in name.split("+"):
        for st, ch in lever(token).items():
            out.setdefault(st, {}).update(ch)
    return out


def shared(rec, out: Path) -> dict:
    """The recipe's teacher and data artifacts, built once in `<out>/`."""
    from pistill.pipeline import run_stage, stage

    arts = {}
    for name in ("teacher", "data"):
        st = stage(name)
        arts[name], ran = run_stage(st, arts, rec.configs[name], out / name, force=False)
        print(f"{name}: {'ran' if ran else 'reused'}", flush=True)
    return arts


def student(rec, base: dict, changes: dict, folder: Path, formats: list[str], pruned_only: bool = False) -> dict:
    """The variant's stages (and its own data, when it changes [data]) into `folder`; name -> artifact. With
    `pruned_only`, the prune stage alone."""
    from pistill.pipeline import run_stage, stage

    arts = dict(base)
    stages = (("data",) if "data" in changes else ()) + \
        (("prune",) if pruned_only else STUDENT_STAGES + (("onnx",) if "onnx" in formats else ()))
    for name in stages:
        cfg = dataclasses.replace(rec.configs[name], **changes.get(name, {}))
        st = stage(name)
        t0 = time.perf_counter()
        arts[name], ran = run_stage(st, arts, cfg, folder / name, force=False)
        print(f"  {name}: {'ran' if ran else 'reused'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return arts


def baseline(rec, arts: dict, out: Path):
    """The teacher's GGUF at the student's type, from the first variant's gguf artifact (its type policy)."""
    from pistill.export.baseline import STUDENT, BaselineConfig
    from pistill.pipeline import run_stage, stage

    st = stage("baseline")
    cfg = BaselineConfig(quants=(STUDENT,))
    art, _ = run_stage(st, arts, cfg, out / "baseline", force=False)
    return art


def pruned_gguf(rec, arts: dict, folder: Path):
    """The pruned model before distillation, exported like the student (the gguf stage on the prune artifact)."""
    from pistill.pipeline import run_stage, stage

    inputs = {"distill": arts["prune"], "data": arts["data"]}  # the pruned model in the student's place
    art, _ = run_stage(stage("gguf"), inputs, rec.configs["gguf"], folder / "gguf-pruned", force=False)
    return art


def mc_items(folder: Path, start: int, n: int) -> dict[str, list]:
    from pistill.mc_eval import read_items

    return {name: read_items(folder / f"{name}.jsonl", 0, "\nAnswer:")[start:start + n] for name in TASKS}


def measure(view, items: dict[str, list]) -> dict:
    """Zero-shot accuracy (the eval stage's scorer) and held-out figures of one model; speed comes later."""
    from pistill.zeroshot import EvalConfig, score_model

    acc = score_model(view, items, EvalConfig(items=0))["tasks"]
    return {"path": str(view.path), "file": view.model["file"], "bytes": view.metrics.get("bytes"),
            "bpb": view.metrics.get("bpb"), "ppl": view.metrics.get("ppl"), **{f"{t}_acc_norm": acc[t]["acc_norm"] for t in TASKS},
            **{f"{t}_stderr": acc[t]["acc_norm_stderr"] for t in TASKS}, "n": acc[next(iter(TASKS))]["n"]}


def speeds(rows: list[dict], bench_cfg, rounds: int) -> None:
    """Decode and prefill tok/s of every row's model with the bench agent, the models taken in turn `rounds` times
    (a slow spell of the machine then falls on every model alike), medians kept; busy rounds are flagged."""
    import statistics

    from pistill.artifact import Artifact
    from pistill.device.local import bench_model

    alike: dict[tuple, dict] = {}  # the same tensor shapes and types decode at the same speed: measure one of each
    for r in rows:
        alike.setdefault((r.get("format", "gguf"), r["bytes"]), r)
    measured = list(alike.values())
    runs: dict[str, list[dict]] = {r["name"]: [] for r in measured}
    for i in range(rounds):
        for r in measured:
            view = next(v for _, v in Artifact.load(r["path"]).each_model() if v.model["file"] == r["file"])
            res = bench_model(view, bench_cfg)
            if "error" in res:
                raise SystemExit(f"bench failed for {r['name']}: {res['error']}")
            runs[r["name"]].append(res)
            print(f"  speed round {i + 1}: {r['name']} {res['decode_tps']:.1f} tok/s", flush=True)
    for r in rows:
        same = alike[(r.get("format", "gguf"), r["bytes"])]
        if same is not r:
            r["speed_of"] = same["name"]
        got = runs[same["name"]]
        r["decode_tps"] = statistics.median(x["decode_tps"] for x in got)
        r["prefill_tps"] = statistics.median(x["prefill_tps"] for x in got)
        r["decode_tps_runs"] = [round(x["decode_tps"], 1) for x in got]
        r["busy"] = [b for x in got if (b := (x.get("load") or {}).get("busy"))]


def compare(row: dict, ref: dict) -> dict:
    """Speed-up and retained accuracy above chance (the report's figure) against the teacher's file of the same
    type."""
    from pistill.front import retention

    def scored(r: dict) -> dict:  # a row in the report's shape
        return {"zeroshot": {t: {"acc_norm": r[f"{t}_acc_norm"]} for t in TASKS}}

    return {"speedup": row["decode_tps"] / ref["decode_tps"],
            "retention": retention(scored(row), scored(ref), {t: chance for t, (_, chance) in TASKS.items()})}


def table(rows: list[dict]) -> str:
    head = ("| model | shape | distill | size (MB) | bits/byte | decode tok/s | × teacher | "
            + " | ".join(f"{label} acc_norm" for label, _ in TASKS.values()) + " | kept above chance |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(TASKS) + "---:|"]
    for r in rows:
        accs = " | ".join(f"{r[f'{t}_acc_norm']:.3f} ± {r[f'{t}_stderr']:.3f}" for t in TASKS)
        lines.append(f"| {r['name']} | {r.get('shape', '–')} | {r.get('distill', '–')} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['bpb']:.3f} | {r['decode_tps']:.1f} | {r['speedup']:.2f} | {accs} | "
                     f"{100 * r['retention']:.0f}% |")
    return "\n".join(lines)


def describe(arts: dict) -> dict:
    p, pc = arts["prune"].metrics, arts["prune"].manifest["config"]
    shape = f"{p['n_layer']} layers, MLP {p['ffn_dim']}, {p['n_heads']}/{p['kv_heads']} heads"
    shape += f", vocab {p['vocab_size']}" if p.get("vocab_size") else ""
    shape += ", mended" if pc.get("mend", "none") != "none" else ""
    shape += ", angular" if pc.get("layer_metric") == "angular" else ""
    if "distill" not in arts:
        return {"shape": shape, "distill": "none", "params": p.get("params")}
    d, cfg = arts["distill"].metrics, arts["distill"].manifest["config"]
    return {"shape": shape,
            "distill": f"{d.get('steps')} steps" + (f", QAT {cfg['qat']}" if cfg.get("qat", "none") != "none" else ""),
            "distill_s": arts["distill"].manifest.get("wall_s"), "params": p.get("params")}


def earlier(path: Path, recipe: str, mc: dict) -> dict | None:
    """The rows of an earlier run of this script into the same folder with the same recipe and items, to extend."""
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return old if old.get("recipe") == recipe and old.get("mc") == mc else None


def main() -> None:
    from pistill import recipe
    from pistill.artifact import machine_summary

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/default.toml")
    ap.add_argument("--variants", default="recipe", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--mc-data", type=Path, default=Path("../shared/data"), help="folder with arc_easy/piqa.jsonl")
    ap.add_argument("--mc-start", type=int, default=1000, help="first item used of each task file")
    ap.add_argument("--mc-items", type=int, default=500, help="items per task")
    ap.add_argument("--formats", default="gguf", help="student files measured: gguf, onnx or gguf,onnx")
    ap.add_argument("--speed-rounds", type=int, default=3, help="times every model is benchmarked, in turn")
    ap.add_argument("--pruned", action="store_true", help="also measure the pruned model's GGUF before distillation")
    ap.add_argument("--pruned-only", action="store_true", help="measure the pruned model's GGUF alone (no distill)")
    ap.add_argument("--speed-only", action="store_true", help="measure the speeds of the rows already in front.json")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-front"))
    args = ap.parse_args()
    formats = args.formats.split(",")
    names = args.variants.split(",")
    variants = {n: changes_of(n) for n in names}  # SystemExit on an unknown lever
    rec = recipe.load(args.recipe)
    items = mc_items(args.mc_data, args.mc_start, args.mc_items)
    base = {} if args.speed_only else shared(rec, args.out)
    mc = {"mc_data": str(args.mc_data), "mc_start": args.mc_start, "mc_items": args.mc_items}
    report = earlier(args.out / "front.json", args.recipe, mc) or {
        "recipe": args.recipe, "machine": machine_summary(), "mc": mc, "rows": []}
    ref = next((r for r in report["rows"] if r["name"] == "teacher GGUF"), None)
    for name in [] if args.speed_only else names:
        print(f"{name}:", flush=True)
        arts = student(rec, base, variants[name], args.out / name.replace(" ", "_"), formats, args.pruned_only)
        views = {} if args.pruned_only else {fmt: arts[fmt] for fmt in formats}
        if args.pruned or args.pruned_only:
            views["gguf, before distillation"] = pruned_gguf(rec, arts, args.out / name.replace(" ", "_"))
        if ref is None:  # the baseline takes the student GGUF's type policy
            gguf = arts.get("gguf") or views["gguf, before distillation"]
            ref = {"name": "teacher GGUF", **measure(baseline(rec, {**arts, "gguf": gguf}, args.out), items)}
            report["rows"].append(ref)
        report["rows"] = [r for r in report["rows"] if r.get("variant") != name]  # measured again below
        for fmt, view in views.items():
            row = {"name": f"{name} ({fmt})", "variant": name, "format": fmt, **describe(arts), **measure(view, items)}
            report["rows"].append(row)
            print(f"  {row['name']}: " + ", ".join(f"{label} {row[f'{t}_acc_norm']:.3f}"
                                                 for t, (label, _) in TASKS.items()), flush=True)
        (args.out / "front.json").write_text(json.dumps(report, indent=1) + "\n")
    speeds(report["rows"], rec.configs["bench"], args.speed_rounds)
    for row in report["rows"]:
        row.update(compare(row, ref))
    (args.out / "front.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report["rows"]))
    print(f"\n{report['machine']}; {args.mc_items} items per task from item {args.mc_start}")


if __name__ == "__main__":
    main()
