"""Tests for `specserve bench`: workloads, statistics, and a run against a fake streaming server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402

from specserve.tools.bench import cli, main, runner  # noqa: E402
from specserve.tools.bench import workloads as wl  # noqa: E402
from specserve.tools.bench.http_client import BenchError  # noqa: E402
from specserve.tools.bench.load import Load  # noqa: E402
from specserve.tools.bench.results import RequestResult, percentile, summarize  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(wl.WORKLOADS))
def test_workloads_deterministic_per_seed(name):
    a = wl.build_workload(name, 24, seed=7)
    assert a == wl.build_workload(name, 24, seed=7)
    assert a != wl.build_workload(name, 24, seed=8)
    assert sum(s.turns for s in a) == 24
    for s in a:
        assert s.messages and all(m["role"] in ("system", "user") and m["content"].strip() for m in s.messages)
        assert s.messages[-1]["role"] == "user" and all(f.strip() for f in s.follow_ups)


def test_workload_prefix_is_stable_as_n_grows():
    # Passes take slices of one stream, so a larger n must extend, not reshuffle, the list.
    for name in wl.WORKLOADS:
        small = wl.build_workload(name, 12, 3)
        assert wl.build_workload(name, 36, 3)[:len(small)] == small


def test_multiturn_and_long_workloads():
    convs = wl.multiturn_workload(12, seed=1, turns=4)
    assert len(convs) == 3 and all(c.turns == 4 and [m["role"] for m in c.messages] == ["system", "user"]
                                   for c in convs)
    assert len({c.messages[0]["content"] for c in convs}) == 3  # tenants rotate
    long = [s.messages[0]["content"] for s in wl.long_workload(10, seed=1)]
    assert all(1000 <= len(p.split()) <= 2500 for p in long)  # ~1,500-2,500 tokens each
    assert len({p[:64] for p in long}) == 10  # distinct from the first block on: no prefix hits


def test_agentic_workload_repeats_one_tool_prompt_with_small_changes():
    sessions = wl.agentic_workload(12, seed=1, turns=4)
    assert len(sessions) == 3 and all(s.turns == 4 for s in sessions)
    assert len({s.messages[0]["content"] for s in sessions}) == 1  # one system prompt with the tools
    tasks = [s.messages[1]["content"] for s in sessions]
    assert len(set(tasks)) == 3 and all("@example.com" in t for t in tasks)
    assert all(s.follow_ups[0].startswith("Tool result: {") for s in sessions)


def test_chat_prompts_short_and_varied():
    prompts = [s.messages[0]["content"] for s in wl.chat_workload(200, 0)]
    assert len(set(prompts)) == 200  # no repeats within a few hundred
    words = [len(p.split()) for p in prompts]
    assert 5 <= min(words) and max(words) <= 35  # roughly 10-40 tokens


def test_shared_prefix_shares_long_prefix_per_tenant():
    reqs = [s.messages for s in wl.shared_prefix_workload(40, seed=1, tenants=4)]
    by_system: dict[str, list[str]] = {}
    for messages in reqs:
        assert [m["role"] for m in messages] == ["system", "user"]
        by_system.setdefault(messages[0]["content"], []).append(messages[1]["content"])
    assert len(by_system) == 4
    for system, users in by_system.items():
        assert len(users) == 10  # tenants visited evenly
        assert len(system.split()) >= 600 and len(system) >= 3500  # ~900 tokens of shared prefix
        assert len(set(users)) > 1
    systems = list(by_system)
    # Distinct tenants: their prompts diverge early, not just in a suffix.
    for i in range(len(systems)):
        for j in range(i + 1, len(systems)):
            common = 0
            for x, y in zip(systems[i], systems[j]):
                if x != y:
                    break
                common += 1
            assert common < 100
    assert len(wl.shared_prefix_workload(12, seed=1, tenants=2)[0].messages) == 2
    assert len({s.messages[0]["content"] for s in wl.shared_prefix_workload(12, seed=1, tenants=2)}) == 2


def test_ideal_prefix_hit_rate_counts_full_blocks_seen_before():
    a = list(range(40))  # 2 full usable blocks of 16
    b = a[:32] + [99] * 9  # shares both blocks with a
    c = a[:20] + [77] * 30  # shares one block
    assert wl.ideal_prefix_hit_rate([a], 16) == 0
    assert wl.ideal_prefix_hit_rate([a, b, c], 16) == pytest.approx((32 + 16) / (40 + 41 + 50))
    assert wl.ideal_prefix_hit_rate([a[:16], a[:16]], 16) == 0  # a prompt's last token is always computed
    assert wl.ideal_prefix_hit_rate([], 16) is None


def test_copy_workload_embeds_passage():
    for s in wl.copy_workload(30, seed=2):
        text = s.messages[0]["content"]
        instruction, _, passage = text.partition("\n\n")
        assert instruction and passage
        assert 70 <= len(passage.split()) <= 160  # ~100-200 tokens to copy


def test_typos_change_text_but_keep_word_count():
    import random

    text = " ".join(wl._PASSAGES[0])
    noisy = wl.add_typos(text, random.Random(0), rate=0.5)
    assert noisy != text and len(noisy.split()) == len(text.split())


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def test_percentile_known_values():
    xs = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([7.0], 90) == 7.0
    assert percentile([], 50) is None


def test_summarize_known_numbers():
    ok1 = RequestResult(ok=True, ttft_s=0.1, e2e_s=1.0, itl_s=[0.1, 0.2, 0.3], output_tokens=10, usage_reported=True)
    ok2 = RequestResult(ok=True, ttft_s=0.3, e2e_s=0.9, itl_s=[0.4], output_tokens=4, usage_reported=True)
    bad = RequestResult(ok=False, error="HTTP 503", e2e_s=0.01)
    s = summarize([ok1, ok2, bad], wall_s=2.0, single_stream=True)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 2, 1)
    assert s["error_kinds"] == {"HTTP 503": 1}
    assert s["ttft_ms_p50"] == pytest.approx(200.0)
    assert s["ttft_ms_p90"] == pytest.approx(280.0)
    assert s["itl_ms_p50"] == pytest.approx(250.0)  # pooled gaps 0.1..0.4
    # TPOT: (1.0-0.1)/9 = 0.1 and (0.9-0.3)/3 = 0.2 -> mean 150 ms -> 6.67 tok/s single stream
    assert s["tpot_ms_mean"] == pytest.approx(150.0)
    assert s["single_stream_tok_s"] == pytest.approx(1000 / 150)
    assert s["output_tokens"] == 14
    assert s["output_tok_s"] == pytest.approx(7.0)
    assert s["req_s"] == pytest.approx(1.0)
    assert s["usage_reported"] is True
    assert summarize([ok1], 1.0)["single_stream_tok_s"] is None


def test_summarize_empty_pass():
    s = summarize([RequestResult(ok=False, error="ConnectError")], wall_s=0.5)
    assert s["ok"] == 0 and s["ttft_ms_p50"] is None and s["tpot_ms_mean"] is None and s["output_tokens"] == 0


def test_parse_config_and_bad_args(capsys):
    cfg = cli.parse_config(["--target", "a=http://127.0.0.1:1/v1/", "--url", "http://127.0.0.1:2",
                              "--workload", "chat,copy", "--workload", "shared-prefix", "--concurrency", "1, 4"])
    assert [(t.label, t.url) for t in cfg.targets] == [("a", "http://127.0.0.1:1"), ("127.0.0.1:2", "http://127.0.0.1:2")]
    mixed = cli.parse_config(["--serve", "s=speculative.method=none", "--target", "peer=http://h:1#m",
                              "--matrix", "store", "--url", "http://h:2"])
    assert [t.label for t in mixed.targets] == ["s", "peer", "store-off", "store-on", "h:2"]  # as given
    assert cfg.workloads == ["chat", "copy", "shared-prefix"]
    assert [(ld.kind, ld.value) for ld in cfg.loads] == [("concurrency", 1), ("concurrency", 4)]
    assert cfg.requests_for(Load("concurrency", 1)) == 8 and cfg.requests_for(Load("concurrency", 16)) == 64
    assert cfg.requests_for(Load("rate", 2.0)) == 20
    for argv in (["--workload", "nope"], ["--concurrency", "0"], ["--concurrency", "x"], ["--target", "nolabel"],
                 ["--url", "127.0.0.1:8000"], ["--url", "http://127.0.0.1:1", "--url", "http://127.0.0.1:1"],
                 ["--max-tokens", "0"], ["--bogus-flag"], ["--rate", "0"], ["--rate", "fast"],
                 ["--slo", "ttft=5"], ["--slo", "ttft_ms=-1"], ["--max-concurrency", "0"], ["--matrix", "nope"]):
        assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "unknown workload" in err and "LABEL=URL" in err


def test_bench_kv_serve_overrides_read_as_bench_serve_reads_them():
    from specserve.tools.bench_kv import serve_overrides

    assert serve_overrides("kv_store.enabled=false, engine.block_size=32,router.policy=pow2") == {
        "kv_store.enabled": False, "engine.block_size": 32, "router.policy": "pow2"}
    assert serve_overrides("") == {}
    with pytest.raises(BenchError, match="--serve"):
        serve_overrides("no-equals-sign")


# ---------------------------------------------------------------------------------------------------------
# End to end against a fake server
# ---------------------------------------------------------------------------------------------------------


class FakeOpenAIServer:
    """Test double for the bench *client*: a tiny OpenAI-style SSE server that streams a fixed reply.

    It records how many requests it saw and the most that were in flight at once.
    """

    MODEL = "fake-model"

    def __init__(self, *, tokens: int = 6, delay: float = 0.004, send_usage: bool = True, fail_every: int = 0,
                 midstream_error: bool = False, metrics: str | None = None):
        """`metrics`: the text GET /metrics answers (None: 404, as a server without specserve's metrics)."""
        self.tokens, self.delay, self.send_usage, self.fail_every = tokens, delay, send_usage, fail_every
        self.metrics = metrics
        self.midstream_error = midstream_error
        self.lock = threading.Lock()
        self.seen = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.app = self._build_app()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def reset(self) -> None:
        with self.lock:
            self.seen = self.in_flight = self.max_in_flight = 0
            self.bodies.clear()
            self.auth.clear()

    def _build_app(self):
        app = fastapi.FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.MODEL, "object": "model"}]}

        @app.get("/metrics")
        async def metrics():
            if self.metrics is None:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return PlainTextResponse(self.metrics)

        async def handle(request: fastapi.Request, *, chat: bool):
            body = await request.json()
            with self.lock:
                self.seen += 1
                n = self.seen
                self.bodies.append(body)
                self.auth.append(request.headers.get("authorization"))
            if body.get("model") != self.MODEL:
                return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
            if self.fail_every and n % self.fail_every == 0:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)

            async def events():
                with self.lock:
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    if chat:  # role-only first chunk, as OpenAI sends; carries no content
                        yield _sse({"object": kind, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                    for i in range(self.tokens):
                        await asyncio.sleep(self.delay)
                        choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                        yield _sse({"object": kind, "choices": [choice], "usage": None})
                        if self.midstream_error and i == 1:  # headers already sent: error goes in-band
                            yield _sse({"error": {"message": "engine died", "type": "server_error"}})
                            yield "data: [DONE]\n\n"
                            return
                    last = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else \
                        {"index": 0, "text": "", "finish_reason": "length"}
                    yield _sse({"object": kind, "choices": [last]})
                    if self.send_usage and (body.get("stream_options") or {}).get("include_usage"):
                        yield _sse({"object": kind, "choices": [], "usage": {
                            "prompt_tokens": 11, "completion_tokens": self.tokens, "total_tokens": 11 + self.tokens}})
                    yield "data: [DONE]\n\n"
                finally:
                    with self.lock:
                        self.in_flight -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat_completions(request: fastapi.Request):
            return await handle(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: fastapi.Request):
            return await handle(request, chat=False)

        return app

    def __enter__(self) -> "FakeOpenAIServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # free port, held open so nothing else can take it
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        self._sock = sock
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def fresh(fake):
    fake.reset()
    return fake


def _terminated_cli(args: list[str], until) -> tuple[int, str]:
    """Run `specserve ARGS`, send it SIGTERM once `until(lines printed so far)` holds; its exit code and output."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([str(Path(sys.executable).with_name("specserve")), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if until(lines):
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines) + rest


def test_a_terminated_bench_writes_the_passes_that_finished(tmp_path):
    """`timeout` or `kill` (SIGTERM) ends a run as Ctrl-C does: the finished passes are written, marked
    incomplete. Before, the process died with nothing written."""
    out = tmp_path / "bench.json"
    with FakeOpenAIServer(tokens=8, delay=0.25) as server:  # 2 s a request
        # Pass 1: 4 requests at once (2 s); pass 2: 4 one at a time (8 s), terminated once under way.
        code, output = _terminated_cli(["bench", "--url", server.url, "--concurrency", "4,1", "--num-requests", "4",
                                        "--warmup", "0", "--max-tokens", "8", "--json", str(out), "--no-plots"],
                                       lambda lines: "[2/2]" in lines[-1])  # the second pass started
    assert code == 130, output
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and [p["load"]["label"] for p in doc["passes"]] == ["c=4"]
    assert doc["passes"][0]["summary"]["ok"] == 4


def test_a_terminated_soak_reports_what_it_saw(tmp_path):
    """`specserve soak` under `timeout` or `kill` (SIGTERM) writes the samples and requests so far, marked
    incomplete and not passed, and exits 130 (after stopping a server it started). Before, the process died with
    nothing written, and a server it had started (Ray, the embedded Redis) was left running."""
    from specserve.cluster.metrics import render, verifier_families

    text = render([({"deployment": "Verifier", "replica": "r0"},
                    verifier_families(_verifier_metrics(0, 0, 0, [0, 0, 0], 0, 0, [0, 0]), "m"))]).decode()
    out = tmp_path / "soak.json"
    with FakeOpenAIServer(tokens=4, delay=0.05, metrics=text) as server:
        code, rest = _terminated_cli(["soak", "--url", server.url, "--duration", "120", "--warmup", "1",
                                      "--sample-every", "0.5", "--concurrency", "2", "--max-tokens", "4", "--json",
                                      str(out)],
                                     lambda lines: sum("soak " in x and "requests" in x for x in lines) >= 4)
    assert code == 130, rest
    res = json.loads(out.read_text())
    assert res["complete"] is False and res["verdict"]["passed"] is False
    assert "interrupted after" in res["verdict"]["problems"][0]
    assert len(res["samples"]) >= 4 and res["summary"]["ok"] > 0 and res["summary"]["errors"] == 0
    assert res["wall_s"] < 60 and "soak FAILED: interrupted" in rest


@pytest.mark.parametrize("concurrency", [1, 4])
def test_end_to_end_against_fake(fresh, tmp_path, capsys, concurrency):
    out = tmp_path / "bench.json"
    n = 12
    rc = main(["--url", fresh.url, "--concurrency", str(concurrency), "--num-requests", str(n),
                     "--warmup", "2", "--max-tokens", "16", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    assert doc["config"]["loads"] == [{"kind": "concurrency", "value": concurrency}]
    (p,) = doc["passes"]
    assert p["model"] == FakeOpenAIServer.MODEL and p["workload"] == "chat" and p["load"]["label"] == f"c={concurrency}"
    reqs = p["requests"]
    assert len(reqs) == n and sorted(r["index"] for r in reqs) == list(range(n))
    assert all(r["ok"] and r["usage_reported"] and r["done"] for r in reqs)
    assert all(r["output_tokens"] == fresh.tokens and r["content_chunks"] == fresh.tokens for r in reqs)
    assert all(r["ttft_s"] > 0 and len(r["itl_s"]) == fresh.tokens - 1 for r in reqs)
    s = p["summary"]
    assert s["ok"] == n and s["errors"] == 0 and s["output_tokens"] == n * fresh.tokens
    assert s["ttft_ms_p50"] > 0 and s["output_tok_s"] > 0 and s["req_s"] > 0 and s["tpot_ms_mean"] > 0
    assert (s["single_stream_tok_s"] is not None) == (concurrency == 1)
    assert s["max_in_flight"] == concurrency
    # The server side: warmup + measured requests, never more than `concurrency` streams at once.
    assert fresh.seen == n + 2
    assert fresh.max_in_flight == concurrency
    body = fresh.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 16 and body["temperature"] == 0
    captured = capsys.readouterr()
    assert "TTFT p50" in captured.out and "chat" in captured.out and fresh.url.split("//")[1] in captured.out
    assert "[1/1]" in captured.err


def test_compare_two_targets_multiple_passes(fresh, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc = main(["--target", f"a={fresh.url}", "--target", f"b={fresh.url}/v1", "--workload",
                     "shared-prefix,copy", "--concurrency", "1,2", "--num-requests", "4", "--warmup", "0",
                     "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["passes"]) == 2 * 2 * 2
    assert fresh.seen == 2 * 2 * 2 * 4
    by_key = {(p["target"], p["workload"], p["load"]["label"]) for p in doc["passes"]}
    assert ("b", "copy", "c=2") in by_key
    assert len(doc["comparisons"]) == 4 and all(c["baseline"] == "a" and c["target"] == "b" and
                                                c["ratios"]["output_tok_s"] > 0 for c in doc["comparisons"])
    # Targets run one after the other and must be sent identical prompts.
    half = len(fresh.bodies) // 2
    def prompts(bodies):
        return sorted(json.dumps(b["messages"]) for b in bodies)
    assert prompts(fresh.bodies[:half]) == prompts(fresh.bodies[half:])
    assert len(set(prompts(fresh.bodies[:half]))) > 4
    table = capsys.readouterr().out
    assert "vs a" in table and "1-stream tok/s" in table
    rows = [line for line in table.splitlines() if line.startswith(("shared-prefix", "copy"))]
    assert len(rows) == 8
    assert [line.rstrip().endswith("x") for line in rows] == [False, True] * 4  # b's rows carry the ratio


def test_completions_endpoint_without_usage(tmp_path, capsys):
    with FakeOpenAIServer(tokens=5, send_usage=False) as server:
        out = tmp_path / "c.json"
        rc = main(["--url", server.url, "--endpoint", "completions", "--concurrency", "2",
                         "--num-requests", "6", "--warmup", "1", "--json", str(out)])
        assert rc == 0
        assert all("prompt" in b and "messages" not in b for b in server.bodies)
    (p,) = json.loads(out.read_text())["passes"]
    assert all(r["ok"] and not r["usage_reported"] and r["output_tokens"] == 5 for r in p["requests"])
    assert p["summary"]["usage_reported"] is False
    assert "no usage in stream" in capsys.readouterr().out


def test_request_errors_are_reported_not_fatal(tmp_path, capsys):
    with FakeOpenAIServer(tokens=3, fail_every=3) as server:
        out = tmp_path / "e.json"
        rc = main(["--url", server.url, "--concurrency", "1", "--num-requests", "9", "--warmup", "0",
                         "--json", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())["passes"][0]["summary"]
    assert (s["ok"], s["errors"], s["error_kinds"]) == (6, 3, {"HTTP 503": 3})
    assert "HTTP 503 x3" in capsys.readouterr().out


def test_in_band_stream_error(tmp_path, capsys):
    with FakeOpenAIServer(tokens=4, midstream_error=True) as server:
        rc = main(["--url", server.url, "--concurrency", "1", "--num-requests", "2", "--warmup", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "StreamError x2" in out and "engine died" in out


def test_unreachable_target_exits_2(capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    assert main(["--url", f"http://127.0.0.1:{port}", "--concurrency", "1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unreachable" in err and len(err.splitlines()) == 1


def test_api_key_sent_but_not_written(fresh, tmp_path):
    out = tmp_path / "k.json"
    rc = main(["--url", fresh.url, "--api-key", "sekrit", "--concurrency", "1", "--num-requests", "1",
                     "--warmup", "0", "--json", str(out)])
    assert rc == 0 and fresh.auth == ["Bearer sekrit"]
    text = out.read_text()
    assert "sekrit" not in text and "***" in text


def test_wrong_model_is_reported_as_request_errors(fresh, capsys):
    rc = main(["--url", fresh.url, "--model", "other", "--concurrency", "1", "--num-requests", "2",
                     "--warmup", "0"])
    assert rc == 0
    assert "HTTP 404 x2" in capsys.readouterr().out


def test_speculation_summary_and_serve_targets(monkeypatch):
    a = RequestResult(ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=10, usage_reported=True, spec_rounds=4,
                      draft_tokens=12, accepted_tokens=6)
    b = RequestResult(ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=5, usage_reported=True, spec_rounds=2,
                      draft_tokens=4, accepted_tokens=1)
    s = summarize([a, b], wall_s=1.0)
    assert s["acceptance_rate"] == pytest.approx(7 / 16)
    assert s["mean_accepted_length"] == pytest.approx((7 + 6) / 6)
    assert summarize([RequestResult(ok=True, output_tokens=3)], 1.0)["mean_accepted_length"] is None

    cfg = cli.parse_config(["--serve", "k2=speculative.method=ngram,speculative.num_speculative_tokens=2",
                              "--serve-base", "model.dtype=bfloat16,server.http_port=8123"])
    (t,) = cfg.targets
    assert t.label == "k2" and t.url == "http://127.0.0.1:8123"
    assert t.serve == {"speculative.method": "ngram", "speculative.num_speculative_tokens": "2"}
    served = runner.ServedTarget(t, cfg.serve_base)
    assert served.config.speculative.num_speculative_tokens == 2 and served.config.model.dtype == "bfloat16"
    with pytest.raises(BenchError, match="invalid server config"):
        runner.ServedTarget(runner.Target("x", "http://h:1", serve={"speculative.method": "telepathy"}), {})
    matrix = cli.parse_config(["--spec-matrix"])
    assert [t.label for t in matrix.targets] == list(runner.MATRICES["spec"])
    both = cli.parse_config(["--matrix", "store", "--matrix", "routing"])
    assert [t.label for t in both.targets] == ["store-off", "store-on", "round_robin", "pow2", "prefix_cost"]
    for t in both.targets:  # every preset is a valid config
        runner.ServedTarget(t, {})
    assert main(["--serve", "nolabel"]) == 2
    # The Ray instance every --serve server shares runs direct ingress on --serve-base's HTTP port, or not.
    assert cli.base_server(cfg.serve_base, cfg.targets).http_port == 8123
    assert cli.base_server({"server.direct_ingress": "false"}).direct_ingress is False
    one = cli.parse_config(["--serve", "a=", "--serve", "b=server.direct_ingress=false"])
    with pytest.raises(BenchError, match="--serve b: server.direct_ingress .* set it in --serve-base"):
        cli.base_server(one.serve_base, one.targets)
    with_direct = cli.parse_config(["--serve", "a=server.http_port=9001", "--serve-base", "server.direct_ingress=true"])
    with pytest.raises(BenchError, match=r"--serve a: server.http_port .* \(with direct ingress\)"):
        cli.base_server(with_direct.serve_base, with_direct.targets)
    assert cli.base_server({}, cli.parse_config(["--serve", "a=server.http_port=9001"]).targets).http_port == 8000

    def no_ray(server):
        raise AssertionError("the bench must refuse this before starting Ray")

    monkeypatch.setattr(cli, "start_ray_if_needed", no_ray)
    assert main(["--serve", "a=server.direct_ingress=false", "--num-requests", "1"]) == 2


# ---------------------------------------------------------------------------------------------------------
# Arrivals, multi-turn sessions, goodput, specserve's figures, plots, soak
# ---------------------------------------------------------------------------------------------------------


def test_poisson_arrivals_are_seeded_and_at_the_rate():
    from specserve.tools.bench.load import poisson_arrivals

    a = poisson_arrivals(2000, 4.0, seed=1)
    assert a == poisson_arrivals(2000, 4.0, seed=1) and a != poisson_arrivals(2000, 4.0, seed=2)
    assert a[0] == 0 and all(x <= y for x, y in zip(a, a[1:]))
    assert 2000 / a[-1] == pytest.approx(4.0, rel=0.1)  # mean gap 1/rate


def test_rate_pass_sends_at_the_arrival_times(fresh, tmp_path):
    from specserve.tools.bench.load import poisson_arrivals

    out = tmp_path / "rate.json"
    assert main(["--url", fresh.url, "--rate", "25", "--num-requests", "10", "--warmup", "0", "--no-plots",
                 "--json", str(out)]) == 0
    (p,) = json.loads(out.read_text())["passes"]
    assert p["load"] == {"kind": "rate", "value": 25.0, "label": "r=25/s"}
    starts = [r["start_s"] for r in sorted(p["requests"], key=lambda r: r["index"])]
    for start, due in zip(starts, poisson_arrivals(10, 25.0, seed=0)):
        assert due - 0.005 <= start <= due + 0.5  # never early; late only by the event loop
    assert p["summary"]["ok"] == 10 and p["summary"]["single_stream_tok_s"] is None
    fresh.reset()
    assert main(["--url", fresh.url, "--rate", "200", "--max-concurrency", "1", "--num-requests", "6",
                 "--warmup", "0"]) == 0
    assert fresh.seen == 6 and fresh.max_in_flight == 1


def test_multiturn_feeds_each_reply_into_the_next_turn(fresh, tmp_path):
    out = tmp_path / "mt.json"
    assert main(["--url", fresh.url, "--workload", "multiturn", "--concurrency", "2", "--num-requests", "8",
                 "--warmup", "0", "--no-plots", "--json", str(out)]) == 0
    (p,) = json.loads(out.read_text())["passes"]
    reqs = sorted(p["requests"], key=lambda r: r["index"])
    assert [(r["session"], r["turn"]) for r in reqs] == [(s, t) for s in range(2) for t in range(4)]
    reply = "".join(f" t{i}" for i in range(fresh.tokens))
    bodies = sorted(fresh.bodies, key=lambda b: len(b["messages"]))
    for turn in range(4):
        at_turn = [b["messages"] for b in bodies if len(b["messages"]) == 2 + 2 * turn]
        assert len(at_turn) == 2  # both conversations reached this turn
        for msgs in at_turn:
            assert [m["content"] for m in msgs[2::2]] == [reply] * turn  # every earlier reply, as it came
            assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * turn + ["user"]


def test_failed_turn_ends_its_conversation():
    with FakeOpenAIServer(tokens=2, fail_every=2) as server:
        assert main(["--url", server.url, "--workload", "multiturn", "--concurrency", "1", "--num-requests", "4",
                     "--warmup", "0"]) == 0
        assert server.seen == 2  # turn 1 failed: turns 2 and 3 were never sent


def test_goodput_counts_requests_within_every_bound():
    from specserve.tools.bench.results import parse_slo

    fast = RequestResult(ok=True, ttft_s=0.1, e2e_s=0.5, output_tokens=5)  # TPOT 100 ms
    slow_first = RequestResult(ok=True, ttft_s=0.9, e2e_s=1.3, output_tokens=5)
    one_token = RequestResult(ok=True, ttft_s=0.2, e2e_s=0.2, output_tokens=1)  # no TPOT: that bound holds
    failed = RequestResult(ok=False, error="HTTP 503")
    slo = parse_slo("ttft_ms=500, tpot_ms=150")
    assert slo == {"ttft_ms": 500.0, "tpot_ms": 150.0}
    s = summarize([fast, slow_first, one_token, failed], wall_s=2.0, slo=slo)
    assert s["goodput_req_s"] == pytest.approx(1.0) and s["slo_attainment"] == pytest.approx(0.5)
    assert summarize([fast], 1.0)["goodput_req_s"] is None
    for bad in ("ttft=5", "ttft_ms", "ttft_ms=x", "e2e_ms=0"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def _verifier_metrics(queries, hits, drafts, at, lookups, store_hits, rows, kv=0.0):
    """Verifier.metrics_stats()'s shape with these counters."""
    stats = {"num_running": 0, "num_waiting": 0, "kv_usage": kv, "kv_blocks_total": 100,
             "prefix_cache_queries": queries, "prefix_cache_hits": hits, "preemptions": 0, "steps": 1,
             "step_time_s": 0.1, "speculation": {"rounds": drafts, "draft_tokens": 3 * drafts,
                                                 "accepted_tokens": sum(at), "accepted_at": at},
             "kv_store": {"lookup_blocks": lookups, "hit_blocks": store_hits, "exported_blocks": 0,
                          "redis_errors": 0, "export_errors": 0},
             "experts": {"rows_per_actor": rows, "resent_to_replica": 0}}
    return stats


def test_server_figures_are_per_pass_differences_summed_over_replicas():
    from specserve.tools.bench import server_stats
    from specserve.cluster.metrics import render, verifier_families

    def text(*replicas):
        return render([({"deployment": "Verifier", "replica": f"r{i}"}, verifier_families(st, "m"))
                       for i, st in enumerate(replicas)]).decode()

    before = text(_verifier_metrics(100, 50, 10, [8, 5, 2], 20, 5, [100, 100]),
                  _verifier_metrics(0, 0, 0, [0, 0, 0], 0, 0, [0, 0]))
    after = text(_verifier_metrics(300, 150, 30, [20, 10, 4], 40, 15, [300, 200]),
                 _verifier_metrics(100, 100, 10, [6, 3, 1], 0, 0, [100, 0], kv=0.25))
    f = server_stats.pass_figures(before, after)
    # drafts 30; accepted at positions (12+6, 5+3, 2+1)
    assert f["spec_drafts"] == 30 and f["acceptance_by_position"] == pytest.approx([18 / 30, 8 / 30, 3 / 30])
    assert f["local_prefix_hit_rate"] == pytest.approx((100 + 100) / (200 + 100))
    assert f["store_block_hit_rate"] == pytest.approx(10 / 20)
    assert f["expert_rows"] == [300, 100] and f["expert_imbalance"] == pytest.approx(300 * 2 / 400)
    assert server_stats.per_replica(after, server_stats.P + "kv_cache_usage_perc") == {
        "Verifier/r0": 0.0, "Verifier/r1": 0.25}
    rss = server_stats.per_replica(after, server_stats.P + "process_resident_memory_bytes", kind="anon")
    assert set(rss) == {"Verifier/r0", "Verifier/r1"} and all(v > 10 * 2 ** 20 for v in rss.values())
    assert server_stats.pass_figures(None, after) is None


def test_plots_are_written_next_to_the_json(fresh, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "run.json"
    assert main(["--target", f"a={fresh.url}", "--target", f"b={fresh.url}", "--workload", "chat,copy",
                 "--concurrency", "1,2", "--num-requests", "4", "--warmup", "0", "--json", str(out)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("run-*.png"))
    assert pngs == ["run-latency-throughput.png", "run-ttft-cdf.png"]  # the fake reports no speculation
    for name in pngs:
        img = imread(tmp_path / name)
        assert img.shape[0] > 300 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05  # drawn on, not blank
    # Acceptance by position from server figures, and --plot redraws from the JSON alone.
    doc = json.loads(out.read_text())
    for p in doc["passes"]:
        p["summary"]["server"] = {"acceptance_by_position": [0.8, 0.5, 0.2], "spec_drafts": 10}
    out.write_text(json.dumps(doc))
    for name in pngs:
        (tmp_path / name).unlink()
    assert main(["--plot", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.glob("run-*.png")) == sorted(pngs + ["run-acceptance.png"])


def test_table_of_a_results_file(fresh, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["--target", f"a={fresh.url}", "--target", f"b={fresh.url}", "--concurrency", "1", "--rate", "50",
                 "--num-requests", "3", "--warmup", "0", "--no-plots", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert main(["--table", str(out)]) == 0
    assert capsys.readouterr().out == printed  # the same table as at the end of the run
    assert main(["--table", str(out), "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| workload | load | target |") and md[1].startswith("|---|")
    assert [line.split(" | ")[1:3] for line in md[2:]] == [["c=1", "a"], ["c=1", "b"], ["r=50/s", "a"],
                                                            ["r=50/s", "b"]]
    assert main(["--table", str(tmp_path / "missing.json")]) == 2


def test_soak_judges_growth_after_warmup_and_leaked_blocks():
    from specserve.tools.bench.soak import growth, verdict

    mb = 2 ** 20
    samples = [{"t": t, "anon": {"Verifier/a": (500 + (t if t < 20 else 20)) * mb, "Ingress/b": (300 + t) * mb}}
               for t in range(0, 100, 5)]
    g = growth(samples, warmup_s=20)
    assert g["Verifier/a"]["growth"] == pytest.approx(0.0)  # grew only during warm-up
    assert g["Ingress/b"]["growth"] == pytest.approx(60.0)  # medians of (20,25,30,35) vs (80,85,90,95)
    assert g["Ingress/b"]["peak"] == pytest.approx(395.0)
    res = {"memory_mb": g, "idle_kv_usage": {"Verifier/a": 0.0}, "summary": {"errors": 0, "error_kinds": {}}}
    assert verdict(res, 64) == []
    assert "Ingress/b: its own memory grew 60.0 MB" in verdict(res, 50)[0]
    res["idle_kv_usage"]["Verifier/a"] = 0.02
    assert any("leaked blocks" in p for p in verdict(res, 64))
    assert "too few memory samples" in verdict({**res, "memory_mb": {}}, 64)[-1]


def test_performance_page_generated_section_matches_the_committed_runs():
    """docs/performance.md's generated section is what `make perf`'s last step writes from docs/perf/, and
    rewriting it leaves the hand-written text around it alone."""
    from pathlib import Path

    from specserve.tools.bench import perf_page

    docs = Path(__file__).parents[2] / "docs"
    page = (docs / "performance.md").read_text()
    # The runs run.sh's last step names: `... perf_page ../performance.md . STEM...`
    last = next(line for line in (docs / "perf" / "run.sh").read_text().splitlines() if "bench.perf_page" in line)
    stems = last.split(" . ", 1)[1].split()
    assert {"peers", "speculation", "soak"} <= set(stems)
    generated = perf_page.section(docs / "perf", stems, "perf")
    assert generated in page, "docs/performance.md is stale: run docs/perf/run.sh's last step"
    assert "| workload | load | target |" in generated and "](perf/soak.png)" in generated
    assert "Ideal prefix hit, computed from each pass's prompts, not measured" in generated
    edited = perf_page.with_section("intro\n" + perf_page.BEGIN + "\nold\n" + perf_page.END + "\noutro\n", "NEW")
    assert edited == "intro\nNEW\noutro\n"
    with pytest.raises(ValueError):
        perf_page.with_section("no markers", "NEW")
