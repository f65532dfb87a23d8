"""`pistill deploy`: a GGUF model served on a device by llama-cpp-python's OpenAI-compatible server, checked through
an SSH tunnel before and after an atomic switch, rolled back on failure; `status`, `undeploy`, `rollback`, fleets.

Why llama-cpp-python's server: the device venv that pistill provisions for benchmarking already holds llama-cpp-python
built for the board (the cross-built wheel, the same build that was benchmarked), so serving needs only packages
with ready wheels (`SERVE_REQUIREMENTS`), sent from here like that wheel (`serve_wheels`: the device needs no index),
not a second cross build of llama-server. The device side is `served.py` (standard library only), which keeps the
releases, the `current` / `previous` links and the service.

A deploy: resolve the model (a run folder's GGUF by key, or a .gguf file) and refuse bad input before anything is
uploaded (unknown key, a non-loopback listen address without an API key, a port another program holds, a model and
context larger than the device's available memory); upload through the content-addressed cache (a redeploy sends
nothing); `prepare` the release; start a candidate server on a free loopback port and check it through the tunnel
(GET /v1/models names the alias; a chat completion answers; time to first token and decode speed); then stop the
candidate, `switch`, restart the service on its port and check again, rolling back to the previous release when that
fails. Until the switch, the running service is never touched: a failed check or Ctrl-C leaves it serving.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from pistill.artifact import Artifact, ArtifactError, sha256_file
from pistill.errors import InputError, UsageError, UserError
from pistill.hashcache import sha256_many
from pistill.models import cache_dir

from . import doctor, provision, transfer
from .fleet import link_error, manifest_hashes
from .health import DeployError, check, http
from .target import LOCAL, Result, connect, exit_reason, last_line, parse_target

log = logging.getLogger(__name__)

SERVED = Path(__file__).with_name("served.py")
SERVE_REQUIREMENTS = ("fastapi>=0.100.0", "uvicorn>=0.22.0", "sse-starlette>=1.6.1", "starlette-context>=0.3.6,<0.4",
                      "pydantic-settings>=2.0.1", "PyYAML>=5.1")  # llama-cpp-python's `server` extra
SERVE_PLATFORMS = {"aarch64": "manylinux2014_aarch64", "arm64": "manylinux2014_aarch64",  # device machine ->
                   "x86_64": "manylinux2014_x86_64", "amd64": "manylinux2014_x86_64"}  # wheels for glibc >= 2.17
PIP_DOWNLOAD_TIMEOUT_S = 600  # `pip download` of the server's wheels here
SERVE_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings", "yaml")
KINDS = ("auto", "systemd-user", "systemd", "supervised")  # served.py's service kinds; auto: the best that works
COMMAND_TIMEOUT_S = 60  # a served.py command other than start
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
GGUF_STAGES = {"gguf": "student"}  # stage whose one model deploys under another key; baseline keeps its own keys
FLEET_STOP_S = 30  # after Ctrl-C, how long the devices get to stop their candidates
_wheels_lock = threading.Lock()


@dataclass(frozen=True)
class DeployConfig:
    """How a model is served on a device."""

    model: str = "student"  # which GGUF of a run folder: "student" (the gguf stage's), "baseline", "baseline:Q8_0"...
    name: str = "pistill"  # the service (unit pistill-<name>, <cache>/deploy/<name>/) and the model's API alias
    port: int = 8080  # the service's port on the device
    listen: str = "127.0.0.1"  # the address it listens on; anything but loopback needs an API key
    api_key_file: str = ""  # a file holding the API key (one line); sent only into the device's 0600 config
    api_key_env: str = ""  # or the environment variable holding it
    ctx: int = 2048  # context length (n_ctx) in tokens
    threads: int = 0  # llama.cpp threads; 0: llama-cpp-python's default (half the cores)
    check_timeout_s: float = 120.0  # how long a server gets to load its model and answer a check
    service: str = "auto"  # systemd-user, systemd (system unit via sudo -n), supervised, or auto: the first that works
    cache: str = ""  # the cache folder on the device; empty: ~/.cache/pistill (here: PISTILL_CACHE)
    python: str = ""  # the device's python for the server; empty: pistill's venv there, provisioned as for the bench

    def __post_init__(self):
        if not NAME.fullmatch(self.name):
            raise ValueError(f"name '{self.name}' must be 1-32 lowercase letters, digits, '-' or '_' (it names a "
                             "systemd unit and a folder); e.g. pistill")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port; use 1-65535 (e.g. 8080)")
        try:
            address = ipaddress.ip_address(self.listen)
        except ValueError:
            raise ValueError(f"listen '{self.listen}' is not an IP address; use 127.0.0.1 (this device only) or "
                             "0.0.0.0 (every interface, with an API key)") from None
        if self.api_key_file and self.api_key_env:
            raise ValueError("give the API key one way: --api-key-file or --api-key-env, not both")
        if not address.is_loopback and not (self.api_key_file or self.api_key_env):
            raise ValueError(f"listen {self.listen} would let anyone on the network use the model; give an API key "
                             "(--api-key-file F or --api-key-env VAR) or listen on 127.0.0.1 and use ssh -L")
        for field, low in (("ctx", 1), ("threads", 0)):
            if not low <= getattr(self, field) < 2**31:
                raise ValueError(f"{field} {getattr(self, field)} must be an integer from {low} to 2147483647")
        if not 0 < self.check_timeout_s <= 3600:
            raise ValueError(f"check_timeout_s {self.check_timeout_s} must be from 0 to 3600 seconds, e.g. 120")
        if self.service not in KINDS:
            raise ValueError(f"service '{self.service}' is unknown; valid: {', '.join(KINDS)}")


@dataclass(frozen=True)
class SSHOptions:
    """How to reach SSH devices (as `pistill doctor`)."""

    known_hosts: str | None = None  # known_hosts file; None: ssh_config's, else ~/.ssh/known_hosts
    ssh_config: str | None = None  # ssh config file; None: ~/.ssh/config
    accept_host_key: str | None = None  # trust a new host key with exactly this fingerprint


@dataclass(frozen=True)
class Model:
    """The GGUF file to serve."""

    path: Path
    sha256: str
    key: str  # the model key in its run ("student", "baseline:Q8_0"), or the file's name
    source: str  # the run folder (or the file) it came from


# --- what to deploy ----------------------------------------------------------------------------------------------

def gguf_models(folder: Path) -> dict[str, Artifact]:
    """{model key: artifact narrowed to it} for the GGUF models of a run folder (its gguf and baseline artifacts) or
    of one artifact folder."""
    arts = ([Artifact.load(folder)] if (folder / "manifest.json").is_file()
            else [Artifact.load(p.parent) for p in sorted(folder.glob("*/manifest.json"))])
    found = {}
    for a in arts:
        for key, view in a.each_model():
            if (view.model or {}).get("format") == "gguf":
                found[GGUF_STAGES.get(key, key)] = view
    return dict(sorted(found.items(), key=lambda kv: kv[0] not in GGUF_STAGES.values()))  # the student first


def resolve_model(source: str, key: str) -> Model:
    """The model `source` names: a .gguf file, or the GGUF model `key` of a run folder; InputError / UsageError naming
    the fix (an unknown key lists the valid ones)."""
    path = Path(source).expanduser()
    if path.is_file():
        check_gguf(path)
        return Model(path, file_sha256(path), path.name, str(path))
    if not path.is_dir():
        raise InputError(f"{source} is neither a run folder nor a .gguf file; give the folder `pistill run` wrote "
                         "(e.g. runs/default) or a .gguf file")
    try:
        models = gguf_models(path)
    except ArtifactError as e:
        raise InputError(str(e)) from None
    if not models:
        raise InputError(f"{source} holds no GGUF model; run the gguf stage (pistill export {source}) or give a .gguf")
    if key not in models:
        raise UsageError(f"--model '{key}' is not a GGUF model of {source}; valid: {', '.join(models)}")
    view = models[key]
    model = view.model_path()
    check_gguf(model)
    sha, known = file_sha256(model), manifest_hashes(view).get(view.model["file"])
    if known not in (None, sha):
        raise InputError(f"{model} changed after the {view.stage} stage wrote it (sha256 {sha[:12]}..., its manifest "
                         f"says {known[:12]}...); rerun that stage (--force {view.stage})")
    return Model(model, sha, key, f"{path} ({view.stage} {view.id[:12]})")


def file_sha256(path: Path) -> str:
    """sha256 of a local model, remembered by file identity (`pistill.hashcache`): a redeploy does not rehash it."""
    return sha256_many([path])[path]


def check_gguf(path: Path) -> dict:
    """The GGUF's metadata; InputError when it is not a whole GGUF file (a truncated copy is refused here, before it
    is uploaded anywhere)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise InputError(f"{path} is not a whole GGUF file ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                         "export it again (pistill export RUN)") from None
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


def kv_bytes(path: Path, ctx: int) -> int:
    """The f16 KV cache of `ctx` tokens: 2 (K, V) x layers x KV heads x head size x 2 bytes (0 when the header does
    not say)."""
    meta = check_gguf(path)
    arch = meta.get("general.architecture", "")
    layers, heads = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.attention.head_count")
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    width = meta.get(f"{arch}.embedding_length")
    if not all(isinstance(v, (int, list)) for v in (layers, heads, kv, width)) or isinstance(heads, list):
        return 0
    head_dim = meta.get(f"{arch}.attention.key_length") or width // heads
    per_layer = sum(kv) / len(kv) if isinstance(kv, list) else kv
    return int(2 * layers * per_layer * head_dim * 2 * ctx)


def check_memory(spec: str, model: Model, cfg: DeployConfig, facts: dict) -> None:
    """DeployError when the model, its KV cache and the runtime exceed the device's available memory."""
    avail = facts.get("mem_available_mb")
    need = model.path.stat().st_size + kv_bytes(model.path, cfg.ctx) + doctor.MODEL_OVERHEAD_B
    if avail is not None and need / (1 << 20) > avail:
        raise DeployError(f"{spec}: {model.path.name} with a {cfg.ctx}-token context needs about "
                          f"{need / (1 << 20):.0f} MiB, the device has {avail:.0f} MiB available; choose a smaller "
                          "model or quant, or a shorter --ctx; nothing was changed on the device")


def read_api_key(cfg: DeployConfig) -> str | None:
    """The API key from its file or variable, None without one; UsageError naming the source (never the key)."""
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        try:
            if not path.is_file():  # a FIFO would block, a folder cannot be read
                raise FileNotFoundError("not a regular file")
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file {cfg.api_key_file} cannot be read ({type(e).__name__}); give a "
                             "readable file holding the key on one line") from None
        where = f"--api-key-file {cfg.api_key_file}"
    elif cfg.api_key_env:
        key, where = os.environ.get(cfg.api_key_env, "").strip(), f"--api-key-env {cfg.api_key_env}"
    else:
        return None
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise UsageError(f"{where}: the key is empty or holds spaces or control characters; use one line of "
                         "printable ASCII (e.g. `openssl rand -hex 24`)")
    return key


