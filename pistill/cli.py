"""The `pistill` command line: run a recipe, or one stage on artifact folders."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import faulthandler
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import UsageError
from .rundir import clean_scratch

log = logging.getLogger("pistill")


def stage_commands() -> dict[str, list[str]]:
    """{subcommand: the pipeline stages it runs}, in pipeline order, from the stage table's `command` fields."""
    from .pipeline import STAGES

    commands: dict[str, list[str]] = {}
    for st in STAGES:
        if st.command:
            commands.setdefault(st.command, []).append(st.name)
    return commands


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
    r.add_argument("--eval-items", type=int, metavar="N",
                   help="multiple-choice items per task (overrides [eval] items; 0 = all), e.g. 500 for the full report")
    for name, stages in stage_commands().items():
        s = sub.add_parser(name, help=f"run the {'/'.join(stages)} stage alone on a run folder's artifacts")
        s.add_argument("run_dir", help="run folder holding the input artifacts (<run>/<stage>/)")
        s.add_argument("--recipe", help="take this stage's options from a recipe (default: built-in defaults)")
        s.add_argument("--input", action="append", default=[], metavar="STAGE=DIR",
                       help="use DIR as the input artifact of STAGE instead of <run>/<STAGE>")
        s.add_argument("--out", help="output folder (default: <run>/<stage>); only with a single stage")
        if name == "bench":
            s.add_argument("--target", help="'local' or user@host (overrides [bench] target)")
        if name == "eval":
            s.add_argument("--items", dest="eval_items", type=int, metavar="N",
                           help="items per task (overrides [eval] items; 0 = all)")
    v = sub.add_parser("verify", help="check every artifact of a run folder against its manifest's sha256")
    v.add_argument("run_dir", help="run folder (or one artifact folder)")
    _search_parser(sub)
    _device_parsers(sub)
    _deploy_parsers(sub)
    return p


def _search_parser(sub) -> None:
    s = sub.add_parser("search", help="find the best student for a decode-speed and memory budget on a device, by "
                       "building and measuring trials (Optuna)")
    s.add_argument("recipe", help="recipe TOML file, e.g. recipes/default.toml ([search] holds the space)")
    s.add_argument("--target", help="'local', user@host, or several joined by commas (overrides [bench] target)")
    s.add_argument("--min-decode-tok-s", type=float, metavar="X", help="decode at least X tok/s on the target")
    s.add_argument("--max-memory-mb", type=float, metavar="MB", help="peak memory at most MB on the target")
    s.add_argument("--trials", type=int, metavar="N", help="trials to build and measure (overrides [search] trials)")
    s.add_argument("--out", help="search folder (default: the recipe's out + '-search')")


