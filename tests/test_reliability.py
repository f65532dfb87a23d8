"""Faults and bad input (docs/reliability.md): a killed run resumes, damaged files are set aside, folders pistill did
not write survive, one writer per run folder, and every bad recipe value fails in one line with exit 2."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
import typing
from pathlib import Path

import numpy as np
import pytest

from pistill import pipeline, recipe
from pistill.cli import main
from pistill.errors import UserError
from pistill.rundir import LOCK, clean_stale, locked

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(path: Path, teacher: Path, steps: int = 4) -> Path:
    """Teacher..distill at toy sizes on the tiny model, on a small corpus (a checkpoint every step)."""
    corpus = path.with_name("corpus.txt")
    corpus.write_text("\n\n".join(f"Note {i}: the pipeline writes folder {i * 7} and reads it back after step {i}."
                                    for i in range(300)))
    path.write_text(textwrap.dedent(f"""\
        [teacher]
        source = "{teacher}"
        [data]
        corpus = "{corpus}"
        block_size = 32
        calib_blocks = 2
        train_blocks = 4
        heldout_blocks = 1
        generate = 0
        instructions = 0
        topk = 4
        [prune]
        calib_blocks = 2
        [quantize]
        method = "none"
        bench_blocks = 1
        [distill]
        steps = {steps}
        batch_size = 2
        warmup_steps = 0
        eval_every = 0
        ckpt_every = 1
        """))
    return path


def cli(capfd, *args) -> tuple[int, list[str]]:
    """`pistill ARGS` in this process: exit code and stderr lines (the console script's path, minus startup)."""
    capfd.readouterr()
    rc = main([str(a) for a in args])
    return rc, capfd.readouterr().err.strip().splitlines()


def console(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pistill.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"pistill run ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} after {timeout_s}s"
        time.sleep(0.05)


# --- a killed run, a second writer ----------------------------------------------------------------------------------

def test_sigkill_during_distillation_then_rerun_completes(tiny_model, tmp_path, capfd, caplog):
    """A real SIGKILL of `pistill run` mid-distillation; meanwhile a second run is refused with the first's PID; the
    rerun removes the dead run's temporary folder, resumes from the checkpoint and completes."""
    from pistill.artifact import Artifact
    from pistill.compress.distill import CHECKPOINT, TRAIN_LOG

    steps = 30
    r, run = tiny_recipe(tmp_path / "r.toml", tiny_model, steps=steps), tmp_path / "run"
    ckpt = run / ".distill.ckpt" / CHECKPOINT
    with open(tmp_path / "first.log", "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "pistill.cli", "run", str(r), "--out", str(run)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_for(ckpt.is_file, proc, 300, "distillation checkpoint")
            rc, err = cli(capfd, "run", r, "--out", run)  # a second writer, while the first distils
            assert rc == 1 and len(err) == 1 and f"in use by another pistill process (PID {proc.pid})" in err[0]
            rc, err = cli(capfd, "distill", run, "--recipe", r)  # a stage subcommand on the same folder too
            assert rc == 1 and f"PID {proc.pid}" in err[0]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "distill").exists(), "distillation finished before the kill; raise steps"
    stale = list(run.glob(f".distill.tmp-{proc.pid}"))
    assert stale, "the killed run left no temporary folder"
    killed_at = sum(1 for _ in (run / ".distill.ckpt" / TRAIN_LOG).open())

    with caplog.at_level("INFO"):
        rc, err = cli(capfd, "distill", run, "--recipe", r)
    assert rc == 0, err
    resumed = [m for m in caplog.messages if "resuming from step" in m]
    assert resumed and int(resumed[0].split("step ")[1].split()[0]) >= 1
    art = Artifact.load(run / "distill", stage="distill")
    rows = [json.loads(line) for line in (art.path / TRAIN_LOG).read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, steps + 1)) and art.metrics["steps"] == steps
    assert killed_at < steps and not stale[0].exists() and not ckpt.parent.exists()
    assert Artifact.load(run / "prune").id == art.manifest["parents"][1]["id"]  # earlier stages untouched


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock until killed; returns once it holds it."""
    code = ("import sys, time; from pistill.rundir import locked\n"
            "with locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capfd):
    (tmp_path / "r.toml").write_text("")
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        for args in (("run", tmp_path / "r.toml", "--out", run), ("report", run)):
            rc, err = cli(capfd, *args)
            assert rc == 1 and err == [f"pistill: error: {run} is in use by another pistill process (PID "
                                       f"{holder.pid}); wait for it to finish or choose another --out"]
    finally:
        holder.kill()
        holder.wait()
    with locked(run):  # the kernel released the dead holder's lock
        assert (run / LOCK).read_text().strip() == str(os.getpid())


def test_stale_temporaries_go_only_when_their_process_is_gone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for pid in (live.pid, dead.pid):
            (tmp_path / f".distill.tmp-{pid}").mkdir()
            (tmp_path / f".distill.tmp-{pid}" / "model.safetensors").write_bytes(b"x")
        removed = clean_stale(tmp_path, ".distill.tmp-*")
        assert removed == [tmp_path / f".distill.tmp-{dead.pid}"]
        assert (tmp_path / f".distill.tmp-{live.pid}" / "model.safetensors").is_file()
    finally:
        live.kill()
        live.wait()


def test_killed_teacher_conversion_is_cleaned_from_the_cache(tmp_path, monkeypatch):
    """A GGUF teacher's float32 conversion killed midway leaves `.<name>.tmp-<pid>` in the cache: the next
    materialize removes it (its writer is gone) before converting."""
    from pistill import models

    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path / "cache"))
    cached = models.gguf_cache_path(gguf)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    half = cached.parent / f".{cached.name}.tmp-{dead.pid}"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"\0" * 1000)
    with pytest.raises(Exception):  # the file is no real GGUF; the cleanup runs first
        models.materialize(str(gguf))
    assert not half.exists()


# --- damaged checkpoints and logs, a diverging loss -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tiny_model):
    """(load student, teacher, blocks): the tiny model distilled into a fresh copy of itself."""
    import torch
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)  # noqa: E731
    return load, load().eval(), np.random.default_rng(0).integers(0, 500, (8, 32)).astype(np.int32)


def test_truncated_checkpoint_is_moved_aside_and_the_stage_starts_over(pair, tmp_path, caplog):
    from pistill.compress.distill import CHECKPOINT, TRAIN_LOG, DistillConfig, train

    load, teacher, data = pair
    cfg = DistillConfig(steps=3, batch_size=2, warmup_steps=0, eval_every=0, ckpt_every=1)
    train(load(), teacher, data, data[:1], cfg, tmp_path)
    ckpt = tmp_path / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a disk that filled up mid-write
    with caplog.at_level("WARNING"):
        summary = train(load(), teacher, data, data[:1], cfg, tmp_path)
    assert any(str(ckpt) in m and "damaged" in m and "step 0" in m for m in caplog.messages)
    assert summary["steps"] == 3
    assert [json.loads(x)["step"] for x in (tmp_path / TRAIN_LOG).read_text().splitlines()] == [1, 2, 3]
    aside = list(tmp_path.glob(f"{CHECKPOINT}.damaged-*"))
    assert len(aside) == 1 and aside[0].stat().st_size > 0  # kept for a look, not deleted
    caplog.clear()
    assert train(load(), teacher, data, data[:1], cfg, tmp_path)["steps"] == 3  # the new checkpoint loads
    assert not [m for m in caplog.messages if "damaged" in m]


def test_half_written_log_line_is_dropped_and_redone(pair, tmp_path, caplog):
    from pistill.compress.distill import TRAIN_LOG, DistillConfig, train

    load, teacher, data = pair
    short = DistillConfig(steps=2, batch_size=2, warmup_steps=0, eval_every=0, ckpt_every=1)
    train(load(), teacher, data, data[:1], short, tmp_path, key="same run")
    log = tmp_path / TRAIN_LOG
    with log.open("a") as f:
        f.write('{"step": 3, "loss": 0.0')  # the power went while step 3 was logged
    with caplog.at_level("WARNING"):
        summary = train(load(), teacher, data, data[:1], dataclasses.replace(short, steps=4), tmp_path,
                        key="same run")
    assert any(f"{log} line 3 is damaged" in m for m in caplog.messages)
    assert summary["steps"] == 4
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_damaged_topk_cache_is_computed_again(pair, tmp_path, caplog):
    from pistill.compress.distill import DistillConfig, train

    load, teacher, data = pair
    cfg = DistillConfig(steps=2, batch_size=2, warmup_steps=0, eval_every=0, ckpt_every=0, teacher_topk=8)
    want = train(load(), teacher, data, data[:1], cfg, tmp_path / "a")
    cache = tmp_path / "b" / "teacher_top8.npz"
    cache.parent.mkdir()
    cache.write_bytes((tmp_path / "a" / "teacher_top8.npz").read_bytes()[:100])
    with caplog.at_level("WARNING"):
        got = train(load(), teacher, data, data[:1], cfg, tmp_path / "b")
    assert any(f"{cache} is damaged" in m for m in caplog.messages)
    assert got["loss_first"] == pytest.approx(want["loss_first"]) and cache.stat().st_size > 100


def test_a_diverging_loss_stops_with_one_line_and_saves_nothing(pair, tmp_path):
    from pistill.compress.distill import CHECKPOINT, DistillConfig, DivergedError, train

    load, teacher, data = pair
    cfg = DistillConfig(steps=4, batch_size=2, lr=1e12, warmup_steps=0, eval_every=0, ckpt_every=1)
    with pytest.raises(DivergedError, match=r"training diverged; lower \[distill\] lr \(now 1e\+12\)") as e:
        train(load(), teacher, data, data[:1], cfg, tmp_path)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    state = __import__("torch").load(tmp_path / CHECKPOINT, weights_only=True)  # the last finite step's
    assert state["step"] < int(str(e.value).split("step ")[1].split()[0])
    assert all(bool(t.isfinite().all()) for t in state["model"].values())


# --- output folders -----------------------------------------------------------------------------------------------

def test_out_onto_the_run_folder_or_a_user_folder_is_refused(tiny_model, tmp_path, capfd):
    run = tmp_path / "run"
    for stage in ("teacher", "data"):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps({"stage": stage, "id": stage, "key": stage}))
    (run / "notes.txt").write_text("mine")
    rc, err = cli(capfd, "report", run, "--out", run)  # deleted every stage folder before
    assert rc == 2 and len(err) == 1 and "is or holds the run folder" in err[0]
    rc, err = cli(capfd, "report", run, "--out", tmp_path)
    assert rc == 2 and "is or holds the run folder" in err[0]
    assert (run / "notes.txt").read_text() == "mine" and (run / "teacher" / "manifest.json").is_file()

    here = tmp_path / "here"  # `pistill run r.toml --out .` with the user's own ./data
    (here / "data").mkdir(parents=True)
    (here / "data" / "corpus.txt").write_text("my corpus")
    rc, err = cli(capfd, "run", tiny_recipe(tmp_path / "r.toml", tiny_model), "--out", here)
    assert rc == 1 and len(err) == 1
    assert f"{here / 'data'} exists and is not a pistill artifact" in err[0] and "remove the folder yourself" in err[0]
    assert (here / "data" / "corpus.txt").read_text() == "my corpus"
    assert not (here / "teacher").exists()  # refused before any stage ran


def test_stage_out_onto_a_user_folder_or_under_a_file(tiny_teacher, tiny_data, tmp_path, capfd):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    inputs = ["--input", f"teacher={tiny_teacher.path}", "--input", f"data={tiny_data.path}"]
    rc, err = cli(capfd, "prune", tmp_path, *inputs, "--out", mine)
    assert rc == 1 and len(err) == 1 and "is not a pistill artifact" in err[0] and "choose another --out" in err[0]
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(mine)) == ["thesis.tex"]
    rc, err = cli(capfd, "prune", tmp_path, *inputs, "--out", tiny_data.path)  # another stage's artifact
    assert rc == 1 and "holds the 'data' input" in err[0]
    (tmp_path / "file").write_text("x")
    rc, err = cli(capfd, "prune", tmp_path, *inputs, "--out", tmp_path / "file" / "prune")
    assert rc == 1 and err == [f"pistill: error: cannot create folder {tmp_path / 'file' / '.prune.tmp-'}"
                               f"{os.getpid()}: {tmp_path / 'file'} is a file; choose another --out"]
    rc, err = cli(capfd, "run", tiny_recipe(tmp_path / "r.toml", tiny_teacher.path), "--out", tmp_path / "file")
    assert rc == 1 and f"{tmp_path / 'file'} is a file" in err[0]


# --- bad input: one line, exit 2, no traceback ----------------------------------------------------------------------

WRONG_TYPE = {bool: "true", str: '"seven"', int: "7", list: "[7]"}  # a value of each TOML kind
ALWAYS_BAD = {"nan": "nan", "inf": "inf", "-inf": "-inf", "huge int": "1000000000000000000", "huge float": "1e300",
              "table": "{}", "list of tables": "[{}]"}
EMPTY = {"empty string": '""', "empty list": "[]"}
VALID_EMPTY = {  # (stage, field, value): an empty value that means something; the test checks they load
    ("prune", "nm", '""'),  # no N:M sparsity
    ("prune", "vocab_corpus", '""'),  # the data stage's training blocks choose the kept tokens
    ("gguf", "output_type", '""'),  # llama.cpp's choice for the output projection
    ("distill", "student", '""'),  # the prune stage's model
    ("gguf", "quants", "[]"),  # only the unquantized file
    ("bench", "targets", "[]"), ("bench", "inventory", '""'), ("bench", "thread_sweep", "[]"),
    ("bench", "python", '""'), ("bench", "llama_cpp_lib", '""'),
    ("eval", "skip", "[]"), ("eval", "suffix", '""'),  # HellaSwag-layout task files need no suffix
}


def kinds(hint) -> set[type]:
    """The TOML value kinds a field accepts (an int is a float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(kinds(a) for a in typing.get_args(hint) if a is not type(None)))
    if origin in (list, tuple):
        return {list}
    return {hint, int} if hint is float else {hint}


def bad_values(hint) -> dict[str, str]:
    wrong = {f"a {kind.__name__}": toml for kind, toml in WRONG_TYPE.items() if kind not in kinds(hint)}
    empty = {name: toml for name, toml in EMPTY.items() if name != "empty list" or list in kinds(hint)}
    return {**ALWAYS_BAD, **wrong, **empty}


@pytest.mark.parametrize("stage", pipeline.STAGES, ids=lambda s: s.name)
def test_fuzzed_recipe_fails_in_one_line_with_exit_2(stage, tmp_path, capfd):
    """Every field of the stage's config, set to a wrong type, NaN, inf, a huge and an empty value: exit 2, one line
    naming `[stage]` and the field, no traceback, nothing written. Empty values that mean something load."""
    cls = stage.config_class()
    hints, problems = typing.get_type_hints(cls), []
    for field in dataclasses.fields(cls):
        for what, toml in bad_values(hints[field.name]).items():
            path = tmp_path / "r.toml"
            path.write_text(f"[{stage.name}]\n{field.name} = {toml}\n")
            if (stage.name, field.name, toml) in VALID_EMPTY:
                recipe.load(path)  # must load
                continue
            try:
                recipe.load(path)
                problems.append(f"{field.name} = {toml} ({what}) was accepted")
                continue
            except recipe.RecipeError:
                pass
            rc, err = cli(capfd, "run", path, "--out", tmp_path / "run")
            one = len(err) == 1 and err[0].startswith("pistill: error: [")
            if rc != 2 or not one or f"[{stage.name}]" not in err[0] or field.name not in err[0]:
                problems.append(f"{field.name} = {toml} ({what}): exit {rc}, {err}")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body,match", [
    ("[distill]\nlr = inf\n", "[distill] lr = inf must be a finite number"),
    ("[data]\ntopk = nan\n", "[data] topk must be int, got a number (nan)"),
])
def test_console_script_prints_one_line_and_no_traceback(tmp_path, body, match):
    (tmp_path / "r.toml").write_text(body)
    p = console("run", tmp_path / "r.toml", "--out", tmp_path / "run")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"pistill: error: {match}"), p.stderr


