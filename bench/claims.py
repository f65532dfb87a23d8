"""Do the prune -> quantize -> distill workflow's claims hold? One experiment per claim, measured on the teacher.

    python bench/claims.py [--recipe recipes/default.toml] [--steps 20] [--items 250] [--mc-start 1500]
                           [--claims 1,2,3,4,5,6,7] [--out runs/claims] [--doc docs/claims.md] [--quick]

Every arm is the recipe with some stage options changed; the stages run into `<out>/<arm>/<stage>` through
pistill's own pipeline (content-keyed: a rerun reuses every finished stage, and an interrupted one continues),
sharing the recipe's teacher and data. Every distillation arm has the same data and budget: `--steps` optimizer
steps of the recipe's batch (the same tokens), the recipe's loss and learning rate, no QAT unless the arm is QAT.
Quality is measured in one final format where the claim is about what ships (the llama.cpp Q4_0 file, as the
report does): held-out perplexity on the data artifact's blocks and zero-shot ARC-Easy and PIQA acc_norm with
standard errors on `--items` items of each task from item `--mc-start` of ../shared/data (items neither the
report's shipped 500 nor the default recipe's choice, made on items 1000-1499, have seen). Scores are cached in
`<out>/claims.json` by artifact and file, so a rerun only measures what changed. Writes the verdicts to `--doc`.

`--quick` is a plumbing check (2 steps, 20 items; it writes no doc unless --doc is given). Its teacher, data, prune,
quantize and teacher-file artifacts are the full run's: only the distillations and scores are redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from front import TASKS, mc_items  # noqa: E402  (same tasks and item files as the front bench)

CLAIMS = {
    1: "Pruning removes 20-60% of a model's weights with minimal accuracy loss.",
    2: "4-bit quantization cuts memory about 4x with minimal accuracy loss.",
    3: "Quantizing before pruning amplifies noise from redundant weights: prune first.",
    4: "Distilling first gives a large student that still needs pruning and quantization, degrading performance.",
    5: "The student should learn from the pruned and quantized teacher; it keeps about 95% of the teacher's "
       "performance.",
    6: "Without quantization, the teacher's memory and compute make distillation impractical.",
    7: "Quantization-aware training beats post-training quantization; double quantization saves memory at no cost; "
       "QLoRA (low-rank adapters on a 4-bit model) recovers quality cheaply.",
}
FRACTIONS = (0.2, 0.4, 0.6)  # shares of the teacher's parameters removed (claim 1)
TEACHER_TYPES = ("F16", "Q8_0", "Q4_K_M", "Q4_0")  # the teacher's llama.cpp files (claims 1, 2, 5)
LORA_LR = 1e-3  # adapters start at zero and have few steps: LoRA's usual higher learning rate


# --- running arms --------------------------------------------------------------------------------------------------

class Bench:
    """The recipe, the shared artifacts, the items, and the score cache of one claims run."""

    def __init__(self, args):
        from pistill import recipe

        self.args, self.out = args, args.out
        self.rec = recipe.load(args.recipe)
        self.items = mc_items(args.mc_data, args.mc_start, args.items)
        self.path = args.out / "claims.json"
        self.state = self._load()
        self.arts: dict = {}

    def _load(self) -> dict:
        spec = {"recipe": self.args.recipe, "steps": self.args.steps, "items": self.args.items,
                "mc_start": self.args.mc_start}
        try:
            old = json.loads(self.path.read_text())
            if old.get("spec") == spec:
                return old
        except (OSError, json.JSONDecodeError):
            pass
        return {"spec": spec, "scores": {}, "extra": {}}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        os.replace(tmp, self.path)

    def cfg(self, stage: str, **changes):
        return dataclasses.replace(self.rec.configs[stage], **changes)

    def stage(self, name: str, inputs: dict, cfg, folder: str):
        """Run (or reuse) stage `name` into `<out>/<folder>/<name>`."""
        from pistill.pipeline import run_stage, stage

        t0 = time.perf_counter()
        art, ran = run_stage(stage(name), inputs, cfg, self.out / folder / name, force=False)
        print(f"  {folder}/{name}: {'ran' if ran else 'reused'} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return art

    def shared(self) -> dict:
        if not self.arts:
            for name in ("teacher", "data"):
                self.arts[name] = self.stage(name, self.arts, self.rec.configs[name], "shared")
        return dict(self.arts)

    def distill_cfg(self, **changes):
        return self.cfg("distill", **{"steps": self.args.steps, "qat": "none", "eval_every": 0, "ckpt_every": 10,
                                      **changes})

    def score(self, view, label: str, speed: bool = False) -> dict:
        """Size, held-out ppl and zero-shot accuracy of one model (cached by artifact id and file)."""
        from pistill.zeroshot import EvalConfig, score_model

        key = f"{view.id}:{view.model['file']}"
        row = self.state["scores"].get(key)
        if row is None:
            t0 = time.perf_counter()
            acc = score_model(view, self.items, EvalConfig(items=0))["tasks"]
            m = view.metrics
            row = {"bytes": m.get("bytes"), "memory": m.get("memory_footprint"), "ppl": m.get("ppl"),
                   "params": m.get("params"), "n": acc[next(iter(TASKS))]["n"],
                   **{f"{t}": acc[t]["acc_norm"] for t in TASKS},
                   **{f"{t}_se": acc[t]["acc_norm_stderr"] for t in TASKS}}
            print(f"  scored {label}: ppl {row['ppl']:.2f}, " + ", ".join(
                f"{TASKS[t][0]} {row[t]:.3f}" for t in TASKS) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            self.state["scores"][key] = row
            self.save()
        if speed and "decode_tps" not in row:
            from pistill.device.local import bench_model

            got = [bench_model(view, self.rec.configs["bench"]) for _ in range(2)]
            if bad := [g["error"] for g in got if "error" in g]:
                raise SystemExit(f"bench failed for {label}: {bad[0]}")
            row["decode_tps"] = statistics.median(g["decode_tps"] for g in got)
            row["prefill_tps"] = statistics.median(g["prefill_tps"] for g in got)
            self.save()
        return {"label": label, **row}

    def gguf(self, model_art, folder: str, quants=None):
        """The gguf stage on any HF model artifact (in the student's place); its Q4_0 (first quant) view."""
        # verify off: the exports' parity with torch is the test suite's and the pipeline's job; here it would only
        # add time to every arm (the held-out ppl of each file is still measured)
        cfg = self.cfg("gguf", verify=False, **({"quants": tuple(quants)} if quants else {}))
        return self.stage("gguf", {"distill": model_art, "data": self.arts["data"]}, cfg, folder)

    def teacher_files(self) -> dict:
        """The teacher's own GGUF files (the baseline stage) at TEACHER_TYPES; {type: view}."""
        from pistill.export.baseline import BaselineConfig

        changes, name = self.depth(FRACTIONS[0])
        any_student = self.gguf(self.prune(changes, name), f"{name}/pruned")  # the stage reads its type policy
        art = self.stage("baseline", {**self.arts, "gguf": any_student}, BaselineConfig(quants=TEACHER_TYPES),
                         "teacher")
        return {q: v for (_, v), q in zip(art.each_model(), TEACHER_TYPES)}

    # shapes ---------------------------------------------------------------------------------------------------------
    def teacher_hf(self) -> dict:
        return json.loads((self.arts["teacher"].model_path() / "config.json").read_text())

    def depth(self, fraction: float) -> tuple[dict, str]:
        """Prune changes that drop whole layers until `fraction` of the parameters are gone."""
        c = self.teacher_hf()
        h, ffn, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        hd = c.get("head_dim") or h // c["num_attention_heads"]
        per_layer = h * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 3 * h * ffn + 2 * h
        total = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2) + L * per_layer + h
        drop = min(L - 1, round(fraction * total / per_layer))
        return {"ffn_ratio": 1.0, "n_layer": L - drop}, f"depth-{round(100 * fraction)}"

    def width(self, fraction: float) -> tuple[dict, str]:
        """Prune changes that narrow MLP and hidden widths (target_params) to `fraction` fewer parameters."""
        total = self.arts["teacher"].metrics.get("params")
        return ({"target_params": int(total * (1 - fraction)), "n_layer": None, "ffn_ratio": 1.0},
                f"width-{round(100 * fraction)}")

    def prune(self, changes: dict, folder: str, teacher=None):
        inputs = {**self.arts, **({"teacher": teacher} if teacher is not None else {})}
        return self.stage("prune", inputs, self.cfg("prune", **changes), folder)

    def quantize(self, folder: str, prune_art=None, **changes):
        inputs = {**self.arts, "prune": prune_art or self.prune(*self.depth(FRACTIONS[0]))}
        return self.stage("quantize", inputs, self.cfg("quantize", **changes), folder)

    def distill(self, folder: str, prune_art, quant_art, **changes):
        inputs = {**self.arts, "prune": prune_art, "quantize": quant_art}
        return self.stage("distill", inputs, self.distill_cfg(**changes), folder)


