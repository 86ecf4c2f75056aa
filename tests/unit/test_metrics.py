"""Prometheus families, their merge across replicas, and the Redis hand-over (cluster/metrics.py)."""

import time

from prometheus_client.parser import text_string_to_metric_families

from specserve.cluster.metrics import FrontendMetrics, MetricsPublisher, published, render, shard, verifier_families


def parse(text: bytes) -> dict:
    """{(sample name, frozenset(labels)): value}"""
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def engine_stats(running=2, hits=30):
    return {"num_running": running, "num_waiting": 1, "kv_usage": 0.25, "kv_blocks_total": 100,
            "prefix_cache_queries": 100, "prefix_cache_hits": hits, "preemptions": 0, "steps": 10, "step_time_s": 0.5,
            "speculation": {"rounds": 4, "draft_tokens": 12, "accepted_tokens": 7, "accepted_at": [4, 2, 1]},
            "kv_store": {"lookup_blocks": 8, "hit_blocks": 3, "exported_blocks": 5, "redis_errors": 0,
                         "export_errors": 1},
            "experts": {"rows_per_actor": [10, 30], "resent_to_replica": 0}}


def test_frontend_metrics_render_with_vllm_names():
    m = FrontendMetrics("m")
    m.ttft.observe(0.03)
    for _ in range(3):
        m.itl.observe(0.01)
    m.success("length")
    m.error("INVALID_ARGUMENT", "grpc")
    m.routed("prefix", 32, 28)
    samples = parse(render([({"deployment": "Ingress", "replica": "r1"}, m.families())]))
    base = {("model_name", "m"), ("deployment", "Ingress"), ("replica", "r1")}
    assert samples[("specserve:time_to_first_token_seconds_count", frozenset(base))] == 1
    assert samples[("specserve:time_to_first_token_seconds_bucket", frozenset(base | {("le", "0.04")}))] == 1
    assert samples[("specserve:inter_token_latency_seconds_count", frozenset(base))] == 3
    assert samples[("specserve:request_success_total", frozenset(base | {("finished_reason", "length")}))] == 1
    assert samples[("specserve:request_errors_total",
                    frozenset(base | {("code", "INVALID_ARGUMENT"), ("protocol", "grpc")}))] == 1
    assert samples[("specserve:router_decisions_total", frozenset(base | {("reason", "prefix")}))] == 1
    assert not any(name.endswith("_created") for name, _ in samples)


def test_replicas_of_one_family_are_merged_with_their_labels():
    text = render([({"deployment": "Verifier", "replica": "a"}, verifier_families(engine_stats(2, 30), "m")),
                   ({"deployment": "Verifier", "replica": "b"}, verifier_families(engine_stats(5, 40), "m"))])
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    running = {s.labels["replica"]: s.value for s in families["specserve:num_requests_running"].samples}
    assert running == {"a": 2, "b": 5}
    hits = {s.labels["replica"]: s.value for s in families["specserve:prefix_cache_hits"].samples}
    assert hits == {"a": 30, "b": 40} and families["specserve:prefix_cache_hits"].type == "counter"
    per_pos = {(s.labels["replica"], s.labels["position"]): s.value
               for s in families["specserve:spec_decode_num_accepted_tokens_per_pos"].samples}
    assert per_pos[("a", "0")] == 4 and per_pos[("b", "2")] == 1
    experts = {s.labels["actor"]: s.value for s in families["specserve:expert_rows"].samples if s.labels["replica"] == "a"}
    assert experts == {"0": 10, "1": 30}
    assert text.count(b"# TYPE specserve:num_requests_running gauge") == 1


def test_publish_read_and_stale_entries_dropped(r):
    fams = verifier_families(engine_stats(), "m")
    pub = MetricsPublisher(r, "app", {"deployment": "Verifier", "replica": "r1"}, lambda: fams, 60)
    pub.publish()
    got = published(r, "app", max_age_s=10)
    assert [labels for labels, _ in got] == [{"deployment": "Verifier", "replica": "r1"}]
    assert got[0][1] == fams
    assert published(r, "app", max_age_s=10, skip_field=pub.field) == []
    time.sleep(0.05)
    assert published(r, "app", max_age_s=0.01) == []  # too old: dropped, and deleted
    assert r.hlen("specserve:app:metrics") == 0
    pub.publish()
    pub.close()  # a closed replica leaves at once
    assert published(r, "app", max_age_s=10) == []


def test_sharded_scrapes_of_every_ingress_report_each_replica_once():
    ingresses = [{"deployment": "Ingress", "replica": f"i{n}"} for n in range(3)]
    others = [{"deployment": d, "replica": f"{d[0]}{n}"} for d in ("Verifier", "Drafter") for n in range(10)]
    processes = [(labels, []) for labels in ingresses + others]
    reported = []
    for own in ingresses:
        mine = [labels for labels, _ in shard(own, [p for p in processes if p[0] != own])]
        assert all(labels["deployment"] != "Ingress" for labels in mine)  # each ingress reports only itself
        reported += mine
    assert sorted(map(str, reported)) == sorted(map(str, others))  # every replica once, none twice
    assert all(len(shard(own, processes)) < len(others) for own in ingresses)  # spread, not one takes all
    # A lone ingress owns everything.
    assert len(shard(ingresses[0], [(labels, []) for labels in others])) == len(others)


def test_the_shard_port_serves_this_ingress_and_its_share_over_http(r):
    import httpx

    from specserve.cluster.metrics import serve_shard
    from specserve.cluster.redis_server import free_port

    others = [{"deployment": "Ingress", "replica": "i1"}] + \
             [{"deployment": "Verifier", "replica": f"v{n}"} for n in range(6)]
    for labels in others:
        fams = verifier_families(engine_stats(), "m") if labels["deployment"] == "Verifier" else \
            FrontendMetrics("m").families()
        MetricsPublisher(r, "app", labels, lambda f=fams: f, 60).publish()
    own = {"deployment": "Ingress", "replica": "i0"}
    front = FrontendMetrics("m")
    front.success("stop")
    port = free_port()
    http = serve_shard("127.0.0.1", port, lambda: (own, front.families()), r, "app", 60)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).content
    finally:
        http.shutdown()
        http.server_close()
    replicas = {s.labels["replica"] for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    expected = {"i0"} | {labels["replica"] for labels, _ in shard(own, [(o, []) for o in others])}
    assert replicas == expected and "i1" not in replicas and len(expected) < 7
    assert parse(text)[("specserve:request_success_total", frozenset(
        {("model_name", "m"), ("deployment", "Ingress"), ("replica", "i0"), ("finished_reason", "stop")}))] == 1
