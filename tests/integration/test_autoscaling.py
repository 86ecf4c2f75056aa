"""Serve autoscaling from the config: load scales the verifiers up, quiet scales them down, and no request
fails or changes its tokens on the way (delays shortened for the test)."""

import threading
import time

import httpx
import pytest
from ray import serve

from conftest import start_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-autoscale"


def running(deployment="Verifier") -> int:
    states = serve.status().applications[NAME].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def test_verifiers_scale_up_under_load_and_back_down_without_failures(ray_cluster, tmp_path):
    model = make_tiny_model(tmp_path / "model", arch="llama", seed=17)
    server = start_app(ray_cluster, str(model), NAME, **{
        "engine.block_size": 4, "engine.num_blocks": 400, "verifier.num_cpus": 0.25,
        "verifier.autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                 "upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 2}})
    # Long enough (one token per step) that 8 clients keep about 8 requests ongoing, well over the target of 2.
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "speculate": False}
    try:
        expected = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
        assert running() == 1
        stop, results = threading.Event(), []

        def client():
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    r = c.post(f"{server.url}/v1/completions", json=body)
                    results.append((r.status_code, r.json()["choices"][0]["token_ids"] if r.status_code == 200
                                    else r.text))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        t0, peak = time.time(), 1
        try:
            while time.time() - t0 < 120 and peak < 2:
                peak = max(peak, running())
                time.sleep(0.5)
            scaled_up_s = time.time() - t0
            time.sleep(3)  # keep the load on the two replicas for a while
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert peak == 2, "the verifiers never scaled up under load"
        t1 = time.time()
        while running() > 1:
            assert time.time() - t1 < 120, "the verifiers never scaled back down"
            time.sleep(0.5)
        scaled_down_s = time.time() - t1
        failed = [r for r in results if r[0] != 200]
        assert not failed, failed[:3]
        assert all(ids == expected for _, ids in results) and len(results) > 16
        # Still serving after the scale-down.
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        print(f"\nscaled up after {scaled_up_s:.1f} s of load, down {scaled_down_s:.1f} s after it stopped; "
              f"{len(results)} requests, none failed")
    finally:
        server.stop()