# --- the claims ----------------------------------------------------------------------------------------------------

def kept(row: dict, ref: dict) -> float:
    """Share of the reference's accuracy above chance that `row` keeps (the report's figure, mean over the tasks)."""
    from pistill.front import retention

    def scored(r: dict) -> dict:  # a row in the report's shape
        return {"zeroshot": {t: {"acc_norm": r[t]} for t in TASKS}}

    return retention(scored(row), scored(ref), {t: chance for t, (_, chance) in TASKS.items()})


def drop(row: dict, ref: dict) -> tuple[float, float]:
    """Mean acc_norm drop from `ref` over the tasks and its standard error (both rows' errors)."""
    d = statistics.mean(ref[t] - row[t] for t in TASKS)
    se = (sum(row[f"{t}_se"] ** 2 + ref[f"{t}_se"] ** 2 for t in TASKS) ** 0.5) / len(TASKS)
    return d, se


def acc(r: dict) -> str:
    return " | ".join(f"{r[t]:.3f} ± {r[f'{t}_se']:.3f}" for t in TASKS)


def acc_head() -> str:
    return " | ".join(f"{label} acc_norm" for label, _ in TASKS.values())


def mb(n) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}"


def claim1(b: Bench) -> dict:
    teacher = b.teacher_files()["Q4_0"]
    ref = b.score(teacher, "teacher Q4_0")
    rows, lines = [], []
    for shape in (b.depth, b.width):
        for f in FRACTIONS:
            changes, name = shape(f)
            p = b.prune(changes, name)
            q = b.quantize("shared-nf4")
            before = b.score(b.gguf(p, f"{name}/pruned"), f"{name} pruned")
            after = b.score(b.gguf(b.distill(name, p, q), name), f"{name} distilled")
            removed = 1 - p.metrics["params"] / b.arts["teacher"].metrics["params"]
            rows.append({"name": name, "removed": removed, "before": before, "after": after})
            shp = f"{p.metrics['n_layer']} layers, hidden {p.metrics['hidden']}, MLP {p.metrics['ffn_dim']}"
            for tag, r in (("pruned", before), (f"+ {b.args.steps} distillation steps", after)):
                d, se = drop(r, ref)
                lines.append(f"| {100 * removed:.0f}% ({name.split('-')[0]}) | {shp} | {tag} | {mb(r['bytes'])} | "
                             f"{r['ppl']:.1f} | {acc(r)} | {d:+.3f} ± {se:.3f} | {100 * kept(r, ref):.0f}% |")
    table = [f"| removed | shape | training | Q4_0 MB | held-out ppl | {acc_head()} | mean drop | kept above chance |",
             "|---|---|---|---:|---:|" + "---:|" * len(TASKS) + "---:|---:|",
             f"| 0% (teacher) | {b.teacher_hf()['num_hidden_layers']} layers | – | {mb(ref['bytes'])} | "
             f"{ref['ppl']:.1f} | {acc(ref)} | – | 100% |"] + lines
    minimal = [r for r in rows if drop(r["after"], ref)[0] <= 2 * drop(r["after"], ref)[1]]
    best = {f: max((r for r in rows if abs(r["removed"] - f) < 0.05), key=lambda r: kept(r["after"], ref))
            for f in FRACTIONS}
    if len(minimal) == len(rows):
        verdict = "Holds"
    elif minimal:
        verdict = "Holds only partly"
    else:
        verdict = "Fails"
    detail = "; ".join(f"{100 * f:.0f}% removed keeps at best {100 * kept(r['after'], ref):.0f}% of the teacher's "
                       f"accuracy above chance ({r['name']}, mean drop {drop(r['after'], ref)[0]:+.3f})"
                       for f, r in best.items())
    return {"table": table, "verdict": f"{verdict} here: {detail}. A drop within two standard errors counts as "
                                       f"minimal; {len(minimal)} of {len(rows)} arms meet that.",
            "experiment": f"The teacher pruned by depth (whole layers by Block Influence) and by width (hidden and MLP "
                          f"widths from a parameter budget) to 20, 40 and 60% fewer parameters, each scored before "
                          f"and after {b.args.steps} distillation steps from the NF4 teacher, all as Q4_0 GGUF "
                          "against the teacher's own Q4_0 file."}


