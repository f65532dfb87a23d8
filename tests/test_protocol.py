"""The agent-call protocol: the agent's command line, its failure line, its JSON, and one model through a runner."""

from __future__ import annotations

import json

import pytest

from pistill.device.bench import BenchConfig
from pistill.device.protocol import AgentTimeout, agent_command, agent_json, failure, time_model
from pistill.device.target import Result

GOOD = {"schema_version": 3, "runtime": {"name": "llama_cpp", "version": "0.3"}, "prefill_tps": 9.0,
        "decode_tps": 3.0, "ttft_s": 0.1, "peak_rss_mb": 50.0, "load_s": 0.2}


def test_agent_command():
    cmd = agent_command("llama_cpp", "m.gguf", BenchConfig(prompt_tokens=[32, 128], threads=4, thread_sweep=[1, 4, 2]))
    assert cmd[1].endswith("agent.py")
    assert cmd[2:] == ["--runtime", "llama_cpp", "--model", "m.gguf", "--threads", "4,1,2", "--prompt-tokens", "32,128",
                       "--gen-tokens", "32", "--repeats", "2", "--warmup", "1", "--cooldown-s", "1",
                       "--bandwidth-mb", "64"]


@pytest.mark.parametrize("rc, stderr, expected", [
    (1, "loading...\nagent: error: torch failed on x: OSError: no\n\n", "agent: error: torch failed on x: OSError: no"),
    (137, "", "agent was killed by SIGKILL (out of memory?) and printed nothing"),
    (139, "partial\n", "agent was killed by SIGSEGV: partial"),
    (3, "", "agent exited with code 3 and printed nothing"),
])
def test_failure(rc, stderr, expected):
    assert failure(rc, stderr) == expected


@pytest.mark.parametrize("stdout, error", [
    ("null\n", "agent printed JSON that is not its result object: 'null'"),
    ('{"decode_tps": 3}\n[1]\n', "agent printed JSON that is not its result object"),
    ("42", "agent printed JSON that is not its result object: '42'"),
    ('"text"', "agent printed JSON that is not its result object: '\"text\"'"),
    ("{}", "agent printed an object without prefill_tps, decode_tps, ttft_s, peak_rss_mb, load_s, runtime"),
    ("", "agent printed no JSON"),
    ("Segmentation fault", "agent printed no JSON"),
])
def test_agent_json_that_is_not_the_result(stdout, error):
    out = agent_json(stdout, "llama_cpp")
    assert out["runtime"] == "llama_cpp" and out["error"].startswith(error), out


def test_agent_json_keeps_a_result():
    assert agent_json("log line\n" + json.dumps(GOOD) + "\n", "llama_cpp") == GOOD


class Canned:
    """A runner that answers every run with one result (or raises AgentTimeout), remembering the command."""

    def __init__(self, result: Result | None):
        self.result, self.argv = result, None

    def run_agent(self, argv: list[str], timeout_s: float) -> Result:
        self.argv = argv
        if self.result is None:
            raise AgentTimeout("too slow")
        return self.result


@pytest.mark.parametrize("result, expected", [
    (Result(0, json.dumps(GOOD) + "\n", ""), GOOD),
    (Result(139, "", ""), {"error": "agent was killed by SIGSEGV and printed nothing", "runtime": "llama_cpp"}),
    (None, {"error": "timed out after 5 s (BenchConfig.timeout_s)", "runtime": "llama_cpp"}),
])
def test_time_model(result, expected):
    runner = Canned(result)
    assert time_model(runner, ["agent", "--x"], "llama_cpp", 5) == expected and runner.argv == ["agent", "--x"]
