"""A direct TCP channel between a verifier and an expert actor: one framed message per layer each way.

A Ray actor call costs milliseconds on a busy CPU host (task submission, scheduling, object store); a layer's
rows are a few KB to a few MB. The actor therefore also listens on a socket, and the verifier keeps one open
connection per actor for the per-layer traffic; Ray stays the control plane (start, restart, load slots, counts).

Frame: 8-byte big-endian (header length, payload length), a msgpack header, the raw tensor bytes.

The port is reachable by anything on the pod network, so a connection first proves that both ends hold the
shared secret of the actors' creator (ChannelKey, handed to actors and verifiers through Ray): an HMAC-SHA256
challenge-response both ways, before any frame is parsed; a connection that fails it is closed. Every frame's
lengths are checked against caps before anything is allocated (the payload cap is derived from the engine's
step budget: see frame_cap), and its payload against the dtype and shape its header declares.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import torch

log = logging.getLogger(__name__)

_LENGTHS = struct.Struct("!II")
_ONE_WRITE_BYTES = 1 << 18  # below this, copying the payload into one write is cheaper than a second wake-up
# A header is the layer, the experts and their row counts (or an error text): a few KB at most.
MAX_HEADER_BYTES = 1 << 20
# Payload cap when the creator knows no step budget (tools, tests that run a whole model forward).
DEFAULT_MAX_PAYLOAD_BYTES = 256 << 20
_NONCE_BYTES = 32
HANDSHAKE_TIMEOUT_S = 10.0
MAX_PENDING_HANDSHAKES = 64  # connections not yet authenticated; more are closed at once


class FrameError(ConnectionError):
    """A frame that breaks the protocol (too large, malformed): the stream cannot be trusted, so it is closed."""


class FrameTooLarge(FrameError):
    pass


class ChannelRefused(ConnectionError):
    """The peer did not prove that it holds the channel's shared token."""