def claim2(b: Bench) -> dict:
    arms = {"float32": ("teacher-float32", dict(method="none")),
            "NF4": ("teacher-nf4", dict(method="nf4", double_quant=False)),
            "NF4 + double quant": ("shared-nf4", {}),  # the recipe's teacher
            "INT8 (LLM.int8)": ("teacher-int8", dict(method="int8"))}
    torch_rows = {name: b.score(b.quantize(folder, **ch), f"teacher {name}") for name, (folder, ch) in arms.items()}
    files = b.teacher_files()
    gguf_rows = {q: b.score(v, f"teacher {q}", speed=True) for q, v in files.items()}
    fp32, f16 = torch_rows["float32"], gguf_rows["F16"]
    lines = [f"| bitsandbytes (torch) | {n} | {mb(r['bytes'])} | {fp32['bytes'] / r['bytes']:.2f}x | {r['ppl']:.2f} "
             f"| {acc(r)} | – |" for n, r in torch_rows.items()]
    lines += [f"| llama.cpp GGUF | {q} | {mb(r['bytes'])} | {f16['bytes'] / r['bytes']:.2f}x vs F16 | {r['ppl']:.2f} "
              f"| {acc(r)} | {r['decode_tps']:.0f} |" for q, r in gguf_rows.items()]
    table = [f"| runtime | type | stored MB | smaller | held-out ppl | {acc_head()} | decode tok/s |",
             "|---|---|---:|---:|---:|" + "---:|" * len(TASKS) + "---:|"] + lines
    q4, nf4 = gguf_rows["Q4_0"], torch_rows["NF4 + double quant"]
    d4, se4 = drop(q4, f16)
    dn, sen = drop(nf4, fp32)
    ratio, nratio = f16["bytes"] / q4["bytes"], fp32["bytes"] / nf4["bytes"]
    holds = ratio >= 3.0 and d4 <= 2 * se4
    return {"table": table, "experiment": "The teacher in every storage type pistill uses: bitsandbytes in torch "
            "(the saved weights with their quantization state; the embedding stays float32) and llama.cpp files, "
            "each scored for held-out perplexity and "
            "zero-shot accuracy; decode speed with the bench agent on this machine.",
            "verdict": f"{'Holds' if holds else 'Holds only partly'} here: Q4_0 is {ratio:.1f}x smaller than F16 "
                       f"({mb(q4['bytes'])} vs {mb(f16['bytes'])} MB, "
                       f"{8 * q4['bytes'] / f16['params']:.1f} bits per weight) at mean acc_norm {d4:+.3f} ± "
                       f"{se4:.3f} and ppl {f16['ppl']:.1f} -> "
                       f"{q4['ppl']:.1f}; NF4 with double quantization stores the torch model in {nratio:.1f}x less "
                       f"space than float32 at {dn:+.3f} ± {sen:.3f} and ppl {fp32['ppl']:.1f} -> {nf4['ppl']:.1f}."}