def release_id(model: Model, cfg: DeployConfig, key: str | None) -> str:
    """A release is a model and how it is served: sha256[:12] of the model, 8 hex of the settings (never the key)."""
    settings = {"ctx": cfg.ctx, "alias": cfg.name, "threads": cfg.threads, "host": cfg.listen, "port": cfg.port,
                "api_key": key is not None}
    return f"{model.sha256[:12]}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"


# --- devices -----------------------------------------------------------------------------------------------------

class LocalDevice:
    """This machine as the device: served.py as a subprocess, the cache in PISTILL_CACHE, plain sockets."""

    spec = LOCAL

    def __init__(self, python: str = ""):
        self.python = python or sys.executable  # runs served.py (and, by default, the server)

    def clear_stop(self) -> None:
        pass

    def cache(self, folder: str) -> str:
        return str(Path(folder).expanduser() if folder else cache_dir())

    def run(self, argv: list[str], timeout_s: float) -> Result:
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DeployError(f"local: `{argv[2] if len(argv) > 2 else argv[0]}` ran past its {timeout_s:g} s "
                              "limit") from None
        return Result(128 - p.returncode if p.returncode < 0 else p.returncode, p.stdout, p.stderr)

    def facts(self, cache: str) -> dict:
        return doctor.probe(None, cache, self.python)

    def server_python(self, facts: dict, cfg: DeployConfig, cache: str) -> str:
        python = cfg.python or self.python
        if lack := missing_modules(self, python):
            raise DeployError(f"local: {python} lacks {', '.join(lack)} for llama-cpp-python's server; install them "
                              f"({python} -m pip install 'pistill[deploy]')")
        return python

    def put_script(self, cache: str) -> str:
        return str(SERVED)

    def put_blob(self, model: Model, cache: str) -> transfer.Upload:
        """The model as <cache>/blobs/<sha256>, checked by its hash: a hard link where the cache shares the file system
        (stages replace files by renaming, so the blob keeps its bytes when the run is rebuilt), else a copy."""
        final, size = Path(cache) / "blobs" / model.sha256, model.path.stat().st_size
        if final.is_file() and final.stat().st_size == size and sha256_file(final) == model.sha256:
            return transfer.Upload(str(final), model.sha256, size, 0, 0, skipped=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(f"{model.sha256}.part-{os.getpid()}")
        try:
            try:
                os.link(model.path, part)
            except OSError:  # another file system, or no hard links
                shutil.copyfile(model.path, part)
            if sha256_file(part) != model.sha256:
                raise DeployError(f"local: {model.path} changed while it was copied; rerun")
            os.replace(part, final)
        finally:
            part.unlink(missing_ok=True)
        return transfer.Upload(str(final), model.sha256, size, size, 0)

    def put_secret(self, path: str, text: str) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)

    def open_http(self, host: str, port: int, timeout_s: float):
        try:
            return socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise DeployError(f"local: nothing answers on {host}:{port} ({e.strerror or e})") from None


