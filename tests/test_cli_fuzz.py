"""The command line fed garbage: every subcommand answers bad arguments with a non-zero exit and one line
(`pistill: error: ...`, or argparse's usage error), never a traceback, and leaves nothing in the working folder but
what it legitimately writes. In-process through pistill.cli.main, and a handful through the console script.

Nothing reaches a network (targets are garbage, or 127.0.0.1 on a closed port) and nothing starts model work: the
recipes name a missing teacher, or load only where another argument must be refused first; and pistill's cache is
a file, so a pipeline started by mistake stops at once, and the folder it made fails the test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pistill import cli

SCRIPT = Path(sys.executable).with_name("pistill")  # the console script beside the venv's python
CLOSED = "{closed}"  # replaced by 127.0.0.1:<a port nothing listens on>
NUMBERS = ["nan", "NaN", "inf", "-inf", "-1", "0", "1e309", "9" * 40, "0x10", "1_0", "\u0663"]
TEXT = ["", " ", "\t", ",", " , ", "ünïcödé ✓ 🦙", "a" * 5000, "$(touch pwned)", "-", "x\ny", "\x7f", "\udcff"]
PATHS = ["notes.txt", "adir", "nothing/at/all", "fifo", "run", "bad.toml", ".", "~"]  # see `workdir`
TARGETS = [",", " , ", "local,", ",local", "", " ", "a b", "pi@", "@pi", "pi@h:0", "pi@h:99999", "pi@[::g]",
           "ü@pi", "pi\n@x", "a" * 5000, "x..y", "-", CLOSED, f"pi@{CLOSED}"]  # none resolvable: no DNS lookup
LOCK = ".pistill.lock"  # a stage command locks the existing run folder it writes into


class Hung(BaseException):
    """A command blocked (a FIFO opened for reading waits for a writer forever)."""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The working folder: a text file, a folder, a FIFO, an empty run folder and recipes; HOME beside it, and
    pistill's cache a file (a pipeline that starts by mistake fails at its first stage)."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    for folder in (cwd / "adir", cwd / "run", home):
        folder.mkdir(parents=True)
    (cwd / "notes.txt").write_text("just some notes\n")
    os.mkfifo(cwd / "fifo")
    (cwd / "bad.toml").write_text(f'[teacher]\nsource = "{tmp_path / "no-teacher"}"\n')
    (cwd / "ok.toml").write_text("")  # the offline default teacher: loads, and must never run here
    (tmp_path / "cache").write_text("")
    for key, value in {"HOME": home, "PISTILL_CACHE": tmp_path / "cache", "HF_HUB_OFFLINE": 1,
                       "XDG_CACHE_HOME": home / ".cache"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def watchdog(seconds: int):
    def hung(signum, frame):
        raise Hung(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def call(argv: list[str]) -> tuple[int, str]:
    """pistill.cli.main(argv) in this process: (exit code, stderr). Captured as text: a byte that is not UTF-8 in
    an argument arrives as a lone surrogate ("\\udcff"), which a real stderr prints with backslashreplace."""
    err = io.StringIO()
    with watchdog(30), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's usage error
            code = e.code
    return code, err.getvalue()


def assert_refused(argv: list[str], code, err: str) -> None:
    """A non-zero int exit and one line naming the problem (or argparse's usage), never a traceback."""
    shown = [a[:40] for a in argv]
    assert isinstance(code, int) and code != 0, (shown, code, err)
    assert "Traceback" not in err, (shown, err)
    lines = err.strip().splitlines()
    if code == 2 and lines and lines[0].startswith("usage: pistill"):
        assert lines[-1].startswith("pistill ") and ": error: " in lines[-1], (shown, err)
    else:
        assert len(lines) == 1 and lines[0].startswith("pistill: error: "), (shown, err)


def allowed(argv: list[str], root: Path) -> set[str]:
    """What a refused command may leave: the lock of an existing run folder a stage command was pointed at."""
    if argv[0] not in cli.stage_commands() or len(argv) < 2:
        return set()
    run_dir = Path(os.path.expanduser(argv[1]))
    try:
        return {os.path.relpath(run_dir.resolve() / LOCK, root)} if run_dir.is_dir() else set()
    except OSError:  # a name too long for the file system
        return set()


def check(argv: list[str], root: Path, port: int) -> str:
    """Run `argv` (CLOSED made a closed port), assert it is refused and wrote nothing it should not; its stderr."""
    argv = [a.replace(CLOSED, f"127.0.0.1:{port}") for a in argv]
    before = tree(root)
    code, err = call(argv)
    assert_refused(argv, code, err)
    made = tree(root) - before
    assert made <= allowed(argv, root), ([a[:40] for a in argv], sorted(made))
    return err


# --- generated: every subcommand, every option, garbage values -------------------------------------------------

def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def values(dest: str, positional: bool) -> list[str]:
    """The garbage an argument gets: never a resolvable host name for a target, never "" as the recipe of `run`
    or `search` (it runs the default recipe: test_known_faults)."""
    if dest == "target":
        return TARGETS
    pool = NUMBERS + TEXT + PATHS
    return [v for v in pool if v] if positional and dest == "recipe" else pool


def generated(per_command: int = 12, seed: int = 0) -> list[list[str]]:
    """Argument lists for every subcommand: its positionals and a random subset of its options, all garbage."""
    rng, cases = random.Random(seed), []
    for name, sp in subcommands().items():
        positionals = [a for a in sp._actions if not a.option_strings]
        options = [a for a in sp._actions if a.option_strings and a.dest != "help"]
        for _ in range(per_command):
            argv = [name] + [rng.choice(values(a.dest, True)) for a in positionals]
            for a in rng.sample(options, rng.randint(0, len(options))):
                argv += [a.option_strings[-1]] + ([] if a.nargs == 0 else [rng.choice(values(a.dest, False))])
            cases.append(argv)
    return cases


BASELINE = {"recipe": "bad.toml", "run_dir": "run", "target": CLOSED}  # refused on their own, quickly
SWEEP = ["", "nan", "-1", "1e309", "a" * 5000, "\udcff", "x\ny", ",", "fifo", "adir", "nothing/at/all"]


def swept() -> list[list[str]]:
    """One argument garbage at a time: each positional and option of every subcommand gets each SWEEP value (each
    target a TARGETS one), the positionals otherwise BASELINE."""
    cases = []
    for name, sp in subcommands().items():
        positionals = [a for a in sp._actions if not a.option_strings]
        base = [name] + [BASELINE[a.dest] for a in positionals]
        for a in sp._actions:
            if a.dest == "help" or a.nargs == 0:
                continue
            pool = TARGETS if a.dest == "target" else [v for v in SWEEP if v in values(a.dest, not a.option_strings)]
            for v in pool:
                cases.append([name] + [v if b is a else BASELINE[b.dest] for b in positionals] if not a.option_strings
                             else base + [a.option_strings[-1], v])
    return cases


def params(cases: list[list[str]], prefix: str) -> list:
    out = []
    for i, argv in enumerate(cases):
        out.append(pytest.param(argv, id=f"{prefix}{argv[0]}-{i}"))
    return out


@pytest.mark.parametrize("argv", params(generated(), "random-") + params(swept(), "one-"))
def test_garbage_arguments_are_refused_in_one_line(argv, workdir, closed_port):
    check(argv, workdir, closed_port)


def test_every_subcommand_is_fuzzed():
    assert {a[0] for a in generated()} == {a[0] for a in swept()} == set(subcommands()) >= {
        "run", "prune", "quantize", "distill", "export", "bench", "eval", "report", "search", "doctor", "trust",
        "verify"}


# --- chosen: a loadable recipe with one bad argument, and the files a recipe names --------------------------------

@pytest.mark.parametrize("argv, words", [
    (["run", "ok.toml", "--force", "prunee"], "stage 'prunee' is unknown"),
    (["run", "ok.toml", "--target", ","], "names an empty target"),
    (["run", "ok.toml", "--target", "a b"], "is not understood"),
    (["run", "ok.toml", "--eval-items", "-1"], "items = -1 must be 0 or more"),
    (["run", "ok.toml", "--eval-items", "nan"], "invalid int value"),
    (["search", "ok.toml", "--trials", "0"], "trials = 0 must be at least 1"),
    (["search", "ok.toml", "--max-memory-mb", "-5"], "max_memory_mb = -5.0 must be a finite number, 0 or more"),
    (["search", "ok.toml", "--target", "pi@a,"], "names an empty target"),
    (["bench", "run", "--target", " , "], "names an empty target"),
    (["eval", "run", "--items", "-3"], "items = -3 must be 0 or more"),
    (["run", "tasks.toml"], "t.jsonl line 2 is not JSON"),
    (["eval", "run", "--recipe", "corpus.toml"], "c.txt line 1 is not UTF-8 (byte 0xff at column 1)"),
    (["trust", CLOSED], "cannot reach 127.0.0.1"),
    (["doctor", f"pi@{CLOSED}", "--json"], "cannot reach 127.0.0.1"),
])
def test_one_bad_argument_is_refused_before_any_work(argv, words, workdir, closed_port):
    (workdir / "t.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n{nope\n")
    (workdir / "tasks.toml").write_text('[eval]\ntasks = ["t.jsonl"]\n')
    (workdir / "c.txt").write_bytes(b"\xff\xfe text\n")
    (workdir / "corpus.toml").write_text('[data]\ncorpus = "c.txt"\n')
    assert words in check(argv, workdir, closed_port)


@pytest.mark.parametrize("argv", [["run", ""], ["search", "ok.toml", "--min-decode-tok-s", "nan"],
                                  ["search", "ok.toml", "--max-memory-mb", "inf"],
                                  ["doctor", "local", "--model", "nothing/at/all"]])
def test_faults_this_fuzz_found(argv, workdir, closed_port):
    """Faults this fuzz found (an empty recipe path ran the default recipe; a NaN budget started a search; a
    missing --model was 0 bytes): each is now refused in one line."""
    check(argv, workdir, closed_port)


# --- the console script: a real process, a real argv (bytes that are not UTF-8 included), a real stderr ---------

CONSOLE = [
    (["run", "nothing.toml"], 2, "recipe nothing.toml does not exist"),
    (["run", os.fsdecode(b"\xff\xfe.toml")], 2, r"recipe \udcff\udcfe.toml does not exist"),
    (["run", "bad.toml", "--target", ","], 2, "teacher path"),
    (["prune", "fifo"], 1, "fifo/teacher is not a pistill artifact"),
    (["eval", "run", "--items", "nan"], 2, "argument --items: invalid int value: 'nan'"),
    (["doctor", " , "], 2, "is not understood"),
    (["trust", CLOSED], 1, "cannot reach 127.0.0.1"),
    (["verify", "nothing/at/all"], 1, "nothing/at/all"),
]


def test_the_console_script_refuses_in_one_line(workdir, closed_port):
    before = tree(workdir)
    procs = [(argv, code, words, subprocess.Popen(
        [SCRIPT, *(os.fsencode(a.replace(CLOSED, f"127.0.0.1:{closed_port}")) for a in argv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for argv, code, words in CONSOLE]  # at once: ~2 s each
    for argv, code, words, p in procs:
        out, err = p.communicate(timeout=120)
        text = err.decode("utf-8", "backslashreplace")
        lines = text.strip().splitlines()
        assert p.returncode == code and out == b"", (argv, p.returncode, text)
        assert "Traceback" not in text and words in lines[-1], (argv, text)
        assert len(lines) == 1 and lines[0].startswith("pistill: error: ") or \
            lines[0].startswith("usage: pistill"), (argv, text)
    assert tree(workdir) == before