def nf4_roundtrip_teacher(b: Bench):
    """The teacher with every quantizable weight rounded through NF4 (double quant) and back to float32, as an
    artifact of the teacher stage: the "quantize first" starting point."""
    from pistill.compress.quantize import QuantizeConfig, load_quantized
    from pistill.models import save_model

    src = b.arts["teacher"].model_path()
    dst = b.out / "nf4-roundtrip-src"
    if not (dst / "config.json").is_file():
        import shutil

        import torch

        model = load_quantized(src, QuantizeConfig(method="nf4", double_quant=True, compute_dtype="float32"), "cpu")
        model = model.dequantize().to(torch.float32)
        tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, src, tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    return b.stage("teacher", {}, b.cfg("teacher", source=str(dst.resolve())), "nf4-first")


def claim3(b: Bench) -> dict:
    first = nf4_roundtrip_teacher(b)
    lines, out = [], {}
    for shape in (b.depth, b.width):
        changes, name = shape(FRACTIONS[0])
        pq = b.score(b.gguf(b.prune(changes, name), f"{name}/pruned"), f"{name} prune then quantize")
        qp_prune = b.prune(changes, f"nf4-first/{name}", teacher=first)
        qp = b.score(b.gguf(qp_prune, f"nf4-first/{name}/pruned"), f"{name} quantize then prune")
        out[name] = (pq, qp)
        for tag, r in (("prune, then Q4_0", pq), ("NF4 round trip, score and prune, then Q4_0", qp)):
            lines.append(f"| {name} | {tag} | {mb(r['bytes'])} | {r['ppl']:.2f} | {acc(r)} |")
    table = [f"| shape | order | Q4_0 MB | held-out ppl | {acc_head()} |", "|---|---|---:|---:|" + "---:|" * len(TASKS)]
    worse = [n for n, (pq, qp) in out.items() if qp["ppl"] > pq["ppl"]]
    sig = [n for n, (pq, qp) in out.items() if drop(qp, pq)[0] > 2 * drop(qp, pq)[1]]
    verdict = ("Holds" if len(worse) == len(out) and sig else "Holds only partly" if worse else "Fails") + " here: " + \
        "; ".join(f"{n}: ppl {pq['ppl']:.2f} (prune first) vs {qp['ppl']:.2f} (quantize first), mean acc_norm "
                  f"{drop(qp, pq)[0]:+.3f} ± {drop(qp, pq)[1]:.3f} lower quantizing first"
                  for n, (pq, qp) in out.items())
    return {"table": table + lines, "verdict": verdict + ". No distillation in either arm: the order alone.",
            "experiment": f"The same {100 * FRACTIONS[0]:.0f}% prunes (depth and width) computed on the float32 "
                          "teacher, or on the teacher rounded through NF4 (double quant) and back (importance "
                          "scores and kept weights then carry the quantization noise); both exported to the same "
                          "final format, Q4_0."}