class SSHDevice:
    """An SSH device: served.py through `Connection.run`, uploads through the content-addressed cache, HTTP through a
    direct-tcpip channel (an SSH tunnel to the device's loopback)."""

    def __init__(self, conn, python: str = ""):
        self.conn, self.spec = conn, conn.target.spec
        self.python = python or "python3"  # runs served.py (standard library only)

    def clear_stop(self) -> None:
        self.conn.stop = None  # cleaning up after Ctrl-C must not be interrupted itself

    def cache(self, folder: str) -> str:
        return self.conn.expand(folder or transfer.CACHE).rstrip("/")

    def run(self, argv: list[str], timeout_s: float) -> Result:
        return self.conn.run(argv, timeout_s, check=False)

    def facts(self, cache: str) -> dict:
        return doctor.probe(self.conn, cache, self.python)

    def server_python(self, facts: dict, cfg: DeployConfig, cache: str) -> str:
        """The python of the bench's provisioning (`provision.plan`: pistill's venv, created and given the board's
        llama-cpp-python where it lacks them), with llama-cpp-python's server packages installed into it from wheels
        sent from here (`serve_wheels`), or named for the user to install into their own python."""
        plan = provision.plan(self.conn, facts, ["llama_cpp"], cfg.python, cache)
        provision.provision(self.conn, plan, ["llama_cpp"], cache)
        if not (lack := missing_modules(self, plan.python)):
            return plan.python
        if cfg.python:
            raise DeployError(f"{self.spec}: {cfg.python} lacks {', '.join(lack)} for llama-cpp-python's server; "
                              f"install them there ({cfg.python} -m pip install "
                              f"{' '.join(repr(r) for r in SERVE_REQUIREMENTS)}) or leave --python empty")
        version = (provision.probe_python(self.conn, plan.python) or {}).get("version", "")
        wheels = serve_wheels(facts, version)
        source = ["--no-index", "--find-links", provision.WHEELS] if wheels else []  # else the device's own index
        install = [plan.python, "-m", "pip", "install", *source, *SERVE_REQUIREMENTS]
        provision.provision(self.conn, provision.Plan(plan.python, [install], plan.env, wheels), ["llama_cpp"], cache)
        if lack := missing_modules(self, plan.python):
            raise DeployError(f"{self.spec}: after installing llama-cpp-python's server packages, {plan.python} "
                              f"still lacks {', '.join(lack)}; see pip's output above")
        return plan.python

    def put_script(self, cache: str) -> str:
        tree, _ = transfer.upload_tree(self.conn, {"served.py": SERVED}, cache)
        return f"{tree}/served.py"

    def put_blob(self, model: Model, cache: str) -> transfer.Upload:
        return transfer.upload(self.conn, model.path, cache, model.sha256)

    def put_secret(self, path: str, text: str) -> None:
        """Write `text` to a file of mode 0600 (chmod before the key is written; the release folder is 0700)."""
        tmp = f"{path}.tmp"
        with self.conn.sftp.open(tmp, "w") as f:
            f.chmod(0o600)
            f.write(text + "\n")
        self.conn.sftp.posix_rename(tmp, path)

    def open_http(self, host: str, port: int, timeout_s: float):
        import paramiko

        try:
            chan = self.conn.client.get_transport().open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                                                 timeout=timeout_s)
        except (paramiko.SSHException, OSError) as e:
            raise DeployError(f"{self.spec}: the SSH tunnel to {host}:{port} on the device failed "
                              f"({getattr(e, 'text', '') or e}); is the server up (pistill status)?") from None
        chan.settimeout(timeout_s)
        return chan


