"""The runners: the agent as a subprocess here (exit codes read as a shell's, the limit, `stop`); the SSH runner
runs against a real sshd in test_fleet.py."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from pistill.device.protocol import AgentTimeout
from pistill.device.runners import LocalRunner
from pistill.device.target import Interrupted


def python(code: str) -> list[str]:
    """A stand-in for the agent's command line: this python running `code`."""
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("code, rc", [
    ("print('out'); import sys; print('err', file=sys.stderr)", 0),
    ("raise SystemExit(3)", 3),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137),  # a signal reads as the shell's 128 + N
])
def test_local_exit(code, rc):
    res = LocalRunner().run_agent(python(code), 60)
    assert res.rc == rc
    if rc == 0:
        assert (res.stdout, res.stderr) == ("out\n", "err\n")


def test_local_limit_kills_the_agent():
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout):
        LocalRunner().run_agent(python("import time; time.sleep(60)"), 0.5)
    assert time.monotonic() - t0 < 10


def test_local_stop_interrupts():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(Interrupted, match=r"^local: interrupted; the agent \(pid \d+\) was stopped$"):
        LocalRunner(stop).run_agent(python("import time; time.sleep(60)"), 60)
