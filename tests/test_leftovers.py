"""Leftovers of killed runs: scratch folders in the temp folder, and temporaries noted beside a one-off --out, are
removed by the next pistill process; a live process's are kept. Each test runs in a private temp folder."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pistill.rundir import LEDGER, clean_scratch, scratch, track

SLEEPER = """
import os, sys, time
from pathlib import Path
from pistill.rundir import scratch, track
{body}
print(path, flush=True)
time.sleep(120)
"""
IN_SCRATCH = "s = scratch(sys.argv[1]); path = s.name"
BESIDE_OUT = """
out = Path(sys.argv[1])
path = out.parent / f".{out.name}.tmp-{os.getpid()}"  # as ArtifactWriter names its folder
(path / "model").mkdir(parents=True)
Path(f"{path}.old").mkdir()  # the old artifact moved aside while the new one is renamed in
track(path)
"""


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A private temp folder, for this process (tempfile.gettempdir) and its children ($TMPDIR)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def children():
    """Start python children that print a path and sleep; any still running at the end are killed."""
    procs = []

    def start(code: str, *args: str) -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline().strip()
        assert line, f"the child printed no path (exit code {proc.poll()})"
        return proc, Path(line)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=30)  # reaped: a zombie's PID would still look alive


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_sigkilled_runs_scratch_goes_at_the_next_scratch_and_a_live_ones_stays(private_tmp, children):
    killed, killed_path = children(SLEEPER.format(body=IN_SCRATCH), "teacher-gguf")
    live, live_path = children(SLEEPER.format(body=IN_SCRATCH), "onnx-fp32")
    assert killed_path.parent == private_tmp and killed_path.name.startswith(f"pistill-teacher-gguf.tmp-{killed.pid}-")
    (killed_path / "teacher-f16.gguf").write_bytes(b"\0" * 1000)
    assert _kill(killed) == -signal.SIGKILL
    assert killed_path.is_dir()  # SIGKILL runs no clean-up: the next process does it
    with scratch("ortgenai") as own:
        assert not killed_path.exists()
        assert live_path.is_dir() and Path(own).is_dir()
    assert not Path(own).exists()
    _kill(live)
    assert clean_scratch() == [live_path] and list(private_tmp.iterdir()) == []


def test_sigterm_unwinds_the_scratch_through_the_clis_handler(private_tmp, children):
    code = """
import sys, time
from pistill.cli import _exit_on_sigterm
from pistill.rundir import scratch
_exit_on_sigterm()  # what `pistill` installs first: SIGTERM raises SystemExit, `with` blocks unwind
with scratch(sys.argv[1]) as path:
    print(path, flush=True)
    time.sleep(120)
"""
    proc, path = children(code, "gguf-f32")
    assert path.is_dir()
    assert _kill(proc, signal.SIGTERM) == 143  # 128 + SIGTERM, after the `with` block removed the folder
    assert not path.exists() and list(private_tmp.iterdir()) == []


def test_a_noted_temporary_beside_a_one_off_out_goes_once_its_writer_is_gone(private_tmp, tmp_path, children):
    outs = tmp_path / "outs"
    (outs / "myprune").mkdir(parents=True)  # a finished artifact and the user's own files beside it stay
    (outs / "myprune" / "manifest.json").write_text("{}")
    (outs / ".myprune.keep").write_text("mine")
    killed, killed_path = children(SLEEPER.format(body=BESIDE_OUT), str(outs / "myprune"))
    live, live_path = children(SLEEPER.format(body=BESIDE_OUT), str(outs / "myprune"))
    _kill(killed)
    assert killed_path.is_dir() and Path(f"{killed_path}.old").is_dir()
    removed = clean_scratch()
    ledger = private_tmp / LEDGER.format(pid=killed.pid)
    assert sorted(removed) == sorted([killed_path, Path(f"{killed_path}.old"), ledger])
    assert sorted(p.name for p in outs.iterdir()) == sorted([".myprune.keep", "myprune", live_path.name,
                                                             f"{live_path.name}.old"])
    assert (private_tmp / LEDGER.format(pid=live.pid)).is_file()  # a live writer's ledger stays with it
    _kill(live)
    clean_scratch()
    assert sorted(p.name for p in outs.iterdir()) == [".myprune.keep", "myprune"] and list(private_tmp.iterdir()) == []


def test_only_temporaries_of_dead_pids_are_removed_whatever_a_ledger_says(private_tmp, tmp_path):
    dead = _dead_pid()
    victims = [tmp_path / "model.safetensors", tmp_path / f".x.tmp-{os.getpid()}", tmp_path / "relative"]
    for p in victims:
        p.write_text("keep")
    (private_tmp / LEDGER.format(pid=dead)).write_text("\n".join([*map(str, victims), "relative/.y.tmp-1", ""]))
    assert clean_scratch() == [private_tmp / LEDGER.format(pid=dead)]
    assert all(p.read_text() == "keep" for p in victims)


def test_track_writes_no_ledger_through_a_link(private_tmp, tmp_path, caplog):
    target = tmp_path / "someone-elses-file"
    target.write_text("theirs\n")
    (private_tmp / LEDGER.format(pid=os.getpid())).symlink_to(target)
    track(tmp_path / f".out.tmp-{os.getpid()}")  # warns; the stage goes on
    assert target.read_text() == "theirs\n" and "is a symbolic link" in caplog.text


def test_a_quantization_removes_a_dead_runs_scratch_and_leaves_none(private_tmp, tmp_path, tiny_model):
    from pistill.export.gguf_convert import write_gguf
    from pistill.export.gguf_quantize import quantize_gguf

    stale = private_tmp / f"pistill-onnx-fp32.tmp-{_dead_pid()}-abc123"
    (stale / "model").mkdir(parents=True)
    f32 = write_gguf(tiny_model, tmp_path / "model-f32.gguf", "f32")
    quantize_gguf(f32, tmp_path / "model-Q8_0.gguf", "Q8_0", threads=1)  # its llama.cpp log goes to a scratch
    assert list(private_tmp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-Q8_0.gguf", "model-f32.gguf", "tmp"]


def test_a_killed_stage_commands_folder_beside_a_one_off_out_goes_at_the_next_run(private_tmp, tmp_path, children):
    code = SLEEPER.format(body="""
from dataclasses import dataclass
from pistill.artifact import ArtifactWriter
@dataclass(frozen=True)
class Cfg:
    sparsity: float = 0.5
w = ArtifactWriter(Path(sys.argv[1]), "prune", Cfg(), []).__enter__()
path = w.dir""")
    proc, path = children(code, str(tmp_path / "myprune"))
    assert path == tmp_path / f".myprune.tmp-{proc.pid}" and path.is_dir()
    _kill(proc)
    clean_scratch()  # what any later pistill command runs first, whatever its --out
    assert not path.exists()


def test_the_teacher_gguf_of_a_killed_data_stage_goes_at_the_next_run(private_tmp, tiny_model, children):
    code = SLEEPER.format(body="from pistill.generate import LlamaCppGenerator\n"
                               "gen = LlamaCppGenerator(Path(sys.argv[1]), 1, 1, 'f16'); path = gen._tmp.name")
    proc, path = children(code, str(tiny_model))
    assert path.parent == private_tmp and path.name.startswith(f"pistill-teacher-gguf.tmp-{proc.pid}-")
    assert [p.name for p in path.iterdir()] == ["teacher-f16.gguf"]
    _kill(proc)
    assert path.is_dir()
    assert path in clean_scratch() and not path.exists()
