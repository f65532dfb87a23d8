"""The probe snippets: the python probe's JSON line, and free space from `df -Pk` output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pistill.device import probe


@pytest.mark.parametrize("text, expected", [
    ("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/x 100 10 90 10% /\n", 90 * 1024),
    ("", None), ("header only\n", None), ("h\n/dev/x a b c d e\n", None),
])
def test_parse_df(text, expected):
    assert probe.parse_df(text) == expected


def test_df_of_a_folder_not_made_yet(tmp_path):
    out = subprocess.run(["sh", "-c", probe.DF, "sh", str(tmp_path / "not" / "yet")], capture_output=True, text=True,
                         check=True).stdout
    assert probe.parse_df(out) > 0


def test_python_probe():
    out = json.loads(subprocess.run([sys.executable, "-c", probe.PY_PROBE], capture_output=True, text=True,
                                    check=True, timeout=120).stdout)
    assert out["executable"] == sys.executable and out["bits"] in (32, 64) and "numpy" in out["packages"]