def serve_wheels(facts: dict, version: str) -> dict[str, Path]:
    """llama-cpp-python's server packages and their dependencies as wheels for the device's platform and python
    (pydantic-core and PyYAML are the binary ones), downloaded here once into <cache>/wheels/serve-<platform>-<cp>-
    <key>/, so the device installs them without reaching an index (as the cross-built llama wheel); {} where there
    are none for its platform or this machine cannot download them: then the device's pip fetches them itself."""
    platform = None if facts.get("bits") == 32 else SERVE_PLATFORMS.get(facts.get("machine"))
    if not platform or not re.fullmatch(r"3\.\d+(\.\d+)?", version):
        return {}
    cp = "cp3" + version.split(".")[1]
    key = hashlib.sha256(json.dumps(SERVE_REQUIREMENTS).encode()).hexdigest()[:12]
    dest = cache_dir() / "wheels" / f"serve-{platform}-{cp}-{key}"
    with _wheels_lock:  # a fleet's devices share one download
        if not dest.is_dir() and not download_wheels(dest, platform, version):
            return {}
    return {w.name: w for w in sorted(dest.glob("*.whl"))}


def download_wheels(dest: Path, platform: str, version: str) -> bool:
    """`pip download` of SERVE_REQUIREMENTS for a CPython `version` on `platform` into `dest` (whole or not at all)."""
    cp = "cp3" + version.split(".")[1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--platform",
                            platform, "--implementation", "cp", "--python-version", ".".join(version.split(".")[:2]),
                            "--abi", cp, "--dest", str(tmp), *SERVE_REQUIREMENTS], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S)
        if p.returncode:
            log.info("the server's wheels for %s %s could not be downloaded here (%s); the device's pip installs "
                     "them", platform, cp, last_line(p.stderr, p.stdout))
            return False
        os.replace(tmp, dest)  # only a complete set lands in the cache
        return True
    except subprocess.TimeoutExpired:
        log.info("downloading the server's wheels for %s %s took over %d s; the device's pip installs them",
                 platform, cp, PIP_DOWNLOAD_TIMEOUT_S)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def missing_modules(dev, python: str) -> list[str]:
    """The server's modules that `python` on the device cannot import (all of them when it does not run)."""
    code = ("import importlib.util,json;print(json.dumps([m for m in %r if importlib.util.find_spec(m) is None]))"
            % (SERVE_MODULES,))
    res = dev.run([python, "-c", code], COMMAND_TIMEOUT_S)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1]) if res.rc == 0 else list(SERVE_MODULES)
    except (ValueError, IndexError):
        return list(SERVE_MODULES)