@dataclass(frozen=True)
class ChannelKey:
    """The shared secret of one set of expert actors and the frame cap they and their callers enforce. The
    token never appears in a repr (logs, errors) and is not sent over the channel (only HMACs of it)."""

    token: bytes = field(repr=False)
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    @classmethod
    def generate(cls, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> "ChannelKey":
        return cls(secrets.token_bytes(32), max_payload_bytes)


def frame_cap(max_tokens: int, rows_per_token: int, hidden_size: int, dtype_bytes: int) -> int:
    """Payload cap for a step budget: the most rows one actor can get in a layer (every token's rows, if it
    holds all the chosen experts) times a row's bytes, with a 2x margin, and never under 1 MiB."""
    return max(1 << 20, 2 * max_tokens * max(1, rows_per_token) * hidden_size * dtype_bytes)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def send_frame(sock: socket.socket, header: dict, tensor: torch.Tensor | None = None,
               max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
    if tensor is not None:
        tensor = tensor.detach().cpu().contiguous()
        header = {**header, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        payload = tensor.view(torch.uint8).reshape(-1).numpy() if tensor.numel() else b""
    else:
        payload = b""
    if len(payload) > max_payload_bytes:  # the peer would refuse it: a bug or a cap set too low, not a fault
        raise ValueError(f"expert channel frame of {len(payload)} bytes exceeds the cap of {max_payload_bytes} "
                         f"bytes (derived from engine.max_num_batched_tokens)")
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


def recv_frame(sock: socket.socket, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
               max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, torch.Tensor | None]:
    """One frame. Raises FrameError (nothing allocated for it) when a length is over its cap or the frame is
    malformed, ConnectionError when the peer closes."""
    head_len, payload_len = _LENGTHS.unpack(_recv_exact(sock, _LENGTHS.size))
    if head_len > max_header_bytes:
        raise FrameTooLarge(f"frame header of {head_len} bytes exceeds the cap of {max_header_bytes}")
    if payload_len > max_payload_bytes:
        raise FrameTooLarge(f"frame payload of {payload_len} bytes exceeds the cap of {max_payload_bytes}")
    try:
        header = msgpack.unpackb(bytes(_recv_exact(sock, head_len)))
    except (ValueError, msgpack.UnpackException) as exc:  # msgpack's errors are ValueErrors, mostly
        raise FrameError(f"malformed frame header: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError(f"frame header is a {type(header).__name__}, not a map")
    if "dtype" not in header:
        if payload_len:
            raise FrameError(f"frame without a tensor carries {payload_len} payload bytes")
        return header, None
    try:
        dtype, shape = _dtype(header["dtype"]), header["shape"]
    except (KeyError, TypeError, ValueError) as exc:
        raise FrameError(f"bad tensor header: {exc}") from exc
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FrameError(f"bad tensor shape {shape!r}")
    expected = math.prod(shape) * dtype.itemsize
    if expected != payload_len:
        raise FrameError(f"tensor {header['dtype']}{shape} needs {expected} bytes, the frame carries {payload_len}")
    if not payload_len:
        return header, torch.empty(shape, dtype=dtype)
    payload = _recv_exact(sock, payload_len)
    return header, torch.frombuffer(payload, dtype=torch.uint8).view(dtype).reshape(shape)


def _mac(token: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(token, b"specserve-expert-channel/" + role + server_nonce + client_nonce,
                    hashlib.sha256).digest()


def server_handshake(sock: socket.socket, token: bytes) -> None:
    """Challenge the client; raises ChannelRefused unless it answers with the token's HMAC, then proves the
    server holds it too (so a verifier never sends rows to, or takes results from, another process)."""
    server_nonce = secrets.token_bytes(_NONCE_BYTES)
    sock.sendall(server_nonce)
    answer = bytes(_recv_exact(sock, 2 * _NONCE_BYTES))
    client_nonce, mac = answer[:_NONCE_BYTES], answer[_NONCE_BYTES:]
    if not hmac.compare_digest(mac, _mac(token, b"client", server_nonce, client_nonce)):
        raise ChannelRefused("the client does not hold the channel token")
    sock.sendall(_mac(token, b"server", server_nonce, client_nonce))


def client_handshake(sock: socket.socket, token: bytes) -> None:
    server_nonce = bytes(_recv_exact(sock, _NONCE_BYTES))
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    sock.sendall(client_nonce + _mac(token, b"client", server_nonce, client_nonce))
    try:
        proof = bytes(_recv_exact(sock, _NONCE_BYTES))
    except ConnectionError as exc:
        raise ChannelRefused("the expert actor refused the channel token") from exc
    if not hmac.compare_digest(proof, _mac(token, b"server", server_nonce, client_nonce)):
        raise ChannelRefused("the peer does not hold the channel token (not this transport's expert actor)")


class ChannelServer:
    """Serves `handle(header, tensor) -> tensor` on a TCP port, one thread per connection, to clients that pass
    the handshake for `key`. A handler error is sent back as {"error": ...} and the connection stays open; a
    frame that breaks the protocol closes it."""

    def __init__(self, handle: Callable[[dict, torch.Tensor | None], torch.Tensor], key: ChannelKey,
                 host: str = "127.0.0.1"):
        self._handle = handle
        self._key = key
        self._listener = socket.create_server((host, 0))
        self.address = (host, self._listener.getsockname()[1])
        self._closed = False
        self._handshakes = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)
        self.refused = 0  # connections closed for a failed handshake or a broken frame (a metric, tests)
        threading.Thread(target=self._accept, name="expert-channel", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            if not self._handshakes.acquire(blocking=False):  # a flood of unauthenticated connections
                self.refused += 1
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, peer), name="expert-channel-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        with conn:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                server_handshake(conn, self._key.token)
                conn.settimeout(None)  # a verifier's connection idles between requests
            except (OSError, ConnectionError) as exc:
                self.refused += 1
                log.warning("expert channel: connection from %s refused: %s", peer, exc)
                return
            finally:
                self._handshakes.release()
            while True:
                try:
                    header, tensor = recv_frame(conn, self._key.max_payload_bytes)
                except FrameError as exc:
                    self.refused += 1
                    log.warning("expert channel: closing the connection from %s: %s", peer, exc)
                    return
                except (OSError, ConnectionError):
                    return
                try:
                    out = self._handle(header, tensor)
                except Exception as exc:  # reported to the caller, which treats it as this actor failing
                    log.exception("expert channel request failed")
                    send_frame(conn, {"error": f"{type(exc).__name__}: {exc}"})
                    continue
                send_frame(conn, {}, out, self._key.max_payload_bytes)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def connect(address: tuple[str, int], key: ChannelKey, timeout_s: float) -> socket.socket:
    """An authenticated connection to a ChannelServer holding `key` (raises ChannelRefused otherwise)."""
    sock = socket.create_connection(tuple(address), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_handshake(sock, key.token)
    except BaseException:
        sock.close()
        raise
    return sock
