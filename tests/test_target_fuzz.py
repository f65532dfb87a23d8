"""Garbage target strings and ~/.ssh/config values: each one parses, or fails as a one-line UserError, never as
another exception (hypothesis is not installed: a fixed list drawn with random.Random(SEED), plus the classics)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from pistill.device import target as T
from pistill.device.bench import BenchConfig
from pistill.errors import UserError

SEED = 20240611
PIECES = [  # what users and fuzzers type: empty, blanks, unicode, control characters, shell, the spec's own syntax
    "", " ", "  ", "\t", "\n", "\r\n", "\x00", "\x07", "\x1b[31m", "\x7f", "é", "ünïcödé", "日本", "\u200b", "\u202e",
    "\uff12\uff12", "٣", "pi", "pi5", "host", "10.0.0.5", "::1", "[::1]", "[::1]:22", "[zz]", "[:::]", "@", "user@",
    "@host", "pi@@pi", "host:", ":22", ":", "host:99999", "host:0", "host:65535", "host:-1", "host:2a", "a,b", ",",
    ",,", "a..b", ".", "..", "-", "_", "a" * 63, "a" * 64, "b" * 70, "x" * 300, ";", "|", "&&", "$(id)", "`id`", "'",
    '"', "\\", "*", "?", "!", "#", "~", "%h", "%%", "-oProxyCommand=x", "ssh://", "ssh://pi@h:2", "local", "none",
    "=", "1m30s", "0", "-5", "4294967296", "1e3",
]
SPECS = ["", " ", "\t", "ünïcödé", "x" * 5000, "pi@host\x00", "pi@host\n", "\x1b[2J", "user@", "@host",
         "host:", "host:99999", "[::1]:22", "pi@[::1]:2200", "a,b", "pi@h; rm -rf ~", "$(reboot)", "`id`",
         "pi@h|cat", "local", "pi@a..b", f"pi@{'a' * 70}", "pi@\ud800", None, 5, ["pi@a"]]
OPTIONS = ["HostName", "Port", "User", "ServerAliveInterval", "ProxyJump", "IdentityFile", "UserKnownHostsFile"]


def garbage(rng: random.Random, n: int, surrogates: bool = True) -> list[str]:
    """`n` strings of 1 to 4 pieces, now and then with a lone surrogate (not in a file: it cannot be written)."""
    out = []
    for _ in range(n):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4)))
        if surrogates and rng.random() < 0.05:
            text += "\udcff"
        out.append(text)
    return out


def outcome(fn, *args) -> str | None:
    """None when `fn` returns or raises a one-line UserError; else what went wrong."""
    try:
        fn(*args)
    except UserError as e:
        if "\n" in str(e) or not str(e).strip():
            return f"{args[0]!r}: a UserError of more than one line: {str(e)!r}"
    except Exception as e:  # noqa: BLE001 (the point of the test)
        return f"{args[0]!r}: {type(e).__name__}: {e}"
    return None


def parsed_is_usable(spec: str, config) -> str | None:
    """A target that parses has what connecting needs: a host getaddrinfo takes, a port, a keepalive, its hops."""
    try:
        t = T.parse_target(spec, config)
    except UserError:
        return None
    try:
        ipaddress.ip_address(t.host)
    except ValueError:
        t.host.encode("idna")  # UnicodeError here is the bug this guards against
        assert t.host.isprintable() and not any(c.isspace() for c in t.host), t.host
    assert 0 < t.port < 65536 and t.keepalive_s > 0 and "\n" not in t.spec
    T.jump_chain(t, config)
    return None


def test_target_strings_parse_or_fail_in_one_line(tmp_path):
    config = tmp_path / "config"
    config.write_text("Host pi5\n  HostName 10.0.0.5\n  Port 2222\nHost jumpy\n  ProxyJump pi5\n")
    specs = SPECS + garbage(random.Random(SEED), 400)
    problems = [p for spec in specs for p in (outcome(T.parse_target, spec, config),
                                              outcome(lambda s: BenchConfig(target=s), spec),
                                              outcome(lambda s: BenchConfig(targets=[s]), spec),
                                              outcome(parsed_is_usable, spec, config)) if p]
    assert not problems, f"{len(problems)} inputs broke through:\n" + "\n".join(problems[:20])
    assert T.parse_target("jumpy", config).proxy_jump == "pi5"  # the config itself is fine


@pytest.mark.parametrize("option", OPTIONS)
def test_ssh_config_values_parse_or_fail_in_one_line(tmp_path, option):
    rng = random.Random(f"{SEED}-{option}")
    config, problems = tmp_path / "config", []
    for value in garbage(rng, 40, surrogates=False) + ["", "a..b", "b" * 70, "abc", "99999", "pi", "x,pi,,y"]:
        for line in (f"{option} {value}", f'{option} "{value}"', f"{option}={value}"):
            config.write_text(f"Host pi\n  {line}\nHost x y\n  ProxyJump pi\n")  # x reaches pi through it
            problems += [f"{line!r}: {p}" for p in (outcome(parsed_is_usable, "pi", config),
                                                    outcome(parsed_is_usable, "bob@x:2200", config)) if p]
    assert not problems, f"{len(problems)} values broke through:\n" + "\n".join(problems[:20])
