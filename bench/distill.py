"""Distillation figures: what knowledge distillation gives back to the pruned student, and how fast it trains.

    python bench/distill.py [--recipe recipes/default.toml] [--mc-data /path/to/data] [--mc-items 200]
                            [--out runs/bench-distill]
    python bench/distill.py --throughput --teacher-config T.json --student-config S.json [--steps 10]
                            [--batch-size 8] [--block-size 1024] [--peak-tflops 989]

Quality mode runs the recipe's teacher, data, prune, quantize and distill stages into `--out` (reusing those
already there with the same inputs), then prints one row per model (teacher, pruned student, distilled student):
held-out perplexity, top-1 agreement and KL against the teacher (pistill.evaluate), and zero-shot accuracy on the
first `--mc-items` items of ARC-Easy and PIQA (`arc_easy.jsonl`, `piqa.jsonl` in `--mc-data`, pistill.mc_eval).
It writes `distill.json` (rows, distillation tokens/s, machine, package versions) and `loss.png` (the training
loss curve from train_log.jsonl). Results are written after each model, so an interrupted run keeps what it has.

Throughput mode builds the teacher and the student from two HF config.json files with random weights and times
distillation steps (`compress.distill.train`) on random tokens on this machine's device: tokens/s and, given
the device's peak, model FLOPs utilisation, counting 6 N_student + 2 N_teacher FLOPs per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

MC_SETS = {"arc_easy": "arc_easy.jsonl", "piqa": "piqa.jsonl"}
MC_SUFFIX = "\nAnswer:"  # lm-eval's ARC / PIQA prompt: "Question: ...\nAnswer:" then " " + choice


# --- quality ------------------------------------------------------------------------------------------------------

def stages(names: tuple[str, ...], configs: dict, out: Path, arts: dict) -> dict:
    """Add the artifacts of stages `names` to `arts`, each run unless an identical one is already in `out`."""
    from pistill.pipeline import run_stage, stage

    for name in names:
        st = stage(name)
        t0 = time.perf_counter()
        arts[name], ran = run_stage(st, arts, configs[name], out / name, force=False)
        print(f"{name}: {'ran' if ran else 'reused'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return arts


def model_row(label: str, folder: Path, data, mc: dict) -> dict:
    """Held-out metrics and multiple-choice accuracy of the HF model in `folder`."""
    from pistill.evaluate import evaluate_torch
    from pistill.mc_eval import evaluate_mc
    from pistill.models import load_model, load_tokenizer

    model, tok = load_model(folder), load_tokenizer(folder)
    row = {"model": label, **evaluate_torch(model, data)}
    for name, items in mc.items():
        t0 = time.perf_counter()
        row[name] = evaluate_mc(model, tok, items)
        print(f"  {label} {name}: acc {row[name]['acc']:.3f} acc_norm {row[name]['acc_norm']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    names = [k for k in MC_SETS if k in rows[0]]
    head = "| model | ppl | agreement | KL | " + " | ".join(f"{n} acc / acc_norm" for n in names) + " |"
    lines = [head, "|---" + "|---:" * (3 + len(names)) + "|"]
    for r in rows:
        mc = " | ".join(f"{r[n]['acc']:.3f} / {r[n]['acc_norm']:.3f}" for n in names)
        lines.append(f"| {r['model']} | {r['ppl']:.3f} | {r['agreement']:.4f} | {r['kl']:.4f} | {mc} |")
    return "\n".join(lines)


def plot_loss(train_log: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train (per step)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distillation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def quality(args: argparse.Namespace) -> None:
    """The teacher and the pruned student are scored before distillation runs, so an interrupted run keeps them."""
    from pistill.artifact import environment, machine_summary
    from pistill.mc_eval import read_items
    from pistill.recipe import load

    args.out.mkdir(parents=True, exist_ok=True)
    recipe = load(args.recipe)
    if args.generate is not None:
        recipe = recipe.with_config("data", generate=args.generate)
    mc = {n: read_items(args.mc_data / f, args.mc_items, MC_SUFFIX) for n, f in MC_SETS.items()
          if args.mc_data and (args.mc_data / f).is_file()}
    result = {"schema_version": 1, "recipe": str(args.recipe), "machine": machine_summary(),
              "environment": environment(),
              "data_config": dataclasses.asdict(recipe.configs["data"]), "mc_items": args.mc_items, "rows": []}
    arts = stages(("teacher", "data", "prune"), recipe.configs, args.out, {})
    for label, name in (("teacher", "teacher"), ("pruned", "prune")):
        result["rows"].append(model_row(label, arts[name].model_path(), arts["data"], mc))
        (args.out / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    stages(("quantize", "distill"), recipe.configs, args.out, arts)
    d = arts["distill"].metrics
    result |= {"distill_config": arts["distill"].manifest["config"],
               "distill_wall_s": arts["distill"].manifest["wall_s"],
               "distill": {k: d.get(k) for k in ("steps", "loss_first", "loss_last", "eval_loss", "tokens_per_s")}}
    plot_loss(arts["distill"].path / "train_log.jsonl", args.out / "loss.png")
    result["rows"].append(model_row("distilled", arts["distill"].model_path(), arts["data"], mc))
    (args.out / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["rows"]))
    print(f"distillation: {d['steps']} steps at {d['tokens_per_s']:.0f} tok/s; wrote {args.out / 'distill.json'}, "
          f"{args.out / 'loss.png'} ({result['machine']})")


# --- throughput ---------------------------------------------------------------------------------------------------

def random_model(config_json: Path, device: str):
    """A causal LM with random weights built from an HF config.json (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_json)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device)