def claim4(b: Bench) -> dict:
    changes, name = b.depth(FRACTIONS[0])
    p, q = b.prune(changes, name), b.quantize("shared-nf4")
    ours = b.score(b.gguf(b.distill(name, p, q), name), "prune, distill, Q4_0")
    full = b.distill("distill-first", p, q, student=str(b.arts["teacher"].model_path()))
    later = b.prune(changes, "distill-first", teacher=full)
    first = b.score(b.gguf(later, "distill-first/pruned"), "distill, prune, Q4_0")
    loss = full.metrics.get("loss_first"), full.metrics.get("loss_last")
    d, se = drop(first, ours)
    table = [f"| order | held-out ppl | {acc_head()} | Q4_0 MB |", "|---|---:|" + "---:|" * len(TASKS) + "---:|",
             f"| prune, distill {b.args.steps} steps, Q4_0 (pistill) | {ours['ppl']:.2f} | {acc(ours)} | "
             f"{mb(ours['bytes'])} |",
             f"| distill {b.args.steps} steps at full size, prune, Q4_0 | {first['ppl']:.2f} | {acc(first)} | "
             f"{mb(first['bytes'])} |"]
    holds = first["ppl"] > ours["ppl"]
    return {"table": table, "experiment": f"The same {name} shape and {b.args.steps} distillation steps: pistill's "
            "order against distilling a full-size student (started from the teacher) first, then pruning and "
            "quantizing it with no further training.",
            "verdict": f"{'Holds' if holds and d > 2 * se else 'Holds only partly' if holds else 'Fails'} here: "
                       f"ppl {ours['ppl']:.2f} (pistill's order) vs {first['ppl']:.2f} (distill first), mean "
                       f"acc_norm {d:+.3f} ± {se:.3f} lower distilling first. A full-size student that starts as "
                       f"the teacher has little to learn from it (distillation loss {loss[0]:.3f} -> {loss[1]:.3f}), "
                       "so the budget is spent before the damage pruning does."}


def claim5(b: Bench) -> dict:
    changes, name = b.depth(FRACTIONS[0])
    p = b.prune(changes, name)
    arms = {"original, float32": b.quantize("teacher-float32", method="none"),
            "original, NF4 (pistill's default)": b.quantize("shared-nf4"),
            "pruned + NF4 (the workflow's order)": b.quantize("pruned-nf4", prune_art=p, source="pruned")}
    teacher = b.score(b.teacher_files()["Q4_0"], "teacher Q4_0")
    rows = {}
    for label, q in arms.items():
        folder = name if "default" in label else f"{name}-from-{q.path.parent.name}"
        rows[label] = b.score(b.gguf(b.distill(folder, p, q), folder), f"student of {label}")
    pruned = b.score(b.gguf(p, f"{name}/pruned"), "pruned, no distillation")
    lines = [f"| {lab} | {r['ppl']:.2f} | {acc(r)} | {100 * kept(r, teacher):.0f}% | "
             f"{100 * statistics.mean(r[t] / teacher[t] for t in TASKS):.0f}% |" for lab, r in
             [("teacher Q4_0", teacher), ("pruned, no distillation", pruned)] + list(rows.items())]
    table = [f"| distillation teacher | student's Q4_0 ppl | {acc_head()} | kept above chance | raw accuracy kept |",
             "|---|---:|" + "---:|" * len(TASKS) + "---:|---:|"] + lines
    best = max(rows, key=lambda k: kept(rows[k], teacher))
    raw = statistics.mean(rows[best][t] / teacher[t] for t in TASKS)
    literal = rows["pruned + NF4 (the workflow's order)"]
    return {"table": table, "experiment": f"The same {name} student, data and {b.args.steps} steps, distilled from "
            "three teachers; scored as Q4_0 against the teacher's own Q4_0 file.",
            "verdict": f"{'Holds' if raw >= 0.95 else 'Fails'} for raw accuracy, "
                       f"{'holds' if kept(rows[best], teacher) >= 0.95 else 'fails'} above chance: the best arm "
                       f"({best}) keeps "
                       f"{100 * raw:.0f}% of the teacher's raw accuracy but {100 * kept(rows[best], teacher):.0f}% of "
                       f"its accuracy above chance (chance alone is 'kept' in a raw ratio). The lowest perplexity "
                       f"comes "
                       f"from the {min(rows, key=lambda k: rows[k]['ppl'])} teacher "
                       f"({min(r['ppl'] for r in rows.values()):.2f}); the pruned+NF4 teacher "
                       f"gives ppl {literal['ppl']:.2f} against {rows[best]['ppl']:.2f}; the pruned model with no "
                       f"distillation keeps {100 * kept(pruned, teacher):.0f}% above chance."}


