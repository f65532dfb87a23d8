"""The `pistill` command line: run a recipe, or one stage on artifact folders."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("pistill")
STAGE_COMMANDS = {  # subcommand -> pipeline stages it runs
    "prune": ["prune"], "quantize": ["quantize"], "distill": ["distill"], "export": ["gguf", "onnx"],
    "bench": ["bench"], "report": ["report"],
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pistill", description="Prune, quantize, distill and export an LLM for a "
                                "Raspberry Pi, and benchmark it on the device.")
    p.add_argument("--version", action="version", version=f"pistill {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every stage of a recipe (skipping unchanged ones)")
    r.add_argument("recipe", help="recipe TOML file, e.g. recipes/default.toml")
    r.add_argument("--out", help="run folder (default: the recipe's `out`, else runs/<recipe name>)")
    r.add_argument("--force", metavar="STAGE", help="rerun this stage and every stage after it")
    r.add_argument("--target", help="benchmark target: 'local' or user@host (overrides [bench] target)")
    for name, stages in STAGE_COMMANDS.items():
        s = sub.add_parser(name, help=f"run the {'/'.join(stages)} stage alone on a run folder's artifacts")
        s.add_argument("run_dir", help="run folder holding the input artifacts (<run>/<stage>/)")
        s.add_argument("--recipe", help="take this stage's options from a recipe (default: built-in defaults)")
        s.add_argument("--input", action="append", default=[], metavar="STAGE=DIR",
                       help="use DIR as the input artifact of STAGE instead of <run>/<STAGE>")
        s.add_argument("--out", help="output folder (default: <run>/<stage>); only with a single stage")
        if name == "bench":
            s.add_argument("--target", help="'local' or user@host (overrides [bench] target)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' per-tensor bars; we show stages
    _setup_logging(args.verbose)
    from .artifact import ArtifactError
    from .models import TeacherError
    from .recipe import RecipeError

    try:
        return _run(args) if args.command == "run" else _stage(args)
    except RecipeError as e:
        print(f"pistill: error: {e}", file=sys.stderr)
        return 2
    except (TeacherError, ArtifactError, ValueError, FileNotFoundError) as e:
        print(f"pistill: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pistill: interrupted; finished stages are kept, rerun to resume", file=sys.stderr)
        return 130


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # stdout carries only a command's result (the report path); logs and progress go to stderr
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=True)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_recipe(path: str | None):
    from . import recipe

    return recipe.load(path) if path else recipe.from_dict({})


def _run(args) -> int:
    from . import pipeline

    rec = _load_recipe(args.recipe)
    if args.target:
        rec = rec.with_config("bench", target=args.target)
    if args.force:
        pipeline.stage(args.force)  # a clear error for an unknown stage name
    out = Path(args.out or rec.out)
    arts = pipeline.run(rec.configs, out, force=args.force)
    print(arts["report"].path / "report.md")
    return 0


def _stage(args) -> int:
    from . import pipeline
    from .artifact import Artifact

    rec = _load_recipe(args.recipe)
    if getattr(args, "target", None):
        rec = rec.with_config("bench", target=args.target)
    run_dir, overrides = Path(args.run_dir), dict(_pair(s) for s in args.input)
    stages = STAGE_COMMANDS[args.command]
    if args.out and len(stages) > 1:
        raise ValueError(f"--out names one folder but '{args.command}' writes {len(stages)} artifacts; "
                         f"omit --out (they go to {run_dir}/<stage>)")
    for name in stages:
        st = pipeline.stage(name)
        inputs = [Artifact.load(overrides.get(n, run_dir / n), stage=n) for n in st.inputs]
        out = Path(args.out) if args.out else run_dir / name
        art, _ = pipeline.run_stage(st, inputs, rec.configs[name], out, force=True)
        print(art.path)
    return 0


def _pair(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:
        raise ValueError(f"--input '{text}' must look like STAGE=DIR, e.g. --input distill=runs/x/distill")
    return name, Path(path)


if __name__ == "__main__":
    sys.exit(main())
