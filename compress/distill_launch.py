"""The distill stage's training on several processes: `accelerate launch` (DDP) or torchrun, CPUs or GPUs.

    accelerate launch --num_processes 8 compress/distill_launch.py --run RUN_DIR [--recipe R.toml] [--steps N]
    torchrun --standalone --nproc_per_node 2 compress/distill_launch.py --teacher DIR --student DIR --data DIR

(`accelerate launch --cpu` starts several CPU processes only through MPI; torchrun does it with gloo.)

The teacher, the student and the data are the `quantize`, `prune` and `data` artifacts of RUN_DIR (or given one
by one). Every rank holds the student and the teacher, takes its own blocks and all-reduces the gradients (DDP), so
a step consumes batch_size x grad_accum x processes blocks. The main process checkpoints (resumable, like the
stage), logs, and saves the student as an HF folder in --out (default RUN_DIR/distill-ddp) with train_log.jsonl.
With `[distill] method = "lora"` each rank trains the adapters on its own frozen base (DDP reduces their gradients
alone) and the main process saves the merged model, as the stage does.
`--hash-dir DIR`: each rank writes the sha256 of its final weights to DIR/rank<r>.sha256 (they must agree).
`--fsdp-teacher`: a teacher too large for one device is sharded across the processes with torch FSDP
(`fully_shard`, one unit per decoder layer): each rank keeps 1/N of its weights and gathers one layer at a time
during the forward pass. It needs an unquantized teacher (`--teacher RUN/teacher`); the student stays in DDP.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("pistill.compress.distill_launch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run folder holding quantize/, prune/ and data/ artifacts")
    p.add_argument("--teacher", type=Path, help="teacher artifact (default RUN/quantize)")
    p.add_argument("--student", type=Path, help="student artifact (default RUN/prune)")
    p.add_argument("--data", type=Path, help="data artifact (default RUN/data)")
    p.add_argument("--recipe", type=Path, help="take [distill] from this recipe (built-in defaults otherwise)")
    p.add_argument("--steps", type=int, help="override [distill] steps")
    p.add_argument("--out", type=Path, help="where the student goes (default RUN/distill-ddp)")
    p.add_argument("--hash-dir", type=Path, help="each rank writes the sha256 of its final weights here")
    p.add_argument("--fsdp-teacher", action="store_true",
                   help="shard the (unquantized) teacher across the processes with FSDP instead of a copy per rank")
    args = p.parse_args(argv)
    for name, stage in (("teacher", "quantize"), ("student", "prune"), ("data", "data"), ("out", "distill-ddp")):
        if getattr(args, name) is None:
            if args.run is None:
                p.error(f"--{name} is needed without --run")
            setattr(args, name, args.run / stage)
    return args


def state_digest(model) -> str:
    """sha256 of a model's state_dict, tensors in name order (any dtype: the raw bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shard_teacher(folder: Path, device: str):
    """The teacher in `folder` sharded across the launched processes with FSDP2
    (`torch.distributed.fsdp.fully_shard`): one unit per decoder layer plus the root (embeddings, final norm,
    output layer). Loaded in host memory first;
    each rank then keeps 1/N of every weight on `device` and all-gathers a layer's weights only for its forward
    pass. Forward-only (the teacher is never trained), so there are no gradients or optimizer state to shard."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from pistill.models import read_config

    if "quantization_config" in read_config(folder):
        raise SystemExit(f"--fsdp-teacher: {folder} is a bitsandbytes-quantized teacher, which FSDP cannot shard; "
                         "pass the unquantized one (--teacher RUN/teacher)")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def config(args: argparse.Namespace):
    from pistill.compress.distill import DistillConfig
    from pistill.recipe import load

    cfg = load(args.recipe).configs["distill"] if args.recipe else DistillConfig()
    return dataclasses.replace(cfg, steps=args.steps) if args.steps else cfg


def main(argv: list[str] | None = None) -> None:
    import torch

    from pistill.artifact import Artifact, input_key
    from pistill.compress import distill
    from pistill.compress.quantize import load_teacher

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args, dist = parse_args(argv), distill.distributed()
    cfg, world = config(args), dist.num_processes if dist else 1
    inputs = {"quantize": Artifact.load(args.teacher), "prune": Artifact.load(args.student),
              "data": Artifact.load(args.data)}  # the distill stage's inputs, by name
    t_dir, s_dir = inputs["quantize"].model_path(), inputs["prune"].model_path()
    blocks, heldout = distill.check_inputs(t_dir, s_dir, inputs["data"])
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if args.fsdp_teacher and dist is None:
        raise SystemExit("--fsdp-teacher shards the teacher across processes: start several with accelerate launch "
                         "or torchrun")
    teacher = shard_teacher(t_dir, device) if args.fsdp_teacher else load_teacher(t_dir, device)
    key = f"{input_key('distill', cfg, inputs)}:world={world}"  # another world size sees other blocks
    work = distill.checkpoint_dir(args.out)
    student, summary = distill.distil(teacher, s_dir, device, blocks, heldout, cfg, work, key)
    if args.hash_dir:
        rank = dist.process_index if dist else 0
        args.hash_dir.mkdir(parents=True, exist_ok=True)
        (args.hash_dir / f"rank{rank}.sha256").write_text(state_digest(student) + "\n")
    if dist is None or dist.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        distill.save_student(student, s_dir, work, args.out)
        shutil.rmtree(work, ignore_errors=True)
        log.info("%d processes, %d steps, loss %.4f -> %.4f, %.0f tok/s; student in %s", world, summary["steps"],
                 summary["loss_first"], summary["loss_last"], summary["tokens_per_s"], args.out)


if __name__ == "__main__":
    main()
