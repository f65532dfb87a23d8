"""Content-addressed SFTP uploads against a real sshd: skip, resume after a cut, verify, atomic rename, disk space."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from pistill.device import target as T
from pistill.device import transfer as X
from sshd import sshd  # noqa: F401 (fixture)

SIZE = 3_000_000


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def conn(sshd):
    with T.connect(T.parse_target(sshd.spec, sshd.ssh_config), sshd.known_hosts) as c:
        yield c


def reconnect(sshd) -> T.Connection:
    return T.connect(T.parse_target(sshd.spec, sshd.ssh_config), sshd.known_hosts)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_then_skip(conn, blob, tmp_path):
    cache = str(tmp_path / "device")
    first = X.upload(conn, blob, cache)
    assert first.path == f"{cache}/blobs/{sha(blob)}" and first.sent == SIZE and not first.skipped
    assert sha(tmp_path / "device" / "blobs" / first.sha256) == first.sha256
    second = X.upload(conn, blob, cache)
    assert second.skipped and second.sent == 0  # the same sha256 is already there: nothing sent
    assert [p.name for p in (tmp_path / "device" / "blobs").iterdir()] == [first.sha256]  # no .part left


def test_cut_off_upload_resumes_and_verifies(sshd, conn, blob, tmp_path):
    cache = str(tmp_path / "device")

    part = tmp_path / "device" / "blobs" / f"{sha(blob)}.part"

    def cut(done: int) -> None:  # the link drops mid-way, once some of the pipelined writes have landed
        if done >= SIZE // 2:
            end = time.monotonic() + 10
            while time.monotonic() < end and not (part.exists() and part.stat().st_size > 0):
                time.sleep(0.01)
            conn.client.get_transport().close()

    with pytest.raises(X.TransferError, match="rerun to resume from there"):
        X.upload(conn, blob, cache, on_chunk=cut)
    assert 0 < part.stat().st_size < SIZE and not part.with_suffix("").exists()
    with reconnect(sshd) as again:
        up = X.upload(again, blob, cache)
    assert 0 < up.resumed_from < SIZE and up.sent == SIZE - up.resumed_from  # appended, not restarted
    assert sha(tmp_path / "device" / "blobs" / up.sha256) == up.sha256 and not part.exists()


def test_corrupt_partial_is_redone_from_scratch(conn, blob, tmp_path, caplog):
    blobs = tmp_path / "device" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha(blob)}.part").write_bytes(b"x" * 1000)  # not a prefix of the file
    with caplog.at_level(logging.WARNING):
        up = X.upload(conn, blob, str(tmp_path / "device"))
    assert up.resumed_from == 0 and up.sent == SIZE and sha(blobs / up.sha256) == up.sha256
    assert "did not verify" in caplog.text


def test_wrong_announced_hash_is_refused(conn, blob, tmp_path):
    with pytest.raises(X.TransferError, match="arrived corrupted"):
        X.upload(conn, blob, str(tmp_path / "device"), sha256="0" * 64)
    assert list((tmp_path / "device" / "blobs").iterdir()) == []  # partial deleted, nothing final


def test_hash_falls_back_to_python(conn, blob, tmp_path, monkeypatch):
    run = conn.run

    def no_sha256sum(argv, *args, **kw):
        return run(["sha256sum-missing", *argv[1:]] if argv[0] == "sha256sum" else argv, *args, **kw)

    monkeypatch.setattr(conn, "run", no_sha256sum)
    assert X.remote_sha256(conn, str(blob)) == sha(blob)
    with pytest.raises(X.TransferError, match="cannot hash"):
        X.remote_sha256(conn, str(blob), python="/no/python3")


def test_tree_of_hard_links(conn, tmp_path):
    src = tmp_path / "onnx"
    (src / "sub").mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"graph")
    (src / "sub" / "tokenizer.json").write_text("{}")
    (src / "manifest.json").write_text("{}")  # pistill's own: not sent
    files = X.folder_files(src)
    assert sorted(files) == ["model.onnx", "sub/tokenizer.json"]
    tree, ups = X.upload_tree(conn, files, str(tmp_path / "device"))
    assert Path(tree).parent == tmp_path / "device" / "trees" and len(ups) == 2
    laid = {p.relative_to(tree).as_posix(): p.read_bytes() for p in Path(tree).rglob("*") if p.is_file()}
    assert laid == {"model.onnx": b"graph", "sub/tokenizer.json": b"{}"}
    assert os.stat(f"{tree}/model.onnx").st_nlink == 2  # a hard link to its blob, not a copy
    again, ups2 = X.upload_tree(conn, files, str(tmp_path / "device"))
    assert again == tree and all(u.skipped for u in ups2)


def test_too_little_space_is_a_clear_error(conn, tmp_path):
    with pytest.raises(X.DiskFullError, match=r"needs 1000000000.0 MB, the device has .* MB free"):
        X.check_space(conn, str(tmp_path / "not" / "yet"), 10**15)  # checked on the nearest existing parent
    X.check_space(conn, str(tmp_path), 1)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a 1 MiB tmpfs needs root; the disk-space check is covered by a huge required size")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_upload_to_a_full_disk_is_refused_before_sending(conn, blob, tiny_disk):
    with pytest.raises(X.DiskFullError, match="not enough disk space"):
        X.upload(conn, blob, str(tiny_disk))
    assert not list((tiny_disk / "blobs").iterdir())  # nothing half-written


def test_progress_bar(conn, blob, tmp_path):
    import io

    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=io.StringIO())) as progress:
        X.upload(conn, blob, str(tmp_path / "device"), progress=progress)
        assert progress.tasks == []  # each file's bar goes away when it is done
