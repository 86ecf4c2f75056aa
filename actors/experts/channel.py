"""A direct TCP channel between a verifier and an expert actor: one framed message per layer each way.

A Ray actor call costs milliseconds on a busy CPU host (task submission, scheduling, object store); a layer's
rows are a few KB to a few MB. The actor therefore also listens on a socket, and the verifier keeps one open
connection per actor for the per-layer traffic; Ray stays the control plane (start, restart, load slots, counts).

Frame: 8-byte big-endian (header length, payload length), a msgpack header, the raw tensor bytes.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable

import msgpack
import torch

log = logging.getLogger(__name__)

_LENGTHS = struct.Struct("!II")
_ONE_WRITE_BYTES = 1 << 18  # below this, copying the payload into one write is cheaper than a second wake-up


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def send_frame(sock: socket.socket, header: dict, tensor: torch.Tensor | None = None) -> None:
    if tensor is not None:
        tensor = tensor.detach().cpu().contiguous()
        header = {**header, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        payload = tensor.view(torch.uint8).reshape(-1).numpy() if tensor.numel() else b""
    else:
        payload = b""
    head = msgpack.packb(header)
    frame = _LENGTHS.pack(len(head), len(payload)) + head
    if len(payload) <= _ONE_WRITE_BYTES:  # one segment: the peer wakes once per message
        sock.sendall(frame + bytes(payload))
    else:
        sock.sendall(frame)
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("channel closed by peer")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> tuple[dict, torch.Tensor | None]:
    head_len, payload_len = _LENGTHS.unpack(_recv_exact(sock, _LENGTHS.size))
    header = msgpack.unpackb(bytes(_recv_exact(sock, head_len)))
    if "dtype" not in header:
        return header, None
    payload = _recv_exact(sock, payload_len) if payload_len else bytearray()
    dtype, shape = _dtype(header["dtype"]), header["shape"]
    if not payload_len:
        return header, torch.empty(shape, dtype=dtype)
    return header, torch.frombuffer(payload, dtype=torch.uint8).view(dtype).reshape(shape)


class ChannelServer:
    """Serves `handle(header, tensor) -> tensor` on a TCP port, one thread per connection. A handler error is
    sent back as {"error": ...} and the connection stays open."""

    def __init__(self, handle: Callable[[dict, torch.Tensor | None], torch.Tensor], host: str = "127.0.0.1"):
        self._handle = handle
        self._listener = socket.create_server((host, 0))
        self.address = (host, self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="expert-channel", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="expert-channel-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    header, tensor = recv_frame(conn)
                except (OSError, ConnectionError):
                    return
                try:
                    out = self._handle(header, tensor)
                except Exception as exc:  # reported to the caller, which treats it as this actor failing
                    log.exception("expert channel request failed")
                    send_frame(conn, {"error": f"{type(exc).__name__}: {exc}"})
                    continue
                send_frame(conn, {}, out)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def connect(address: tuple[str, int], timeout_s: float) -> socket.socket:
    sock = socket.create_connection(tuple(address), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