def test_verbose_adds_the_traceback_and_a_bug_keeps_it(tmp_path, capfd, monkeypatch):
    (tmp_path / "r.toml").write_text("[distill]\nlr = nan\n")
    rc, err = cli(capfd, "-v", "run", tmp_path / "r.toml")
    assert rc == 2 and err[0].startswith("Traceback") and err[-1].startswith("pistill: error: [distill] lr = nan")
    monkeypatch.setattr(recipe, "load", lambda path: {}["a bug"])  # not a UserError: it must not be hidden
    with pytest.raises(KeyError):
        main(["run", str(tmp_path / "r.toml")])


@pytest.mark.parametrize("case", ["non-utf8 recipe", "teacher without weights", "manifest list", "manifest no key",
                                  "bad --input", "bad utf-8 corpus"])
def test_bad_input_is_one_line(case, tiny_model, tmp_path, capfd):
    r = tmp_path / "r.toml"
    if case == "non-utf8 recipe":
        r.write_bytes(b"[distill]\nloss = \"\xff\"\n")
        want, code = f"recipe {r} cannot be read (UnicodeDecodeError)", 2
        args = ("run", r)
    elif case == "teacher without weights":
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "config.json").write_text((tiny_model / "config.json").read_text())
        r.write_text(f'[teacher]\nsource = "{tmp_path / "t"}"\n')
        want, code = f"teacher folder {tmp_path / 't'} has config.json but no weights", 2
        args = ("run", r)
    elif case.startswith("manifest"):
        (tmp_path / "teacher").mkdir()
        body = [] if case == "manifest list" else {"stage": "teacher", "id": "x"}
        (tmp_path / "teacher" / "manifest.json").write_text(json.dumps(body))
        want = "is a JSON list, not a pistill manifest" if case == "manifest list" else "lacks key, not a pistill"
        code, args = 1, ("prune", tmp_path)
    elif case == "bad --input":
        want, code, args = "--input distil=x: 'distill' reads no stage 'distil'", 2, ("distill", tmp_path,
                                                                                      "--input", "distil=x")
    else:
        (tmp_path / "c.txt").write_bytes(b"caf\xe9 au lait\n")
        from pistill.data import DataConfig, read_corpus
        with pytest.raises(UserError, match=f"corpus file {tmp_path / 'c.txt'} cannot be read") as e:
            read_corpus(DataConfig(corpus=str(tmp_path / "c.txt")))
        assert "\n" not in str(e.value)
        return
    rc, err = cli(capfd, *args)
    assert rc == code and len(err) == 1 and want in err[0], err


