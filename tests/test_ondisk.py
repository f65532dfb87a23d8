"""Trust nothing on disk: a lock that no planted link can turn against its user, the user's files in an artifact
folder kept, damaged artifacts found before use (and rebuilt by `pistill run`), `pistill verify`, damaged manifests
and a full disk as one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pistill import hashcache, pipeline
from pistill.artifact import Artifact, ArtifactError, ArtifactWriter, read_manifest
from pistill.cli import main
from pistill.data import DataConfig
from pistill.errors import OutputError
from pistill.rundir import LOCK, atomic_write, locked
from pistill.teacher import TeacherConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A private PISTILL_CACHE: the hash cache of these tests is theirs alone."""
    monkeypatch.setenv("PISTILL_CACHE", str(tmp_path / "cache"))


def console(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pistill.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ})


def flip(path: Path, at: int = 100, n: int = 64) -> None:
    """Overwrite n bytes in place (same size), as a bad disk or a stray write would."""
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in old))


# --- the lock and fixed-name files ----------------------------------------------------------------------------------

def test_a_lock_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious\n")
    (run / LOCK).symlink_to(victim)
    p = console("report", run)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "is a symbolic link" in err[0] and "Traceback" not in p.stderr
    assert victim.read_text() == "precious\n"


def test_a_lock_that_is_a_hard_link_or_not_a_file_is_refused(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious\n")
    os.link(victim, run / LOCK)
    with pytest.raises(OutputError, match="hard link with 2 names"), locked(run):
        pass
    assert victim.read_text() == "precious\n"
    (run / LOCK).unlink()
    (run / LOCK).mkdir()
    with pytest.raises(OutputError, match=LOCK), locked(run):
        pass


def test_atomic_write_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "pipeline.json").symlink_to(victim)
    (tmp_path / f".pipeline.json.tmp-{os.getpid()}").symlink_to(victim)  # the temporary's name, planted too
    atomic_write(tmp_path / "pipeline.json", "{}\n")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "pipeline.json").is_symlink() and (tmp_path / "pipeline.json").read_text() == "{}\n"


# --- the user's files in an artifact folder ---------------------------------------------------------------------------

def write_report(out: Path, text: str) -> Artifact:
    with ArtifactWriter(out, "report", TeacherConfig(source="x"), []) as w:
        (w.dir / "report.md").write_text(text)
        (w.dir / "sub").mkdir()
        (w.dir / "sub" / "chart.txt").write_text(text)
    return w.artifact


def test_a_rerun_moves_the_users_files_aside_and_never_deletes_them(tmp_path, caplog):
    out = tmp_path / "run" / "report"
    write_report(out, "one")
    (out / "my_notes.md").write_text("notes")
    (out / "sub" / "mine.txt").write_text("mine")
    with caplog.at_level("WARNING"):
        art = write_report(out, "two")
    kept = list(out.parent.glob("report.kept-*"))
    assert len(kept) == 1 and (kept[0] / "my_notes.md").read_text() == "notes"
    assert (kept[0] / "sub" / "mine.txt").read_text() == "mine"
    assert (out / "report.md").read_text() == "two" and not (out / "my_notes.md").exists()
    assert "my_notes.md" not in art.manifest["files"] and "sub/mine.txt" in caplog.text
    write_report(out, "three")  # nothing foreign this time: nothing moved
    assert len(list(out.parent.glob("report.kept-*"))) == 1


# --- damaged artifacts ------------------------------------------------------------------------------------------------

@pytest.fixture()
def small_run(tiny_model, tmp_path):
    """teacher and data stages of a tiny run, through the pipeline's own run_stage."""
    run = tmp_path / "run"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Line {i} of a small corpus about folders and files." for i in range(200)))
    cfgs = {"teacher": TeacherConfig(source=str(tiny_model)),
            "data": DataConfig(corpus=str(corpus), block_size=32, calib_blocks=2, train_blocks=4, heldout_blocks=1,
                               generate=0, instructions=0, topk=4)}
    arts = {}
    for name in ("teacher", "data"):
        arts[name], ran = pipeline.run_stage(pipeline.stage(name), arts, cfgs[name], run / name, force=False)
        assert ran
    return run, cfgs, arts


