"""Two ways to run the agent behind one `run_agent(argv, timeout_s)`: a subprocess on this machine (`LocalRunner`)
and a command on an SSH device (`SSHRunner`).

Both return a `target.Result` whose `rc` reads as a shell's (128 + N: killed by signal N), raise
`protocol.AgentTimeout` past the limit, and `target.Interrupted` once the run is stopped (Ctrl-C in a fleet).
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field

from .protocol import AgentTimeout
from .target import Connection, Interrupted, RemoteTimeout, Result

POLL_S = 0.2  # how often a waiting bench looks for Ctrl-C (a fleet) or a finished agent


@dataclass(frozen=True)
class LocalRunner:
    """The agent as a subprocess here; killed past the limit, on Ctrl-C, or once `stop` is set."""

    stop: threading.Event | None = None  # set on Ctrl-C in a fleet: the agent is killed and Interrupted raised

    def run_agent(self, argv: list[str], timeout_s: float) -> Result:
        """Run `argv` (this python and the agent) to its end; a signal's -N exit becomes the shell's 128 + N."""
        deadline = time.monotonic() + timeout_s
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            try:
                out, err = self._wait(proc, deadline, timeout_s)
            except BaseException:  # the time limit, Ctrl-C, `stop`: never leave the agent running
                proc.kill()
                proc.communicate()
                raise
        return Result(128 - proc.returncode if proc.returncode < 0 else proc.returncode, out, err)

    def _wait(self, proc: subprocess.Popen, deadline: float, timeout_s: float) -> tuple[str, str]:
        """The agent's (stdout, stderr), looking for `stop` and the deadline every POLL_S."""
        while True:
            try:
                return proc.communicate(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if self.stop is not None and self.stop.is_set():
                    raise Interrupted(f"local: interrupted; the agent (pid {proc.pid}) was stopped") from None
                if time.monotonic() > deadline:
                    raise AgentTimeout(f"local: the agent ran past its {timeout_s:g} s limit") from None


@dataclass(frozen=True)
class SSHRunner:
    """The agent on an SSH device under `env`; stopped through the connection's `stop` (Ctrl-C in a fleet)."""

    conn: Connection
    env: dict[str, str] = field(default_factory=dict)  # for the agent, e.g. LLAMA_CPP_LIB_PATH

    def run_agent(self, argv: list[str], timeout_s: float) -> Result:
        """Run `argv` (the device's python and the agent) on the device, under coreutils `timeout` there."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        try:
            return self.conn.run((["env", *env] if env else []) + argv, timeout_s, check=False)
        except RemoteTimeout as e:
            raise AgentTimeout(str(e)) from None
