"""`specserve serve` as users run it, in its own process with its own Ray: with server.direct_ingress the ingress
replica itself answers HTTP on the configured port, Serve's proxy is not on that port, greedy output is the plain
model's over HTTP and gRPC, and Ctrl-C stops everything and frees the port."""

import json
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from served_apps import ServeProcess, listen_port
from specserve.v1 import generation_pb2 as pb, generation_pb2_grpc as pb_grpc
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-direct"
PROMPTS = ["Hello there!", "Count: one, two, three,"]


def _listener(port: int) -> psutil.Process:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing listens on port {port}")


def _title(proc: psutil.Process) -> str:
    """Ray names its worker processes in their command line (`ray::ServeReplica:APP:DEPLOYMENT`)."""
    return " ".join(proc.cmdline())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("model"), arch="qwen2", seed=5)
    http_port, grpc_port = listen_port(), listen_port()
    config = tmp_path_factory.mktemp("config") / "direct.yaml"
    config.write_text("server:\n  direct_ingress: true\n")
    with ServeProcess(["--config", str(config), "--model", str(model), "--served-name", NAME, "--dtype", "float32",
                       "--port", str(http_port), "--grpc-port", str(grpc_port), "--verifier-cpus", "0.5"]) as server:
        yield server, model, http_port, grpc_port


def _reference(model: Path, prompt: str, max_tokens: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(model)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_the_ingress_replica_serves_http_itself_with_the_plain_models_greedy_output(served):
    server, model, http_port, grpc_port = served
    owner = _title(_listener(http_port))
    assert "ServeReplica" in owner and "Ingress" in owner, owner  # not Serve's ProxyActor
    assert "ServeReplica" in _title(_listener(grpc_port))
    base = f"http://127.0.0.1:{http_port}"
    with httpx.Client(timeout=120) as client:
        assert client.get(f"{base}/health").status_code == 200
        assert [m["id"] for m in client.get(f"{base}/v1/models").json()["data"]] == [NAME]
        for i, prompt in enumerate(PROMPTS):
            expected = _reference(model, prompt, 8 + 4 * i)
            body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8 + 4 * i,
                    "temperature": 0, "return_token_ids": True}
            r = client.post(f"{base}/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == expected, prompt
            # Streamed over the same port: the chunks' token ids add up to the same answer.
            streamed: list[int] = []
            with client.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as s:
                assert s.status_code == 200
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        for choice in json.loads(line[6:])["choices"]:
                            streamed += choice.get("token_ids") or []
            assert streamed == expected, prompt
    tok = AutoTokenizer.from_pretrained(model)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        ids = tok(PROMPTS[0]).input_ids
        request = pb.GenerateRequest(model=NAME, token_ids=pb.TokenIds(ids=ids),
                                     sampling=pb.SamplingParams(temperature=0.0, max_tokens=6))
        got = [t for chunk in stub.Generate(request, timeout=120) for t in chunk.token_ids]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert got == want
    assert server.proc.poll() is None


def test_ctrl_c_stops_the_server_and_frees_the_port(served):
    server, _, http_port, _ = served
    assert server.interrupt() == 0
    assert any("shutting down" in line for line in server.log)
    for _ in range(20):  # the port closes with the replica's shutdown, just before the process ends
        try:
            _listener(http_port)
        except AssertionError:
            break
        time.sleep(0.5)
    with pytest.raises(AssertionError, match="nothing listens"):
        _listener(http_port)