MEMORY_CHILD = "--memory-child"
MEMORY_STEPS = 4  # the first warms up; the median of the others is the step time


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: ru_maxrss would keep the launching process's peak
    across exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(quant_dir: str, student_dir: str, data_dir: str, steps: int) -> None:
    """In its own process: load the teacher and student, run `steps` distillation steps; print peak RSS and times."""
    import torch

    from pistill.artifact import Artifact
    from pistill.compress.distill import DistillConfig, train, training_blocks
    from pistill.compress.quantize import load_teacher
    from pistill.models import load_model

    t0 = time.perf_counter()
    teacher = load_teacher(Path(quant_dir), "cpu")
    load_s = time.perf_counter() - t0
    rss_teacher = peak_rss()
    student = load_model(Path(student_dir))
    blocks, heldout = training_blocks(Artifact.load(data_dir), student.config.vocab_size)
    import tempfile


    cfg = DistillConfig(steps=steps, batch_size=4, eval_every=0, ckpt_every=0, warmup_steps=1)
    with tempfile.TemporaryDirectory() as work:
        train(student, teacher, blocks, heldout, cfg, Path(work))
        rows = train_rows(Path(work))
    step_s = statistics.median(r["step_s"] for r in rows[1:] or rows)  # the first step warms up
    print(json.dumps({"peak_rss": peak_rss(),
                      "rss_after_teacher": rss_teacher, "teacher_memory": teacher.get_memory_footprint(),
                      "step_s": step_s, "load_s": load_s, "torch_threads": torch.get_num_threads()}))


