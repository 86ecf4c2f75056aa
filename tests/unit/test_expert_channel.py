"""The expert channel's framing: tensors of every serving dtype and shape (including no rows) cross a real TCP
connection unchanged; a handler error comes back as an error reply and the connection keeps serving."""

import socket

import pytest
import torch

from specserve.actors.experts.channel import ChannelServer, connect, recv_frame, send_frame


@pytest.fixture
def doubling_server():
    def handle(header, rows):
        if header.get("fail"):
            raise ValueError("asked to fail")
        return rows * 2

    server = ChannelServer(handle)
    yield server
    server.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_round_trip_is_exact(doubling_server, dtype, rows):
    x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with connect(doubling_server.address, 5) as sock:
        send_frame(sock, {"layer": 3, "experts": [1], "counts": [rows]}, x)
        header, out = recv_frame(sock)
    assert "error" not in header and out.dtype == dtype and torch.equal(out, x * 2)


def test_handler_error_is_a_reply_and_the_connection_survives(doubling_server):
    with connect(doubling_server.address, 5) as sock:
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