def test_a_damaged_artifact_is_rebuilt_by_the_pipeline_and_refused_as_an_input(small_run, caplog):
    run, cfgs, arts = small_run
    data = arts["data"]
    victim = data.path / max(data.manifest["files"], key=lambda n: data.manifest["files"][n]["bytes"])
    flip(victim)
    inputs = {"teacher": arts["teacher"], "data": data}
    with pytest.raises(pipeline.DamagedError, match=r"differs from its manifest's sha256 \(changed after the 'data'"):
        pipeline.run_stage(pipeline.stage("prune"), inputs, None, run / "prune", force=False)
    assert not (run / "prune").exists()
    with caplog.at_level("WARNING"):
        new, ran = pipeline.run_stage(pipeline.stage("data"), arts, cfgs["data"], run / "data", force=False)
    assert ran and new.id != data.id and "rebuilding the 'data' stage" in caplog.text
    _, ran = pipeline.run_stage(pipeline.stage("data"), arts, cfgs["data"], run / "data", force=False)
    assert not ran  # intact now: skipped again


def test_verify_reports_each_damaged_or_missing_file_with_the_fix(small_run, capfd, caplog):
    run, _, arts = small_run
    assert main(["verify", str(run)]) == 0
    files = sorted(arts["data"].manifest["files"])
    flip(arts["data"].path / files[0], at=0, n=8)
    (arts["teacher"].path / sorted(arts["teacher"].manifest["files"])[0]).unlink()
    (arts["data"].path / "my_notes.md").write_text("mine")
    capfd.readouterr()
    assert main(["verify", str(run)]) == 1
    lines = capfd.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and any("is missing" in line and "--force teacher" in line for line in lines)
    assert any(files[0] in line and "pistill run RECIPE --force data" in line for line in lines)
    assert "my_notes.md is not listed" in caplog.text
    assert main(["verify", str(run / "nothing")]) == 1


def test_the_hash_cache_skips_unchanged_files_and_sees_changed_ones(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(4096))
    real = hashcache.sha256_file(f)
    assert hashcache.sha256_many([f]) == {f: real}
    cache = json.loads(hashcache.cache_path().read_text())
    cache[str(f.absolute())]["sha256"] = "planted"  # a cache hit returns the entry without reading the file
    hashcache.cache_path().write_text(json.dumps(cache))
    assert hashcache.sha256_many([f])[f] == "planted"
    assert hashcache.sha256_many([f], cached=False)[f] == real
    st = f.stat()
    flip(f, at=10, n=4)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime back: the ctime still tells
    assert hashcache.sha256_many([f])[f] == hashcache.sha256_file(f) != real


def test_a_written_artifact_is_in_the_hash_cache(tmp_path):
    art = write_report(tmp_path / "report", "text")
    cache = json.loads(hashcache.cache_path().read_text())
    assert cache[str((art.path / "report.md").absolute())]["sha256"] == art.manifest["files"]["report.md"]["sha256"]


# --- damaged manifests, a full disk ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("model", "model.gguf"), ("metrics", None), ("files", []),
                                          ("models", [{"key": 1}]), ("parents", "x"), ("stage", 3)])
def test_a_manifest_field_of_the_wrong_type_is_one_line(tmp_path, field, value):
    art = write_report(tmp_path / "report", "t")
    mf = art.path / "manifest.json"
    mf.write_text(json.dumps({**json.loads(mf.read_text()), field: value}))
    with pytest.raises(ArtifactError, match=f"'{field}' is .*rerun the stage that wrote the folder") as e:
        read_manifest(mf)
    assert "\n" not in str(e.value)


def test_a_full_disk_inside_a_stage_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(OutputError, match=r"no space left on the disk of .*report \(.* free\)"):
        with ArtifactWriter(out, "report", TeacherConfig(source="x"), []) as w:
            (w.dir / "a").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")  # what write(2) raises when the disk is full
    assert not out.exists() and not list(tmp_path.glob(".report.tmp-*"))


def test_a_sigterm_unwinds_and_removes_the_stage_temporaries(tmp_path):
    """SIGTERM (kill, a CI timeout) raises SystemExit in the CLI: `with` blocks run, the writer's folder goes."""
    code = ("import sys, time, pistill.cli as c\n"
            "from pistill.artifact import ArtifactWriter\nfrom pistill.teacher import TeacherConfig\n"
            "c._exit_on_sigterm()\n"
            "with ArtifactWriter(sys.argv[1], 'report', TeacherConfig(source='x'), []) as w:\n"
            "    print(w.dir, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "report")], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir()
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15 and not tmp.exists()
    shutil.rmtree(tmp_path / "report", ignore_errors=True)


@pytest.mark.parametrize("argv", [["run", "r.toml", "--target", ","], ["search", "r.toml", "--target", "pi@a,"],
                                  ["bench", "RUN", "--target", " "]])
def test_an_empty_target_on_the_command_line_is_refused(tmp_path, capfd, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text("")
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names an empty target" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # nothing created
