"""CLI: bad input fails fast with one line and exit code 2; the stage subcommands run on a run folder."""

import subprocess
import sys
import time

import pytest


def pistill(*args, cwd=None):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pistill.cli", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=120)
    return p, time.time() - t0


@pytest.mark.parametrize("body,match", [
    ("[prune]\nffn_ratoi = 0.5\n", "[prune] unknown key 'ffn_ratoi'"),
    ('[teacher]\nsource = "/nowhere/teacher"\n', "teacher path /nowhere/teacher does not exist"),
    ('[bench]\nthreads = "two"\n', "[bench] threads must be int"),
])
def test_bad_recipe_fails_fast_with_one_line(tmp_path, body, match):
    r = tmp_path / "r.toml"
    r.write_text(body)
    p, wall = pistill("run", str(r), "--out", str(tmp_path / "run"))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0]
    assert wall < 5, f"took {wall:.1f}s"
    assert not (tmp_path / "run").exists()


def test_unknown_force_stage_and_missing_recipe(tmp_path):
    p, _ = pistill("run", str(tmp_path / "none.toml"))
    assert p.returncode == 2 and "does not exist" in p.stderr
    (tmp_path / "ok.toml").write_text("")
    p, _ = pistill("run", str(tmp_path / "ok.toml"), "--force", "prunee")
    assert p.returncode == 2 and "stage 'prunee' is unknown" in p.stderr


def test_stage_subcommand_needs_artifacts(tmp_path):
    p, _ = pistill("prune", str(tmp_path))
    assert p.returncode == 1 and "is not a pistill artifact" in p.stderr
    p, _ = pistill("prune", str(tmp_path), "--input", "teacher")
    assert p.returncode == 2 and "STAGE=DIR" in p.stderr
    p, _ = pistill("distill", str(tmp_path), "--input", f"distil={tmp_path}")  # a typo is refused, not ignored
    assert p.returncode == 2 and "reads no stage 'distil'; valid: data, prune, quantize" in p.stderr


def test_stage_subcommands_come_from_the_stage_table():
    """One subcommand per stage command, in pipeline order; `export` runs both exporters."""
    from pistill.cli import stage_commands

    assert stage_commands() == {"prune": ["prune"], "quantize": ["quantize"], "distill": ["distill"],
                                "export": ["gguf", "onnx"], "baseline": ["baseline"], "bench": ["bench"],
                                "eval": ["eval"], "report": ["report"]}