@contextlib.contextmanager
def open_device(spec: str, ssh: SSHOptions | None = None, python: str = ""):
    """`with open_device(spec, ssh, python) as dev`: this machine for "local", else an SSH connection; a link that
    dies on the way (SFTP, a channel) is a one-line DeployError naming the device."""
    import paramiko

    o = ssh or SSHOptions()
    try:
        if spec == LOCAL:
            yield LocalDevice(python)
            return
        conn = connect(parse_target(spec, o.ssh_config), o.known_hosts, o.accept_host_key, o.ssh_config)
        with conn:
            yield SSHDevice(conn, python)
    except (EOFError, paramiko.SSHException) as e:
        raise DeployError(link_error(spec, e)) from None
    except OSError as e:
        if spec == LOCAL:
            raise
        raise DeployError(link_error(spec, e)) from None


def served(dev, script: str, command: str, *args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> dict:
    """Run a served.py subcommand on the device and return its JSON; DeployError with its one-line error."""
    res = dev.run([dev.python, script, command, *args], timeout_s)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeployError(f"{dev.spec}: served.py {command} {exit_reason(res.rc)}: "
                          f"{last_line(res.stderr, res.stdout)}") from None
    if not isinstance(out, dict) or not out.get("ok"):
        raise DeployError(f"{dev.spec}: {out.get('error') if isinstance(out, dict) else out}")
    return out


# --- HTTP through the tunnel -------------------------------------------------------------------------------------

# --- deploying ---------------------------------------------------------------------------------------------------

def connect_host(listen: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen, listen)


def deploy_dir(dev, cfg_cache: str, name: str) -> tuple[str, str]:
    cache = dev.cache(cfg_cache)
    return cache, f"{cache}/deploy/{name}"


def refuse_busy_port(dev, script: str, d: str, cfg: DeployConfig) -> None:
    out = served(dev, script, "port-free", "--dir", d, "--host", cfg.listen, "--port", str(cfg.port))
    if not out["free"] and not out["ours"]:
        raise DeployError(f"{dev.spec}: port {cfg.port} on {cfg.listen} is in use by another program; choose another "
                          "--port (or stop that program); nothing was changed on the device")


def deploy_on(dev, model: Model, key: str | None, cfg: DeployConfig) -> dict:
    """Deploy `model` on an open device; the summary, or DeployError with the old service still serving."""
    cache, d = deploy_dir(dev, cfg.cache, cfg.name)
    facts = dev.facts(cache)
    check_memory(dev.spec, model, cfg, facts)
    script = dev.put_script(cache)  # pistill's own cache: no change to what is deployed
    refuse_busy_port(dev, script, d, cfg)
    python = dev.server_python(facts, cfg, cache)
    up = dev.put_blob(model, cache)
    release = release_id(model, cfg, key)
    meta = {"sha256": model.sha256, "source": model.source, "model": model.key, "created": time.time(),
            "ctx": cfg.ctx, "alias": cfg.name, "threads": cfg.threads, "host": cfg.listen, "port": cfg.port,
            "bytes": up.bytes}
    served(dev, script, "prepare", "--dir", d, "--release", release, "--blob", up.path,
           "--meta", json.dumps(meta))
    if key:
        dev.put_secret(f"{d}/releases/{release}/api_key", key)
    script = f"{d}/served.py"
    candidate = try_candidate(dev, script, d, release, python, cfg, key)
    log.info("%s: the candidate answers (first token %.3f s, decode %.1f tok/s); switching", dev.spec,
             candidate["ttft_s"], candidate["decode_tps"])
    main = switch_and_serve(dev, script, d, release, python, cfg, key)
    return {"target": dev.spec, "model": model.key, "sha256": model.sha256, "release": release,
            "endpoint": f"http://{cfg.listen}:{cfg.port}/v1", "uploaded_bytes": up.sent, "skipped": up.skipped,
            "candidate": candidate, **main}


def try_candidate(dev, script: str, d: str, release: str, python: str, cfg: DeployConfig, key: str | None) -> dict:
    """Start the release as a candidate on a free loopback port, check it through the tunnel, and stop it whatever
    happens (Ctrl-C included): the running service is untouched."""
    t = cfg.check_timeout_s
    try:
        c = served(dev, script, "start", "--dir", d, "--slot", "candidate", "--release", release, "--python", python,
                   "--timeout", f"{t:g}", timeout_s=t + COMMAND_TIMEOUT_S)
        return check(dev, c["host"], c["port"], cfg.name, key, t)
    except DeployError as e:
        raise DeployError(f"{e}; the new model was not switched in: the service runs as before") from None
    finally:
        stop_candidate(dev, script, d, t)


def stop_candidate(dev, script: str, d: str, wait_s: float) -> None:
    """Stop the candidate; after Ctrl-C the device's lock makes this wait for the `start` that was cut off."""
    dev.clear_stop()
    try:
        served(dev, script, "stop", "--dir", d, "--slot", "candidate", timeout_s=wait_s + COMMAND_TIMEOUT_S)
    except UserError as e:
        log.warning("%s: could not stop the candidate server (%s); it stops by itself after its check time", dev.spec,
                    e)


def switch_and_serve(dev, script: str, d: str, release: str, python: str, cfg: DeployConfig,
                     key: str | None) -> dict:
    """Switch the links, restart the service on its port and check it; on failure go back to the previous release."""
    sw = served(dev, script, "switch", "--dir", d, "--release", release)
    t = cfg.check_timeout_s
    try:
        m = served(dev, script, "start", "--dir", d, "--python", python, "--kind", cfg.service, "--timeout",
                   f"{t:g}", timeout_s=t + COMMAND_TIMEOUT_S)
        health = check(dev, connect_host(cfg.listen), cfg.port, cfg.name, key, t)
    except DeployError as e:
        if not sw["previous"]:
            raise DeployError(f"{e}; there is no previous release to go back to (pistill undeploy removes it)") \
                from None
        try:
            served(dev, script, "rollback", "--dir", d)
            served(dev, script, "start", "--dir", d, "--python", python, "--kind", cfg.service, "--timeout",
                   f"{t:g}", timeout_s=t + COMMAND_TIMEOUT_S)
        except DeployError as again:
            raise DeployError(f"{e}; rolling back to {sw['previous']} failed too: {again}") from None
        raise DeployError(f"{e}; rolled back to the previous release {sw['previous']}, which serves again") from None
    return {"service": m["kind"], "pid": m["pid"], "previous": sw["previous"], **health}


def deploy(source: str, spec: str, cfg: DeployConfig, ssh: SSHOptions | None = None) -> dict:
    """Deploy the model `source` names (a run folder and `cfg.model`, or a .gguf file) on one target."""
    model, key = resolve_model(source, cfg.model), read_api_key(cfg)
    with open_device(spec, ssh, cfg.python) as dev:
        return deploy_on(dev, model, key, cfg)


def deploy_one(spec: str, model: Model, key: str | None, cfg: DeployConfig, ssh: SSHOptions | None,
               stop: threading.Event | None = None) -> dict:
    """One device of a fleet: its summary, or {"target", "error"} (its previous model keeps serving)."""
    try:
        with open_device(spec, ssh, cfg.python) as dev:
            if isinstance(dev, SSHDevice):
                dev.conn.stop = stop
            return deploy_on(dev, model, key, cfg)
    except UserError as e:
        return {"target": spec, "error": str(e)}


def deploy_fleet(source: str, specs: list[str], cfg: DeployConfig, ssh: SSHOptions | None = None) -> dict[str, dict]:
    """The first device is the canary: deployed and checked alone; if it fails nothing else is touched. Then the
    others in parallel; a device that fails keeps its previous model. {spec: summary or {"error"}}."""
    model, key = resolve_model(source, cfg.model), read_api_key(cfg)
    for spec in specs:
        if spec != LOCAL:
            parse_target(spec, (ssh or SSHOptions()).ssh_config)  # a bad spec: one UsageError before any device
    results = {specs[0]: deploy_one(specs[0], model, key, cfg, ssh)}
    if "error" in results[specs[0]]:
        return results | {s: {"target": s, "error": f"{s}: not deployed: the canary {specs[0]} failed"}
                          for s in specs[1:]}
    rest, stop = specs[1:], threading.Event()
    if not rest:
        return results
    pool = ThreadPoolExecutor(max_workers=len(rest))
    futures = {s: pool.submit(deploy_one, s, model, key, cfg, ssh, stop) for s in rest}
    try:
        while wait(futures.values(), timeout=0.2).not_done:  # a timed wait: Ctrl-C is seen at once
            pass
    except KeyboardInterrupt:
        stop.set()  # each device stops its candidate; one past its switch finishes it
        wait(futures.values(), timeout=FLEET_STOP_S)
        raise
    finally:
        pool.shutdown(wait=False)
    return results | {s: f.result() for s, f in futures.items()}


# --- rollback, status, undeploy ----------------------------------------------------------------------------------

def rollback(spec: str, cfg: DeployConfig, ssh: SSHOptions | None = None) -> dict:
    """Serve the previous release again (current and previous swap) and check that it answers; the API key, when
    the release has one, is needed for the full check (without it a 401 counts as up)."""
    key = read_api_key(cfg)
    with open_device(spec, ssh, cfg.python) as dev:
        cache, d = deploy_dir(dev, cfg.cache, cfg.name)
        script = dev.put_script(cache)
        before = served(dev, script, "status", "--dir", d)
        if not before["deployed"]:
            raise DeployError(f"{spec}: nothing is deployed as '{cfg.name}'; deploy a model first")
        sw = served(dev, script, "rollback", "--dir", d)
        t = cfg.check_timeout_s
        m = served(dev, f"{d}/served.py", "start", "--dir", d, "--python", before.get("python") or dev.python,
                   "--kind", before.get("kind") or cfg.service, "--timeout", f"{t:g}", timeout_s=t + COMMAND_TIMEOUT_S)
        host = connect_host(m["host"])
        status, _ = http(dev, host, m["port"], "GET", "/v1/models", None, key, t)
        health = check(dev, host, m["port"], cfg.name, key, t) if status != 401 else {"health": "up (API key needed)"}
        now = served(dev, script, "status", "--dir", d)
    return {"target": spec, "release": sw["current"], "sha256": now["sha256"], "previous": sw["previous"],
            "service": m["kind"], "endpoint": f"http://{m['host']}:{m['port']}/v1", **health}


def status(spec: str, name: str = "pistill", ssh: SSHOptions | None = None, cache: str = "",
           python: str = "") -> dict:
    """What runs as `name` on the device: served.py's status (pid, port, model, since, RSS) and its endpoint."""
    with open_device(spec, ssh, python) as dev:
        root, d = deploy_dir(dev, cache, name)
        out = served(dev, dev.put_script(root), "status", "--dir", d)
    endpoint = f"http://{out['host']}:{out['port']}/v1" if out.get("deployed") else None
    return {"target": spec, "name": name, "endpoint": endpoint, **{k: v for k, v in out.items() if k != "ok"}}


def undeploy(spec: str, name: str = "pistill", ssh: SSHOptions | None = None, cache: str = "",
             python: str = "") -> dict:
    """Stop the service, remove its unit and its releases (the model blobs stay in the content-addressed cache)."""
    with open_device(spec, ssh, python) as dev:
        root, d = deploy_dir(dev, cache, name)
        out = served(dev, dev.put_script(root), "undeploy", "--dir", d)
    return {"target": spec, "name": name, "removed": out["removed"], "stopped": out["stopped"]}
