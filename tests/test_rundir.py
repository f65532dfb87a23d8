"""Run folders: the lock, folder creation, stale temporaries (the fault tests are in test_reliability.py)."""

import os

import pytest

from pistill.errors import OutputError
from pistill.rundir import LOCK, clean_stale, locked, make_dir, pid_alive


def test_lock_records_the_pid_and_is_released(tmp_path):
    with locked(tmp_path / "run") as run:
        assert (run / LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=rf"in use by another pistill process \(PID {os.getpid()}\)"):
            with locked(tmp_path / "run"):  # a second holder, even in this process
                pass
    with locked(tmp_path / "run"):
        pass


def test_make_dir_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=f"cannot create folder {tmp_path}/f/a/b: {tmp_path}/f is a file"):
        make_dir(tmp_path / "f" / "a" / "b")
    assert make_dir(tmp_path / "a" / "b").is_dir()


def test_own_and_unparsable_temporaries_are_kept(tmp_path):
    own, odd = tmp_path / f".x.tmp-{os.getpid()}", tmp_path / ".x.tmp-abc"
    own.mkdir(), odd.mkdir()
    assert clean_stale(tmp_path, ".x.tmp-*") == [] and own.is_dir() and odd.is_dir()
    assert pid_alive(os.getpid()) and not clean_stale(tmp_path / "missing", "*")
