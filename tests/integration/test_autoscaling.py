"""Serve autoscaling from the config: load scales the verifiers up and the drafters follow them, quiet scales
both down, and no request fails or changes its tokens on the way (delays shortened for the test)."""

import threading
import time

import httpx
import pytest
from ray import serve

from conftest import start_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-autoscale"
FAST = {"upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 2}


def running(deployment: str) -> int:
    states = serve.status().applications[NAME].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def test_verifiers_scale_with_load_drafters_follow_and_nothing_fails(ray_cluster, tmp_path):
    model = make_tiny_model(tmp_path / "model", arch="llama", seed=17, num_layers=4)
    server = start_app(ray_cluster, str(model), NAME, **{
        "engine.block_size": 4, "engine.num_blocks": 400, "verifier.num_cpus": 0.25, "drafter.num_cpus": 0.25,
        "speculative.method": "layer_skip", "speculative.adaptive": False, "speculative.num_speculative_tokens": 2,
        "verifier.autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, **FAST},
        "drafter.autoscaling": {"min_replicas": 1, "max_replicas": 2, **FAST}})
    # Long enough that 8 clients keep about 8 requests ongoing, well over the verifiers' target of 2.
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    try:
        expected = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
        assert running("Verifier") == 1 and running("Drafter") == 1
        stop, results = threading.Event(), []

        def client():
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    r = c.post(f"{server.url}/v1/completions", json=body)
                    results.append((r.status_code, r.json() if r.status_code == 200 else r.text))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        t0, peak, up_s = time.time(), {"Verifier": 1, "Drafter": 1}, {}
        try:
            while time.time() - t0 < 180 and min(peak.values()) < 2:
                for d in peak:
                    peak[d] = max(peak[d], running(d))
                    if peak[d] == 2:
                        up_s.setdefault(d, time.time() - t0)
                time.sleep(0.5)
            time.sleep(3)  # keep the load on two verifiers and two drafters for a while
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert peak["Verifier"] == 2, "the verifiers never scaled up under load"
        assert peak["Drafter"] == 2, "the drafters did not follow the verifiers up"
        t1, down_s = time.time(), {}
        while len(down_s) < 2:
            for d in ("Verifier", "Drafter"):
                if d not in down_s and running(d) == 1:
                    down_s[d] = time.time() - t1
            assert time.time() - t1 < 120, f"not scaled back down: {down_s}"
            time.sleep(0.5)
        failed = [r for r in results if r[0] != 200]
        assert not failed, failed[:3]
        assert len(results) > 16
        assert all(r["choices"][0]["token_ids"] == expected for _, r in results)
        assert sum(r["usage"]["speculation"]["draft_tokens"] for _, r in results) > 0  # the drafters drafted
        # Still serving after the scale-down.
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        print(f"\nunder load: verifiers at 2 after {up_s['Verifier']:.1f} s, drafters at 2 after "
              f"{up_s['Drafter']:.1f} s; after it: verifiers at 1 in {down_s['Verifier']:.1f} s, drafters in "
              f"{down_s['Drafter']:.1f} s; {len(results)} requests, none failed")
    finally:
        server.stop()
