"""Helpers the integration tests share: the simulated nodes, a free listen port, deploying an app, and running
`specserve serve` in a process of its own."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from specserve.cluster.config import SpecserveConfig
from specserve.deploy.launcher import LocalServer, port_below_ephemeral


# Two simulated nodes (each its own raylet and object store); tests pin replicas with these resources.
NODE_A, NODE_B = "test_node_a", "test_node_b"


listen_port = port_below_ephemeral  # a free port Ray's own processes will not take


def start_app(ray_cluster, source: str, name: str, **overrides) -> LocalServer:
    base = {"model.source": source, "model.served_name": name, "model.dtype": "float32",
            "verifier.num_cpus": 0.5, "ingress.num_cpus": 0.25, "server.http_port": ray_cluster,
            "server.app_name": name, "server.grpc_port": listen_port(),
            "model.cache_dir": os.environ.get("SPECSERVE_CACHE")}
    base.update(overrides)
    return LocalServer(SpecserveConfig.load(overrides=base)).start(progress=False)


class ServeProcess:
    """`specserve serve ARGS` as a user runs it, in a process group of its own (without the session's
    RAY_ADDRESS: it starts its own Ray unless ARGS name a cluster), its output read as it comes. Use as a context
    manager: it is up once the banner says it is serving, and is stopped (Ctrl-C, then SIGKILL after `grace_s`)
    on leaving, whatever happened."""

    def __init__(self, args: list[str], *, ready_s: float = 300, grace_s: float = 120):
        self.args, self.ready_s, self.grace_s = args, ready_s, grace_s
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._ended = False  # the reader's end-of-output mark was taken
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServeProcess":
        cli = Path(sys.executable).with_name("specserve")
        self.proc = subprocess.Popen([str(cli), "serve", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True)

        def read():
            for line in self.proc.stdout:
                self._lines.put(line)
            self._lines.put(None)  # the process closed its output: it exited

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.ready_s
        try:
            while True:
                try:
                    line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise AssertionError(f"specserve serve did not come up in {self.ready_s:.0f} s:\n"
                                         + self.tail()) from None
                if line is None:
                    self._ended = True
                    raise AssertionError("specserve serve exited:\n" + self.tail())
                self.log.append(line)
                if "is serving" in line:
                    return self
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])

    def interrupt(self) -> int:
        """Ctrl-C to the process group; its exit code, once it has exited, and all it printed in self.log."""
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:  # it has exited already
            pass
        code = self.proc.wait(timeout=self.grace_s)
        while not self._ended:
            try:
                line = self._lines.get(timeout=10)
            except queue.Empty:  # a child of the server still holds its output open
                break
            if line is None:
                self._ended = True
            else:
                self.log.append(line)
        return code

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.interrupt()
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