def claim6(b: Bench) -> dict:
    changes, name = b.depth(FRACTIONS[0])
    p = b.prune(changes, name)
    arms = {"float32": b.quantize("teacher-float32", method="none"), "NF4 + double quant": b.quantize("shared-nf4"),
            "INT8": b.quantize("teacher-int8", method="int8")}
    runs = b.state["extra"].setdefault("memory", {})
    for label, q in arms.items():
        if label not in runs:
            cmd = [sys.executable, __file__, MEMORY_CHILD, str(q.model_path()), str(p.model_path()),
                   str(b.arts["data"].path), str(MEMORY_STEPS)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                raise SystemExit(f"memory measurement for {label} failed:\n{res.stderr[-2000:]}")
            runs[label] = json.loads(res.stdout.strip().splitlines()[-1]) | {"stored": q.metrics["bytes"]}
            print(f"  memory {label}: peak {runs[label]['peak_rss'] / 1e6:.0f} MB, step {runs[label]['step_s']:.1f} s",
                  flush=True)
            b.save()
    bits = decoder_bits(b, runs)
    lines = [f"| {lab} | {r['teacher_memory'] / 1e6:.0f} | {bits[lab]:.2f} | {r['peak_rss'] / 1e6:.0f} | "
             f"{r['step_s']:.2f} | {7e9 * bits[lab] / 8 / 1e9:.1f} |" for lab, r in runs.items()]
    table = ["| teacher | teacher memory MB | bits per decoder weight | process peak RSS MB | step s | "
             "a 7B teacher's weights, GB |", "|---|---:|---:|---:|---:|---:|"] + lines
    return {"table": table, "experiment": f"{MEMORY_STEPS} distillation steps of the {name} student (batch 4 x "
            "256 tokens, the recipe's) in a fresh process per teacher type, on this machine's CPU: the teacher's "
            "model memory, the process's peak resident memory and the median step time. bits per decoder weight: the "
            "teacher's stored bytes (weights and quantization state) less its float32 embedding (bitsandbytes "
            "quantizes only the linear layers), over the "
            "decoder's parameters; the last column applies them to 7 billion weights (a 7B model's embedding is a "
            "few percent of it).",
            "verdict": memory_verdict(runs, bits)}


def decoder_bits(b: Bench, runs: dict) -> dict:
    """Bits per weight of each teacher's decoder: its stored bytes (weights and quantization state) less the
    float32 (tied) embedding, over the rest."""
    c, params = b.teacher_hf(), b.arts["teacher"].metrics["params"]
    embed = c["vocab_size"] * c["hidden_size"] * (1 if c.get("tie_word_embeddings") else 2)
    return {lab: 8 * (r["stored"] - 4 * embed) / (params - embed) for lab, r in runs.items()}


def memory_verdict(runs: dict, bits: dict) -> str:
    """Claim 6's verdict from the measured memory and step times."""
    f32, n4 = runs["float32"], runs["NF4 + double quant"]
    ratio = f32["teacher_memory"] / n4["teacher_memory"]
    slower = n4["step_s"] / f32["step_s"]
    compute = (f"but not compute: a step takes {n4['step_s']:.2f} s with the NF4 teacher vs {f32['step_s']:.2f} s "
               "with float32 (bitsandbytes dequantizes the weights in every forward pass on a CPU)" if slower > 1.05
               else f"and a step takes {n4['step_s']:.2f} s with the NF4 teacher vs {f32['step_s']:.2f} s with float32")
    return (f"Holds only partly: NF4 holds this teacher in {ratio:.1f}x less memory (its float32 embedding is "
            f"most of what is left) and a 7B teacher's weights in {7e9 * bits['NF4 + double quant'] / 8e9:.1f} GB "
            f"instead of {7e9 * bits['float32'] / 8e9:.0f} GB, which decides whether a large teacher fits "
            f"a machine, {compute}. At 135M parameters the whole process peaks at {n4['peak_rss'] / 1e6:.0f} MB "
            f"(NF4) vs {f32['peak_rss'] / 1e6:.0f} MB (float32): without quantization distillation was not "
            "impractical at this size.")


def claim7(b: Bench) -> dict:
    changes, name = b.depth(FRACTIONS[0])
    p, q = b.prune(changes, name), b.quantize("shared-nf4")
    ptq_art, qat_art = b.distill(name, p, q), b.distill(f"{name}-qat", p, q, qat="q4_0")
    ptq, qat = b.score(b.gguf(ptq_art, name), "PTQ Q4_0"), b.score(b.gguf(qat_art, f"{name}-qat"), "QAT Q4_0")
    nf4 = b.score(b.quantize("teacher-nf4", method="nf4", double_quant=False), "teacher NF4")
    dq = b.score(b.quantize("shared-nf4"), "teacher NF4 + double quant")
    # QLoRA at the full distillation's wall time: its step time from a short probe, then as many steps as fit
    full_s = sum(r["step_s"] for r in read_log(ptq_art))
    probe = b.distill(f"{name}-lora-probe", p, q, method="lora", lr=LORA_LR, steps=3, warmup_steps=1)
    lora_step = statistics.median(r["step_s"] for r in read_log(probe)[1:])
    lora_steps = max(2, round(full_s / lora_step))
    lora_art = b.distill(f"{name}-lora", p, q, method="lora", lr=LORA_LR, steps=lora_steps,
                         warmup_steps=max(1, lora_steps // 10))
    lora = b.score(b.gguf(lora_art, f"{name}-lora"), "QLoRA Q4_0")
    pruned = b.score(b.gguf(p, f"{name}/pruned"), "pruned, no distillation")
    lora_s = sum(r["step_s"] for r in read_log(lora_art))
    t1 = [f"| training | torch student ppl | Q4_0 ppl | {acc_head()} | train s |",
          "|---|---:|---:|" + "---:|" * len(TASKS) + "---:|",
          f"| none (pruned) | {p.metrics['ppl']:.2f} | {pruned['ppl']:.2f} | {acc(pruned)} | 0 |",
          f"| full distillation, {b.args.steps} steps, then Q4_0 (PTQ) | {ptq_art.metrics['ppl']:.2f} | "
          f"{ptq['ppl']:.2f} | {acc(ptq)} | {full_s:.0f} |",
          f"| full distillation, {b.args.steps} steps, Q4_0 QAT in the last half | {qat_art.metrics['ppl']:.2f} | "
          f"{qat['ppl']:.2f} | {acc(qat)} | {sum(r['step_s'] for r in read_log(qat_art)):.0f} |",
          f"| QLoRA (rank {lora_art.manifest['config'].get('lora_rank')}, NF4 base, lr {LORA_LR:g}), {lora_steps} "
          f"steps, then Q4_0 | {lora_art.metrics['ppl']:.2f} | {lora['ppl']:.2f} | {acc(lora)} | {lora_s:.0f} |"]
    t2 = ["| teacher | stored MB | held-out ppl | " + acc_head() + " |", "|---|---:|---:|" + "---:|" * len(TASKS)] + \
        [f"| {lab} | {r['bytes'] / 1e6:.2f} | {r['ppl']:.3f} | {acc(r)} |" for lab, r in
         (("NF4", nf4), ("NF4 + double quant", dq))]
    dq_cost = dq["ppl"] - nf4["ppl"]
    dl, sel = drop(lora, ptq)
    parts = [f"QAT {'beats' if qat['ppl'] < ptq['ppl'] else 'does not beat'} PTQ on the Q4_0 file's perplexity "
             f"({qat['ppl']:.2f} vs {ptq['ppl']:.2f}; accuracy {drop(qat, ptq)[0]:+.3f} ± {drop(qat, ptq)[1]:.3f} "
             "lower with QAT)",
             f"double quantization saves {(nf4['bytes'] - dq['bytes']) / 1e6:.2f} MB "
             f"({100 * (nf4['bytes'] - dq['bytes']) / nf4['bytes']:.1f}%) at ppl {dq_cost:+.3f}",
             f"QLoRA in the same wall time ({lora_steps} steps, {lora_s:.0f} s vs {full_s:.0f} s) reaches Q4_0 ppl "
             f"{lora['ppl']:.2f} vs {ptq['ppl']:.2f} for full distillation and {pruned['ppl']:.2f} untrained "
             f"(accuracy {dl:+.3f} ± {sel:.3f} below full distillation)"]
    n_hold = sum([qat["ppl"] < ptq["ppl"], abs(dq_cost) < 0.01 * nf4["ppl"], lora["ppl"] < pruned["ppl"]])
    verdict = ("Holds" if n_hold == 3 else "Holds only partly" if n_hold else "Fails") + " here: " + "; ".join(parts)
    return {"table": t1 + [""] + t2, "verdict": verdict + ".",
            "experiment": f"The {name} student distilled {b.args.steps} steps with post-training Q4_0 (PTQ) or with "
                          "Q4_0 fake quantization in the last half (QAT); the NF4 teacher with and without double "
                          "quantization; QLoRA healing (adapters on the NF4 student, merged into its dequantized "
                          "weights) given the full distillation's training wall time."}


def train_rows(folder: Path) -> list[dict]:
    """The training steps' rows of the distillation log in `folder` (evaluation rows left out)."""
    from pistill.compress.checkpoints import TRAIN_LOG, read_log

    return [r for r in read_log(folder / TRAIN_LOG) if "loss" in r]


def read_log(art) -> list[dict]:
    return train_rows(art.model_path())


RUNNERS = {1: claim1, 2: claim2, 3: claim3, 4: claim4, 5: claim5, 6: claim6, 7: claim7}


def write_doc(b: Bench, sections: dict, wall: float, path: Path) -> None:
    from pistill.artifact import machine_summary

    compute = sum(json.loads(m.read_text()).get("wall_s") or 0 for m in b.out.rglob("manifest.json"))
    runs = b.state["extra"].get("runs_s") or [wall]
    a = b.args
    lines = ["# The workflow's claims, measured", "",
             f"Measured by `python bench/claims.py --steps {a.steps} --items {a.items} --mc-start {a.mc_start}` on "
             f"{machine_summary()} (no GPU), teacher SmolLM2-135M-Instruct (the offline default), recipe "
             f"`{a.recipe}`. The invocations that built it took {sum(runs) / 60:.0f} min in all "
             f"({', '.join(f'{r / 60:.0f}' for r in runs)} min; a rerun reuses every stage and score), of which "
             f"{compute / 60:.0f} min in the stages' artifacts. Every distillation arm: {a.steps} steps of "
             f"{b.rec.configs['distill'].batch_size} x {b.rec.configs['data'].block_size} tokens from the recipe's "
             "data, the recipe's loss and learning rate, no QAT unless the arm says so. Zero-shot: acc_norm ± one "
             f"standard error on {a.items} items each of ARC-Easy and PIQA (items "
             f"{a.mc_start}-{a.mc_start + a.items - 1} "
             "of the public files, which neither the report's shipped items nor the default recipe's choice used). "
             "Held-out ppl: the data artifact's held-out blocks. 'Kept above chance': the share of the reference's "
             "accuracy above chance (0.25, 0.5) that a row keeps, mean over the tasks.", "",
             "| claim | verdict |", "|---|---|"]
    lines += [f"| {n}. {CLAIMS[n]} | {s['verdict'].split(':')[0].removesuffix(' here')} |" for n, s in sections.items()]
    lines.append("")
    for n, s in sections.items():
        lines += [f"## {n}. {CLAIMS[n]}", "", s["experiment"], "", *s["table"], "", f"**Verdict.** {s['verdict']}", ""]
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == MEMORY_CHILD:
        return memory_child(*sys.argv[2:5], int(sys.argv[5]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/default.toml")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of every distillation arm")
    ap.add_argument("--items", type=int, default=250, help="zero-shot items per task")
    ap.add_argument("--mc-data", type=Path, default=Path("../shared/data"), help="folder with arc_easy/piqa.jsonl")
    ap.add_argument("--mc-start", type=int, default=1500, help="first item used of each task file")
    ap.add_argument("--claims", default="1,2,3,4,5,6,7")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=None, help="Markdown verdicts (default docs/claims.md)")
    ap.add_argument("--quick", action="store_true", help="plumbing check: 2 steps, 20 items, no doc")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.items = 2, 20
    args.out = args.out or Path("runs/claims")
    doc = args.doc or (None if args.quick else Path("docs/claims.md"))
    t0 = time.perf_counter()
    b = Bench(args)
    b.shared()
    sections = {}
    for n in map(int, args.claims.split(",")):
        print(f"claim {n}: {CLAIMS[n]}", flush=True)
        sections[n] = RUNNERS[n](b)
        print(f"  verdict: {sections[n]['verdict']}", flush=True)
        b.state["extra"].setdefault("sections", {})[str(n)] = sections[n]
        b.save()
    wall = time.perf_counter() - t0
    b.state["extra"].setdefault("runs_s", []).append(round(wall))  # every invocation's wall time, for the doc
    b.save()
    if doc is not None:
        write_doc(b, sections, wall, doc)
        print(f"wrote {doc} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