def _device_parsers(sub) -> None:
    """`doctor` and `trust`: look at a device, and accept its SSH host key."""
    d = sub.add_parser("doctor", help="check a device: board, CPU features, memory, disk, OS, Python, heat")
    t = sub.add_parser("trust", help="show a device's SSH host key fingerprint and add it to known_hosts")
    for s in (d, t):
        s.add_argument("target", help="'local', user@host[:port] or a Host alias from ~/.ssh/config")
        s.add_argument("--accept-host-key", metavar="SHA256:...", help="trust the host key with this fingerprint")
        s.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
        s.add_argument("--ssh-config", help="ssh config file (default ~/.ssh/config)")
    d.add_argument("--model", help="a model file or folder, to check it fits in memory and on disk")
    d.add_argument("--python", default="python3", help="the device's python to check (default python3)")
    d.add_argument("--cache", default="~/.cache/pistill", help="the cache folder on the device (for free disk)")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _deploy_parsers(sub) -> None:
    """`deploy`, `status`, `undeploy`: a model served on devices by llama-cpp-python's OpenAI-compatible server."""
    d = sub.add_parser("deploy", help="serve a model on a device (OpenAI-compatible API): checked before and after an "
                       "atomic switch, rolled back on failure")
    d.add_argument("run_dir", nargs="?", metavar="RUN_DIR|MODEL.gguf",
                   help="run folder (its --model GGUF) or a .gguf file; none with --rollback")
    d.add_argument("--model", help="which GGUF of the run folder: student (default), baseline, baseline:Q8_0 ...")
    d.add_argument("--port", type=int, help="the service's port on the device (default 8080)")
    d.add_argument("--listen", help="address to listen on (default 127.0.0.1; others need an API key)")
    key = d.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", help="file holding the API key clients must send")
    key.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    d.add_argument("--ctx", type=int, help="context length in tokens (default 2048)")
    d.add_argument("--threads", type=int, help="llama.cpp threads (default: llama-cpp-python's, half the cores)")
    d.add_argument("--service", help="systemd-user, systemd, supervised or auto (default: the first that works)")
    d.add_argument("--check-timeout", type=float, dest="check_timeout_s", metavar="S",
                   help="seconds a server gets to load and answer its check (default 120)")
    d.add_argument("--rollback", action="store_true", help="serve the previous release again")
    s = sub.add_parser("status", help="what a device serves: model, port, pid, since, memory")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    u = sub.add_parser("undeploy", help="stop a served model and remove its service and releases")
    for p in (d, s, u):
        p.add_argument("--target", help="'local', user@host[:port], an ssh_config alias, or several joined by commas "
                       "(the first deploys alone, as the canary); default: the recipe's [bench] target(s)")
        p.add_argument("--recipe", help="take the [deploy] options (and the [bench] targets) from a recipe")
        p.add_argument("--name", help="the deployment's name: its unit pistill-NAME and API model alias (default "
                       "pistill)")
        p.add_argument("--cache", help="the cache folder on the device (default ~/.cache/pistill)")
        p.add_argument("--python", help="the device's python (default: pistill's venv there, as for the bench)")
        p.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
        p.add_argument("--ssh-config", help="ssh config file (default ~/.ssh/config)")
        p.add_argument("--accept-host-key", metavar="SHA256:...", help="trust the host key with this fingerprint")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' per-tensor bars; we show stages
    _enable_faulthandler()
    _exit_on_sigterm()
    _setup_logging(args.verbose)
    clean_scratch()  # temporaries of pistill processes that were killed (SIGKILL leaves them)
    from .errors import UserError

    try:
        if args.command in ("doctor", "trust"):
            return {"doctor": _doctor, "trust": _trust}[args.command](args)
        if args.command in ("deploy", "status", "undeploy"):
            return {"deploy": _deploy, "status": _status, "undeploy": _undeploy}[args.command](args)
        if args.command == "search":
            return _search(args)
        if args.command == "verify":
            return _verify(args)
        return _run(args) if args.command == "run" else _stage(args)
    except UserError as e:  # the user can fix it: one line (and the traceback with -v); anything else is a bug
        if args.verbose:
            import traceback
            traceback.print_exc()
        print(f"pistill: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pistill: interrupted; finished stages are kept, rerun to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:  # any other OSError is a bug: its traceback
            raise
        if args.verbose:
            import traceback
            traceback.print_exc()
        name = str(e.filename or "")
        print(f"pistill: error: the path {name[:60]}{'...' if len(name) > 60 else ''} is too long for the file "
              "system (over 255 bytes in one name); shorten it", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _enable_faulthandler() -> None:
    """A native crash (llama.cpp, onnxruntime) prints its Python stack instead of dying silently."""
    try:
        faulthandler.enable()
    except (RuntimeError, ValueError, OSError):  # stderr without a file descriptor (pytest capsys, notebooks)
        pass


def _exit_on_sigterm() -> None:
    """SIGTERM (kill, systemd, a CI timeout) unwinds like Ctrl-C: temporary folders are removed on the way out."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (pistill.cli.main called from a library's worker)
        pass


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # stdout carries only a command's result (the report path); logs and progress go to stderr
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=True)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "gguf", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_recipe(path: str | None):
    from . import recipe

    return recipe.load(path) if path is not None else recipe.from_dict({})  # "" is a bad path, not "no recipe"


def _overridden(rec, args):
    """The recipe with the command line's --target and --eval-items / --items applied."""
    if getattr(args, "target", None) is not None:
        _target_specs(args.target)
        rec = rec.with_config("bench", target=args.target)
    if getattr(args, "eval_items", None) is not None:
        rec = rec.with_config("eval", items=args.eval_items)
    return rec


def _run(args) -> int:
    from . import pipeline

    rec = _overridden(_load_recipe(args.recipe), args)
    if args.force and args.force not in pipeline.BY_NAME:
        raise UsageError(f"--force: stage '{args.force}' is unknown; stages: {', '.join(pipeline.BY_NAME)}")
    out = Path(args.out or rec.out).expanduser()
    arts = pipeline.run(rec.configs, out, force=args.force)
    print(arts["report"].path / "report.md")
    return 0


def _search(args) -> int:
    from .search import run_search

    rec = _load_recipe(args.recipe)
    changes = {k: v for k, v in (("min_decode_tok_s", args.min_decode_tok_s), ("max_memory_mb", args.max_memory_mb),
                                 ("trials", args.trials)) if v is not None}
    try:
        cfg = dataclasses.replace(rec.search, **changes)
        bench = rec.configs["bench"]
        if args.target is not None:
            specs = _target_specs(args.target)
            bench = dataclasses.replace(bench, target=specs[0] if len(specs) == 1 else "local",
                                        targets=specs if len(specs) > 1 else [], inventory="")
    except ValueError as e:
        raise UsageError(f"search: {e}") from None
    out = Path(args.out or f"{rec.out.rstrip('/')}-search").expanduser()
    print(run_search(rec, cfg, out, bench))
    return 0


def _target_specs(text: str) -> list[str]:
    """`--target a,b` as its targets; UsageError for an empty one (`--target ,` used to benchmark locally)."""
    specs = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in specs):
        raise UsageError(f"--target {text!r} names an empty target; give 'local', user@host, or several joined by "
                         "commas (pi@a,pi@b)")
    return specs


def _verify(args) -> int:
    """Every problem on its own stdout line with the command that rebuilds it; exit 1 when there is any."""
    from .pipeline import rerun_hint
    from .verify import artifact_folders, notes, verify_run

    run_dir = Path(args.run_dir).expanduser()
    bad = verify_run(run_dir)
    for stage_name, folder, problem in bad:
        print(f"{problem}; {rerun_hint(stage_name, folder.parent)}" if stage_name else problem)
    for note in notes(run_dir):
        log.warning(note)
    n = len(artifact_folders(run_dir))
    log.info("%d artifact(s) checked in %s: %s", n, run_dir, f"{len(bad)} problem(s)" if bad else "all intact")
    return 1 if bad else 0


def _stage(args) -> int:
    from . import pipeline
    from .artifact import Artifact

    rec = _overridden(_load_recipe(args.recipe), args)
    stages = stage_commands()[args.command]
    run_dir, overrides = Path(args.run_dir).expanduser(), _overrides(args.input, stages)
    if args.out and len(stages) > 1:
        raise UsageError(f"--out names one folder but '{args.command}' writes {len(stages)} artifacts; "
                         f"omit --out (they go to {run_dir}/<stage>)")
    for name in stages:
        st = pipeline.stage(name)
        out = Path(args.out).expanduser() if args.out else run_dir / name
        _check_out(out, run_dir)
        with _lock(out, run_dir):  # before reading the inputs: another run may be writing them
            inputs = {n: Artifact.load(overrides.get(n, run_dir / n), stage=n) for n in st.inputs}
            art, _ = pipeline.run_stage(st, inputs, rec.configs[name], out, force=True)
        print(art.path)
    return 0


def _overrides(pairs: list[str], stages: list[str]) -> dict[str, Path]:
    """`--input STAGE=DIR` options as {stage: DIR}; a STAGE that none of `stages` reads is refused."""
    from . import pipeline

    valid = sorted({n for s in stages for n in pipeline.stage(s).inputs})
    out = {}
    for text in pairs:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise UsageError(f"--input '{text}' must look like STAGE=DIR, e.g. --input distill=runs/x/distill")
        if name not in valid:
            raise UsageError(f"--input {text}: '{'/'.join(stages)}' reads no stage '{name}'; "
                             f"valid: {', '.join(valid)}")
        out[name] = Path(path).expanduser()
    return out


def _check_out(out: Path, run_dir: Path) -> None:
    """Refuse an --out that is or holds the run folder (its inputs are checked by the artifact writer)."""
    where, run = out.resolve(), run_dir.resolve()
    if where == run or where in run.parents:
        raise UsageError(f"--out {out} is or holds the run folder {run_dir}; writing there would delete it: "
                         f"choose another --out, e.g. {run_dir / 'x'}")


def _lock(out: Path, run_dir: Path):
    """The run folder's lock when the stage writes into an existing run folder (the default, or an --out in one)."""
    import contextlib

    from .rundir import LOCK, locked

    inside = out.parent.resolve() == run_dir.resolve() or (out.parent / LOCK).is_file()
    return locked(out.parent) if inside and out.parent.is_dir() else contextlib.nullcontext()


def _doctor(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from .artifact import dir_bytes
    from .device import doctor, target

    if args.target == target.LOCAL:
        facts = doctor.probe(None, args.cache, args.python)
    else:
        with target.connect(target.parse_target(args.target, args.ssh_config), args.known_hosts,
                            args.accept_host_key, args.ssh_config) as conn:
            facts = doctor.probe(conn, args.cache, args.python)
    report = doctor.diagnose(facts, dir_bytes(_model_path(args.model)) if args.model is not None else None)
    if args.json:
        print(json.dumps({"target": args.target, **report}, indent=2))
        return 0
    table = Table(show_header=False, box=None)
    for name, value in doctor.rows(args.target, report):
        table.add_row(f"[bold]{name}[/]", value)
    console = Console()
    console.print(table)
    for note in report["warnings"]:
        console.print(f"[yellow]warning:[/] {note}", highlight=False)
    return 0


def _model_path(text: str) -> Path:
    """`doctor --model`: a model file or folder that exists (it used to report a missing one as 0 bytes)."""
    path = Path(text).expanduser()
    if not text or not (path.is_file() or path.is_dir()):
        raise UsageError(f"--model {text!r} is not a model file or folder; give the .gguf file or the model folder")
    return path


def _trust(args) -> int:
    from .device import target

    tgt = target.parse_target(args.target, args.ssh_config)
    fp, state = target.trust(tgt, args.accept_host_key, args.known_hosts, args.ssh_config)
    if state == "unconfirmed" and sys.stdin.isatty():
        answer = input(f"{tgt.host_key_name} offers host key {fp}. Trust it? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            fp, state = target.trust(tgt, fp, args.known_hosts, args.ssh_config)
    known = target.known_hosts_path(tgt, args.known_hosts)
    if state == "unconfirmed":
        print(f"pistill: {tgt.host_key_name} offers host key {fp}; check it on the device "
              f"(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and rerun with --accept-host-key {fp}",
              file=sys.stderr)
        return 1
    print(f"{tgt.host_key_name} {fp}: {'already in' if state == 'known' else 'added to'} {known}")
    return 0


def _deploy_setup(args):
    """(targets, DeployConfig, SSHOptions) from the command line; UsageError for a bad value."""
    from .device.deploy import SSHOptions

    rec = _load_recipe(args.recipe)
    if args.target is not None:
        specs = _target_specs(args.target)
    elif args.recipe is not None:
        try:
            specs = rec.configs["bench"].fleet()
        except ValueError as e:
            raise UsageError(f"{args.command}: {e}") from None
    else:
        raise UsageError(f"{args.command} needs --target (local, user@host, or several joined by commas) or a "
                         "--recipe whose [bench] names the devices")
    if args.accept_host_key is not None and len(specs) > 1:
        raise UsageError("--accept-host-key names one device's key; trust each device first (pistill trust TARGET)")
    names = ("model", "port", "listen", "api_key_file", "api_key_env", "ctx", "threads", "service", "check_timeout_s",
             "name", "cache", "python")
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        cfg = dataclasses.replace(rec.deploy, **given)  # the command line over the recipe's [deploy]
    except ValueError as e:
        raise UsageError(f"{args.command}: {e}") from None
    return specs, cfg, SSHOptions(args.known_hosts, args.ssh_config, args.accept_host_key)


def _deploy(args) -> int:
    from .device import deploy

    specs, cfg, ssh = _deploy_setup(args)
    if args.rollback and args.run_dir is not None:
        raise UsageError("--rollback serves the previous release again and takes no model; drop the model argument")
    if args.rollback:
        rows = [deploy.rollback(spec, cfg, ssh) for spec in specs]
    elif args.run_dir is None:
        raise UsageError("deploy needs a run folder or a .gguf file (or --rollback)")
    elif len(specs) == 1:
        rows = [deploy.deploy(args.run_dir, specs[0], cfg, ssh)]
    else:
        rows = list(deploy.deploy_fleet(args.run_dir, specs, cfg, ssh).values())
    _deploy_table(rows)
    for row in rows:
        if "error" in row:
            print(f"pistill: error: {_one_line(Exception(row['error']))}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


def _deploy_table(rows: list[dict]) -> None:
    """The summary per device, and how to reach a loopback endpoint through SSH."""
    from rich.console import Console
    from rich.table import Table

    table = Table("target", "model", "sha256", "service", "endpoint", "health", "TTFT s", "decode tok/s", "note")
    for r in rows:
        note = r.get("error") or ("uploaded nothing (already there)" if r.get("skipped")
                                  else f"uploaded {r['uploaded_bytes'] / 1e6:.1f} MB" if "uploaded_bytes" in r else "")
        table.add_row(r["target"], r.get("model", ""), (r.get("sha256") or "")[:12], r.get("service", ""),
                      r.get("endpoint", ""), r.get("health", "[red]failed[/]" if "error" in r else ""),
                      f"{r['ttft_s']:.3f}" if "ttft_s" in r else "", f"{r['decode_tps']:.1f}" if "decode_tps" in r
                      else "", note)
    console = Console(width=200)
    console.print(table)
    for r in rows:
        if "error" not in r and r["target"] != "local" and r.get("endpoint", "").startswith("http://127.0.0.1:"):
            port = r["endpoint"].rsplit(":", 1)[1].split("/")[0]
            console.print(f"reach it: ssh -N -L {port}:127.0.0.1:{port} {r['target']}  then  curl "
                          f"http://127.0.0.1:{port}/v1/models", highlight=False, soft_wrap=True)


def _status(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from .device import deploy

    specs, cfg, ssh = _deploy_setup(args)
    rows = [deploy.status(spec, cfg.name, ssh, cfg.cache, cfg.python) for spec in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table("target", "name", "running", "service", "endpoint", "sha256", "pid", "RSS MB", "since", "previous")
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"])) if r.get("since") else ""
        table.add_row(r["target"], r["name"], "yes" if r.get("running") else "no" if r.get("deployed") else
                      "not deployed", r.get("kind") or "", r.get("endpoint") or "", (r.get("sha256") or "")[:12],
                      str(r.get("pid") or ""), f"{r['rss_mb']:.0f}" if r.get("rss_mb") else "", since,
                      ((r.get("previous") or {}).get("sha256") or "")[:12])
    Console(width=200).print(table)
    return 0


def _undeploy(args) -> int:
    from .device import deploy

    specs, cfg, ssh = _deploy_setup(args)
    for spec in specs:
        r = deploy.undeploy(spec, cfg.name, ssh, cfg.cache, cfg.python)
        print(f"{spec}: {cfg.name} " + ("removed" + (" (its server stopped)" if r["stopped"] else "")
                                        if r["removed"] else "was not deployed; nothing to remove"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