def throughput(args: argparse.Namespace) -> dict:
    """Distillation tokens/s (and MFU given --peak-tflops) of a random teacher / student pair."""
    import numpy as np
    import torch

    from pistill.artifact import machine_summary
    from pistill.compress.distill import DistillConfig, train
    from pistill.models import count_params, torch_device

    device = torch_device()
    teacher, student = random_model(args.teacher_config, device).eval(), random_model(args.student_config, device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit(f"teacher vocab {teacher.config.vocab_size} != student vocab {student.config.vocab_size}")
    n = args.batch_size * (args.steps + 1)
    blocks = np.random.default_rng(0).integers(0, student.config.vocab_size, (n, args.block_size)).astype(np.int32)
    cfg = DistillConfig(steps=args.steps + 1, batch_size=args.batch_size, warmup_steps=1, eval_every=0,
                        ckpt_every=0, threads=args.threads)
    t0 = time.perf_counter()
    train(student, teacher, blocks, blocks[:1], dataclasses.replace(cfg, steps=1))  # warm-up step, not timed
    warm_s = time.perf_counter() - t0
    summary = train(student, teacher, blocks, blocks[:1], dataclasses.replace(cfg, steps=args.steps))
    n_t, n_s = count_params(teacher), count_params(student)
    flops_per_token = 6 * n_s + 2 * n_t  # forward + backward of the student, forward of the teacher
    tflops = flops_per_token * summary["tokens_per_s"] / 1e12
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else machine_summary(), "teacher_params": n_t,
           "student_params": n_s, "batch_size": args.batch_size, "block_size": args.block_size,
           "steps": args.steps, "warmup_s": warm_s, "tokens_per_s": summary["tokens_per_s"], "model_tflops": tflops,
           "mfu": tflops / args.peak_tflops if args.peak_tflops else None}
    print(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=Path("recipes/default.toml"), help="quality: the recipe")
    p.add_argument("--mc-data", type=Path, help="quality: folder with arc_easy.jsonl and piqa.jsonl")
    p.add_argument("--mc-items", type=int, default=200, help="quality: items per multiple-choice set")
    p.add_argument("--out", type=Path, default=Path("runs/bench-distill"), help="quality: artifacts and JSON")
    p.add_argument("--generate", type=int, help="quality: override [data] generate (teacher answers; 0: none)")
    p.add_argument("--throughput", action="store_true", help="time a random teacher / student pair instead")
    p.add_argument("--teacher-config", type=Path, help="throughput: the teacher's HF config.json")
    p.add_argument("--student-config", type=Path, help="throughput: the student's HF config.json")
    p.add_argument("--steps", type=int, default=5, help="throughput: timed optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="throughput: blocks per step")
    p.add_argument("--block-size", type=int, default=256, help="throughput: tokens per block")
    p.add_argument("--threads", type=int, default=0, help="throughput: torch CPU threads (0: default)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="throughput: device peak for MFU (H100 bf16 989)")
    args = p.parse_args(argv)
    if args.throughput:
        if not (args.teacher_config and args.student_config):
            p.error("--throughput needs --teacher-config and --student-config")
        return throughput(args)
    quality(args)
    return None


if __name__ == "__main__":
    main()
