"""Serve autoscaling from the config: load scales the verifiers up and the drafters follow them, quiet scales
both down, and no request fails or changes its tokens on the way (delays shortened for the test)."""

import threading
import time

import httpx
import pytest
from ray import serve

from served_apps import start_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-autoscale"
FAST = {"upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 2}


def running(deployment: str) -> int:
    states = serve.status().applications[NAME].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def drafters_view() -> str:
    """What the drafters' autoscaling sees (for a failure message): replica states and active verifiers."""
    states = serve.status().applications[NAME].deployments["Drafter"].replica_states
    try:
        active = serve.get_deployment_handle("Drafter", NAME).stats.remote().result(timeout_s=10)["active_verifiers"]
    except Exception as exc:  # noqa: BLE001 - a view for the message only
        active = repr(exc)
    return f"drafter replicas {dict(states)}, active verifiers seen by one drafter: {active}"


def wait_until(condition, timeout_s: float, what, poll_s: float = 0.5) -> float:
    """Seconds until `condition()` held; fails naming `what` (a string or a callable giving one) after
    `timeout_s`. The bounds are generous: on a loaded 2-core machine each stage (a replica's model load,
    Serve's metric push, the autoscaler's delays) can take many times its usual second or two."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what() if callable(what) else what} (waited {timeout_s:.0f} s)")
        time.sleep(poll_s)
    return time.monotonic() - t0


@pytest.mark.timeout(1500)  # the sum of the stages' bounds below: reached only when something is wrong
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
        up_s = {}
        try:
            up_s["Verifier"] = wait_until(lambda: running("Verifier") == 2, 240,
                                          "the verifiers never scaled up under load")
            # The drafters follow the verifiers that draft, a chain of its own: the new verifier attaches a
            # drafter worker and heartbeats it, the drafters report two active verifiers to Serve, the
            # autoscaler decides after its delay, and the new drafter replica loads its model. Each link can be
            # slow here, so the chain is waited for from the verifiers' scale-up, with its own generous bound.
            up_s["Drafter"] = up_s["Verifier"] + wait_until(
                lambda: running("Drafter") == 2, 300, lambda: "the drafters did not follow the verifiers up: "
                + drafters_view())
            # Keep the load on two verifiers and two drafters until a few more requests went through them.
            served = len(results)
            wait_until(lambda: len(results) >= served + 8, 180, "no requests completed on the scaled-up app")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        down_s = {}
        for d in ("Verifier", "Drafter"):  # the drafters follow the verifiers down, after ACTIVE_WINDOW_S
            down_s[d] = wait_until(lambda d=d: running(d) == 1, 300, lambda d=d: f"{d} not scaled back down")
        failed = [r for r in results if r[0] != 200]
        assert not failed, failed[:3]
        assert len(results) > 16
        assert all(r["choices"][0]["token_ids"] == expected for _, r in results)
        assert sum(r["usage"]["speculation"]["draft_tokens"] for _, r in results) > 0  # the drafters drafted
        # Still serving after the scale-down.
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
        print(f"\nunder load: verifiers at 2 after {up_s['Verifier']:.1f} s, drafters at 2 after "
              f"{up_s['Drafter']:.1f} s; after it: verifiers at 1 in {down_s['Verifier']:.1f} s, drafters "
              f"{down_s['Drafter']:.1f} s later; {len(results)} requests, none failed")
    finally:
        server.stop()