def test_a_value_the_teacher_cannot_meet_is_one_line(tiny_teacher, tiny_data, tmp_path, capfd):
    """Checks that need the teacher run in the stage, before weights load: still one line, exit 1."""
    (tmp_path / "r.toml").write_text("[prune]\nffn_dim = 4096\n")
    inputs = ["--input", f"teacher={tiny_teacher.path}", "--input", f"data={tiny_data.path}"]
    rc, err = cli(capfd, "prune", tmp_path, *inputs, "--recipe", tmp_path / "r.toml")
    assert rc == 1 and err == ["pistill: error: ffn_dim = 4096 is wider than the teacher's MLP (128); use a value up "
                               "to 128"]
    assert not (tmp_path / "prune").exists()


def test_export_and_device_failures_are_user_errors():
    """The gates and tools that stop a stage for a reason the user can act on print one line (exit 1)."""
    from pistill.artifact import ArtifactError
    from pistill.compress.distill import DivergedError
    from pistill.device.target import TargetError
    from pistill.export.gguf_quantize import QuantizeError
    from pistill.export.verify import VerificationError
    from pistill.models import TeacherError

    for cls in (VerificationError, QuantizeError, ArtifactError, TeacherError, TargetError, DivergedError,
                recipe.RecipeError):
        assert issubclass(cls, UserError), cls
    assert recipe.RecipeError.exit_code == 2 and issubclass(recipe.RecipeError, ValueError)
    assert str(VerificationError("m.gguf", ["a", "b"])).count("\n") == 0
