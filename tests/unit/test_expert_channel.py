"""The expert channel's framing: tensors of every serving dtype and shape (including no rows) cross a real TCP
connection unchanged; a handler error comes back as an error reply and the connection keeps serving. Its
security: a client without the shared token is refused before any frame is read (and a client is never fooled
by a server without it); lengths over the caps and malformed frames close the connection without allocating."""

import socket
import struct
import tracemalloc

import msgpack
import pytest
import torch

from specserve.actors.experts.channel import (ChannelKey, ChannelRefused, ChannelServer, FrameError, FrameTooLarge,
                                              connect, frame_cap, recv_frame, send_frame, server_handshake)

KEY = ChannelKey.generate(max_payload_bytes=1 << 20)


@pytest.fixture
def doubling_server():
    def handle(header, rows):
        if header.get("fail"):
            raise ValueError("asked to fail")
        return rows * 2

    server = ChannelServer(handle, KEY)
    yield server
    server.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_round_trip_is_exact(doubling_server, dtype, rows):
    x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with connect(doubling_server.address, KEY, 5) as sock:
        send_frame(sock, {"layer": 3, "experts": [1], "counts": [rows]}, x)
        header, out = recv_frame(sock)
    assert "error" not in header and out.dtype == dtype and torch.equal(out, x * 2)


def test_handler_error_is_a_reply_and_the_connection_survives(doubling_server):
    with connect(doubling_server.address, KEY, 5) as sock:
        send_frame(sock, {"fail": True}, torch.ones(2, 2))
        header, out = recv_frame(sock)
        assert out is None and header["error"] == "ValueError: asked to fail"
        send_frame(sock, {}, torch.ones(2, 2))
        assert torch.equal(recv_frame(sock)[1], torch.full((2, 2), 2.0))


def test_peer_closing_mid_frame_raises():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\x00\x00\x00\x10\x00\x00\x00\x00")  # promises a 16-byte header, then hangs up
        a.close()
        with pytest.raises(ConnectionError):
            recv_frame(b)


def _wait_closed(sock: socket.socket) -> bool:
    """True once the peer has closed the connection (recv returns nothing or the connection is reset)."""
    sock.settimeout(10)
    try:
        return sock.recv(1 << 16) == b""
    except ConnectionResetError:
        return True


def test_wrong_token_is_refused_and_the_connection_closed(doubling_server):
    with pytest.raises(ChannelRefused, match="refused the channel token"):
        connect(doubling_server.address, ChannelKey.generate(), 5)
    assert doubling_server.refused == 1
    with connect(doubling_server.address, KEY, 5) as sock:  # the right one still works
        send_frame(sock, {}, torch.ones(3))
        assert torch.equal(recv_frame(sock)[1], torch.full((3,), 2.0))


def test_a_client_that_sends_a_frame_instead_of_the_handshake_is_closed_unanswered(doubling_server):
    with socket.create_connection(doubling_server.address, timeout=5) as sock:
        sock.recv(32)  # the server's challenge
        send_frame(sock, {"layer": 0, "experts": [0], "counts": [2]}, torch.ones(2, 4))
        assert _wait_closed(sock)
    assert doubling_server.refused == 1


def test_client_refuses_a_server_without_the_token():
    """A process on the actor's old port (it died) must not receive the rows or answer with made-up results."""
    impostor = ChannelServer(lambda header, rows: rows, ChannelKey.generate())
    try:
        with pytest.raises(ChannelRefused):
            connect(impostor.address, KEY, 5)
    finally:
        impostor.close()


def test_token_is_never_in_a_repr():
    assert KEY.token.hex() not in repr(KEY) and str(KEY.token) not in repr(KEY)
    assert "max_payload_bytes=1048576" in repr(KEY)


def test_oversize_payload_length_is_refused_before_allocating(doubling_server):
    with connect(doubling_server.address, KEY, 5) as sock:
        tracemalloc.start()
        try:
            # Promises a 4 GiB payload: refused on the length alone, nothing of that size is allocated.
            head = msgpack.packb({"layer": 0, "experts": [0], "counts": [1], "dtype": "uint8", "shape": [2**32 - 1]})
            sock.sendall(struct.pack("!II", len(head), 2**32 - 1) + head)
            assert _wait_closed(sock)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20
    assert doubling_server.refused == 1


def test_recv_frame_checks_caps_and_shape_before_reading_the_payload():
    def frame(header: dict, payload_len: int, head_len: int | None = None) -> bytes:
        head = msgpack.packb(header)
        return struct.pack("!II", len(head) if head_len is None else head_len, payload_len) + head

    cases = [
        (frame({}, 0, head_len=(1 << 20) + 1), FrameTooLarge, "header of 1048577 bytes exceeds"),
        (frame({"dtype": "float32", "shape": [1 << 20]}, 4 << 20), FrameTooLarge, "payload of 4194304 bytes"),
        (frame({"dtype": "float32", "shape": [3]}, 8), FrameError, r"needs 12 bytes, the frame carries 8"),
        (frame({"dtype": "float32", "shape": [-1]}, 4), FrameError, "bad tensor shape"),
        (frame({"dtype": "not_a_dtype", "shape": [1]}, 4), FrameError, "unknown tensor dtype"),
        (frame({}, 4), FrameError, "without a tensor carries 4"),
        (struct.pack("!II", 1, 0) + b"\xc1", FrameError, "malformed frame header"),
        (frame([1, 2], 0), FrameError, "not a map"),
    ]
    for data, error, message in cases:
        a, b = socket.socketpair()
        with a, b:
            a.sendall(data)
            with pytest.raises(error, match=message):
                recv_frame(b, max_payload_bytes=1 << 20)


def test_sender_refuses_a_frame_over_the_cap():
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="exceeds the cap of 1024 bytes"):
        send_frame(a, {}, torch.zeros(257), max_payload_bytes=1024)


def test_handshake_times_out_a_silent_client(monkeypatch):
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server_handshake(b, KEY.token)  # the client never answers the challenge


def test_frame_cap_covers_a_full_step_with_margin():
    # 512 tokens, top-2 experts, hidden 576, bfloat16: 1.18 MB of rows at most, capped at twice that.
    assert frame_cap(512, 2, 576, 2) == 2 * 512 * 2 * 576 * 2
    assert frame_cap(1, 1, 8, 4) == 1 << 20  # never under 1 MiB
