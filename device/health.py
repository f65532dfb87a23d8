"""The check a served model must pass: OpenAI-style requests over HTTP/1.1 through whatever byte stream the device
gives (a paramiko direct-tcpip channel through SSH, or a plain socket for `--target local`), with no HTTP library
and no port opened to the network. `check`: GET /v1/models names the model, a chat completion answers, and the time
to first token and decode tok/s are measured.
"""

from __future__ import annotations

import json
import time

from .target import TargetError

PROMPT = "Say hello in one short sentence."


class DeployError(TargetError):
    """Deploying failed on a device; the message says what runs there now."""


def http(dev, host: str, port: int, method: str, path: str, body: dict | None, key: str | None,
         timeout_s: float) -> tuple[int, dict]:
    """One HTTP/1.1 request (Connection: close) over a channel or socket to host:port on the device: (status, JSON)."""
    data = json.dumps(body).encode() if body is not None else b""
    name = f"[{host}]" if ":" in host else host  # an IPv6 address
    head = [f"{method} {path} HTTP/1.1", f"Host: {name}:{port}", "Connection: close", "Accept: application/json",
            f"Content-Length: {len(data)}"] + (["Content-Type: application/json"] if body is not None else []) + (
        [f"Authorization: Bearer {key}"] if key else [])
    sock, chunks = dev.open_http(host, port, timeout_s), []
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except (OSError, EOFError) as e:  # socket.timeout is an OSError
        raise DeployError(f"{dev.spec}: {method} {path} on {host}:{port} got no answer ({type(e).__name__}: "
                          f"{e}) within {timeout_s:g} s") from None
    finally:
        sock.close()
    return parse_response(b"".join(chunks), f"{dev.spec}: {method} {path}")


def parse_response(raw: bytes, what: str) -> tuple[int, dict]:
    """(status, JSON body) of a whole HTTP/1.1 response (Content-Length or chunked)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise DeployError(f"{what}: the answer is not HTTP ({raw[:60]!r})") from None
    if any(ln.lower().replace(" ", "") == "transfer-encoding:chunked" for ln in lines[1:]):
        body = dechunk(body)
    try:
        return status, json.loads(body or b"{}")
    except ValueError:
        raise DeployError(f"{what}: answered {status} with a body that is not JSON ({body[:80]!r})") from None


def dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2:]
    return b"".join(out)


def chat(dev, host: str, port: int, alias: str, key: str | None, max_tokens: int, timeout_s: float) -> dict:
    status, reply = http(dev, host, port, "POST", "/v1/chat/completions",
                         {"model": alias, "messages": [{"role": "user", "content": PROMPT}],
                          "max_tokens": max_tokens, "temperature": 0.0}, key, timeout_s)
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if status != 200 or not choices or "message" not in choices[0]:
        raise DeployError(f"{dev.spec}: POST /v1/chat/completions on {host}:{port} answered {status} without a "
                          f"choice: {json.dumps(reply)[:160]}")
    return reply


def check(dev, host: str, port: int, alias: str, key: str | None, timeout_s: float) -> dict:
    """The server answers as it should: GET /v1/models names `alias`, a chat completion returns a choice. Time to
    first token is a max_tokens=1 request's time; decode tok/s is (completion_tokens - 1) over the time the 8-token
    request took beyond it (completion_tokens over its time when it stopped after one token)."""
    status, models = http(dev, host, port, "GET", "/v1/models", None, key, timeout_s)
    ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)] if isinstance(models, dict) else []
    if status != 200 or alias not in ids:
        raise DeployError(f"{dev.spec}: GET /v1/models on {host}:{port} answered {status} "
                          f"{'without' if status == 200 else 'not'} naming '{alias}': {json.dumps(models)[:160]}")
    t0 = time.monotonic()
    chat(dev, host, port, alias, key, 1, timeout_s)
    ttft = time.monotonic() - t0
    t0 = time.monotonic()
    reply = chat(dev, host, port, alias, key, 8, timeout_s)
    elapsed, n = time.monotonic() - t0, int((reply.get("usage") or {}).get("completion_tokens") or 0)
    decode = (n - 1) / (elapsed - ttft) if n > 1 and elapsed > ttft else n / elapsed
    return {"health": "ok", "ttft_s": round(ttft, 4), "decode_tps": round(decode, 2), "completion_tokens": n,
            "reply": (reply["choices"][0]["message"].get("content") or "")[:80]}
