"""Prometheus metrics: what each process measures, how it reaches `/metrics`.

Every replica (ingress and verifier) turns its numbers into metric families and publishes them to Redis every
`server.metrics_period_s` (one hash field per replica, with a timestamp). Whichever ingress replica answers a
scrape renders all live replicas' families, each sample labelled with its deployment and replica, so a scrape
through the Serve proxy sees the whole application whichever replica it lands on.

Names follow vLLM's where the meaning is the same, under the `specserve:` prefix.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

import msgpack
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

P = "specserve:"
# Buckets as vLLM's, so dashboards carry over.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)

Family = dict  # {"name", "type", "help", "samples": [[sample name, {label: value}, value], ...]}


def family(name: str, type_: str, help_: str, samples: list) -> Family:
    return {"name": P + name, "type": type_, "help": help_, "samples": samples}


def families_of(registry: CollectorRegistry) -> list[Family]:
    """A prometheus_client registry's families as plain data (the `_created` samples left out)."""
    out = []
    for m in registry.collect():
        samples = [[s.name, dict(s.labels), float(s.value)] for s in m.samples if not s.name.endswith("_created")]
        out.append({"name": m.name, "type": m.type, "help": m.documentation, "samples": samples})
    return out


class FrontendMetrics:
    """What an ingress replica measures, as the client sees it (HTTP and gRPC alike)."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time from arrival at the ingress to the first "
                              "token", labels, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between output tokens (a step that commits "
                             "several tokens counts each at its share)", labels, buckets=ITL_BUCKETS,
                             registry=r).labels(model_name)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Time from arrival to the last token", labels,
                             buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time a request waited in its verifier's queue "
                               "before its first step", labels, buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens of finished requests", labels,
                                         registry=r).labels(model_name)
        self._success = Counter(P + "request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        self._errors = Counter(P + "request_errors", "Requests that ended in an error, by gRPC status code name "
                               "(HTTP maps to the same codes)", labels + ["code", "protocol"], registry=r)
        self._routing = Counter(P + "router_decisions", "Prefix-aware routing decisions by reason",
                                labels + ["reason"], registry=r)
        self.routed_predicted = Counter(P + "router_predicted_cached_tokens", "Prompt tokens the router expected "
                                        "to find cached", labels, registry=r).labels(model_name)
        self.routed_cached = Counter(P + "router_cached_tokens", "Prompt tokens found cached on the chosen "
                                     "replica (routed requests)", labels, registry=r).labels(model_name)
        self._rejected = Counter(P + "admission_rejected", "Requests refused at admission, by reason",
                                 labels + ["reason"], registry=r)
        self.in_flight = Gauge(P + "ingress_requests_in_flight", "Requests this ingress replica is serving",
                               labels, registry=r).labels(model_name)
        self.model_name = model_name

    def success(self, reason: str) -> None:
        self._success.labels(self.model_name, reason or "unknown").inc()

    def error(self, code_name: str, protocol: str) -> None:
        self._errors.labels(self.model_name, code_name, protocol).inc()

    def routed(self, reason: str, predicted: int, cached: int) -> None:
        self._routing.labels(self.model_name, reason).inc()
        self.routed_predicted.inc(predicted)
        self.routed_cached.inc(cached)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def families(self) -> list[Family]:
        return families_of(self.registry) + process_families()


def process_families() -> list[Family]:
    """This process's resident memory by kind (Linux; nothing elsewhere): `anon` is its own heap, `shmem` the
    pages of Ray's shared object store it has touched (bounded by the store, not the process), `file` mapped
    files. The soak watches `anon` for growth."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith("Rss"))
        kib = {kind: int(fields[f"Rss{kind.capitalize()}"].split()[0]) for kind in ("anon", "file", "shmem")}
    except (OSError, KeyError, ValueError, IndexError):
        return []
    return [family("process_resident_memory_bytes", "gauge", "Resident memory of this replica's process, by kind "
                   "(anon: its own heap; shmem: Ray object store pages it touched; file: mapped files)",
                   [[P + "process_resident_memory_bytes", {"kind": k}, float(v * 1024)] for k, v in kib.items()])]


def verifier_families(stats: dict, model_name: str) -> list[Family]:
    """A verifier replica's engine, KV store and expert numbers (Verifier.metrics_stats()) as families."""
    m = {"model_name": model_name}

    def one(name, type_, help_, value):
        suffix = "_total" if type_ == "counter" else ""
        return family(name, type_, help_, [[P + name + suffix, m, float(value)]])

    out = [
        one("num_requests_running", "gauge", "Sequences in the engine's running batch", stats["num_running"]),
        one("num_requests_waiting", "gauge", "Sequences waiting for their first step", stats["num_waiting"]),
        one("kv_cache_usage_perc", "gauge", "Fraction of KV blocks in use (1 = full)", stats["kv_usage"]),
        one("kv_cache_blocks", "gauge", "KV blocks in the pool", stats["kv_blocks_total"]),
        one("prefix_cache_queries", "counter", "Prompt tokens looked up in the local prefix cache",
            stats["prefix_cache_queries"]),
        one("prefix_cache_hits", "counter", "Prompt tokens served from the local prefix cache",
            stats["prefix_cache_hits"]),
        one("num_preemptions", "counter", "Sequences preempted for KV space", stats["preemptions"]),
        one("engine_steps", "counter", "Engine steps run", stats["steps"]),
        one("engine_step_seconds", "counter", "Time spent in engine steps", stats["step_time_s"]),
    ]
    spec = stats.get("speculation")
    if spec:
        out += [one("spec_decode_num_drafts", "counter", "Verification rounds that carried a draft", spec["rounds"]),
                one("spec_decode_num_draft_tokens", "counter", "Draft tokens verified", spec["draft_tokens"]),
                one("spec_decode_num_accepted_tokens", "counter", "Draft tokens accepted", spec["accepted_tokens"])]
        out.append(family("spec_decode_num_accepted_tokens_per_pos", "counter",
                          "Draft tokens accepted at each draft position (0 = first)",
                          [[P + "spec_decode_num_accepted_tokens_per_pos_total", dict(m, position=str(i)), float(n)]
                           for i, n in enumerate(spec["accepted_at"])]))
    store = stats.get("kv_store")
    if store:
        out += [one("kv_store_lookup_blocks", "counter", "Prompt blocks looked up in the cluster KV store",
                    store["lookup_blocks"]),
                one("kv_store_hit_blocks", "counter", "Prompt blocks imported from the cluster KV store",
                    store["hit_blocks"]),
                one("kv_store_exported_blocks", "counter", "Blocks published to the cluster KV store",
                    store["exported_blocks"]),
                one("kv_store_errors", "counter", "Redis and export errors of the KV store client",
                    store["redis_errors"] + store["export_errors"])]
    experts = stats.get("experts")
    if experts:
        out.append(family("expert_rows", "counter", "Token rows sent to each expert actor (a token counts once "
                          "per chosen expert)", [[P + "expert_rows_total", dict(m, actor=str(a)), float(n)]
                                                 for a, n in enumerate(experts["rows_per_actor"])]))
        out.append(one("expert_resent_messages", "counter", "Expert messages re-sent to another replica after an "
                       "actor failed", experts["resent_to_replica"]))
    return out + process_families()


def render(processes: list[tuple[dict, list[Family]]]) -> bytes:
    """Prometheus text for (labels of the process, its families) pairs; families of one name are merged."""
    return generate_latest(_registry(lambda: merged_metrics(processes)))


def _registry(collect: Callable[[], list[Metric]]) -> CollectorRegistry:
    class _Collector:
        def collect(self):
            return collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return registry


def merged_metrics(processes: list[tuple[dict, list[Family]]]) -> list[Metric]:
    merged: dict[str, Metric] = {}
    for labels, fams in processes:
        for f in fams:
            metric = merged.get(f["name"])
            if metric is None:
                metric = merged[f["name"]] = Metric(f["name"], f["help"], f["type"])
            for name, sample_labels, value in f["samples"]:
                metric.add_sample(name, {**sample_labels, **labels}, value)
    return list(merged.values())


def _key(app_name: str) -> str:
    return f"specserve:{app_name}:metrics"


def _field(labels: dict) -> str:
    """A process's field in the Redis hash: deployment/replica."""
    return f"{labels.get('deployment', '')}/{labels.get('replica', '')}"


class MetricsPublisher:
    """Publishes one replica's families to Redis every `period_s` until closed (a thread; Redis errors are
    logged once and retried)."""

    def __init__(self, redis_client, app_name: str, labels: dict, families: Callable[[], list[Family]],
                 period_s: float):
        self.redis, self.key, self.labels = redis_client, _key(app_name), labels
        self.field = _field(labels)
        self._families, self.period_s = families, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specserve-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        blob = msgpack.packb({"t": time.time(), "labels": self.labels, "families": self._families()})
        self.redis.hset(self.key, self.field, blob)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.period_s):
            try:
                self.publish()
                failing = False
            except Exception as exc:  # noqa: BLE001 - metrics must never take a replica down
                if not failing and not self._stop.is_set():  # (at shutdown Redis may go first)
                    log.warning("metrics publish failed (%s); retrying every %.0fs", exc, self.period_s)
                failing = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a publish in flight would write the field back after the delete
        try:
            self.redis.hdel(self.key, self.field)  # a removed replica leaves the scrape at once
        except Exception:  # noqa: BLE001
            pass


def published(redis_client, app_name: str, max_age_s: float, skip_field: str = "") -> list[tuple[dict, list[Family]]]:
    """Every replica's last families younger than max_age_s (older entries, of replicas gone, are deleted)."""
    out, stale = [], []
    now = time.time()
    for fld, blob in redis_client.hgetall(_key(app_name)).items():
        fld = fld.decode() if isinstance(fld, bytes) else fld
        if fld == skip_field:
            continue
        data = msgpack.unpackb(blob)
        if now - data["t"] > max_age_s:
            stale.append(fld)
            continue
        out.append((data["labels"], data["families"]))
    if stale:
        redis_client.hdel(_key(app_name), *stale)
    return out


def shard(own: dict, processes: list[tuple[dict, list[Family]]]) -> list[tuple[dict, list[Family]]]:
    """The processes an ingress reports when every ingress is scraped (a ServiceMonitor scrapes each pod): each
    other replica goes to one ingress, by rendezvous hashing over the ingresses that publish, so every series
    is scraped once; other ingresses report themselves. `own`: the answering ingress's labels."""
    ingresses = sorted({_field(own)} | {_field(labels) for labels, _ in processes
                                        if labels.get("deployment") == own.get("deployment")})

    def owner(labels: dict) -> str:
        field = _field(labels)
        return max(ingresses, key=lambda i: hashlib.blake2b(f"{i}|{field}".encode(), digest_size=8).digest())

    return [(labels, fams) for labels, fams in processes
            if labels.get("deployment") != own.get("deployment") and owner(labels) == _field(own)]


def app_view(own: tuple[dict, list[Family]], redis_client, app_name: str, max_age_s: float,
             scope: str = "app") -> list[tuple[dict, list[Family]]]:
    """What an ingress reports: itself and every other replica's published families ("app"), or only its
    share of them ("shard"). Without Redis (or while it is down), itself alone."""
    others = []
    if redis_client is not None:
        try:
            others = published(redis_client, app_name, max_age_s, skip_field=_field(own[0]))
        except Exception as exc:  # noqa: BLE001 - Redis down: still answer with our own
            log.warning("reading published metrics failed: %s", exc)
    if scope == "shard":
        others = shard(own[0], others)
    return [own, *others]


def serve_shard(host: str, port: int, own: Callable[[], tuple[dict, list[Family]]], redis_client, app_name: str,
                max_age_s: float):
    """An HTTP server (its own thread) on this replica's port, answering any path with the sharded view: a
    scraper of every ingress pod reaches each pod's own ingress here, never another through Serve's proxy.
    Returns the server; `shutdown()` and `server_close()` stop it."""
    from prometheus_client import start_http_server

    registry = _registry(lambda: merged_metrics(app_view(own(), redis_client, app_name, max_age_s, "shard")))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def start_publisher(config, deployment: str, families: Callable[[], list[Family]]) -> MetricsPublisher | None:
    """The publisher of a Serve replica of `deployment`; None outside Serve or without Redis (then /metrics
    shows only the ingress replica that answers)."""
    from ray import serve

    from specserve.cluster.kv.redis_client import connect, redis_config

    server = config.server
    if not (server.redis_url or server.redis_sentinels):
        return None
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica (tests)
        return None
    client = connect(**redis_config(server, config.kv_store.timeout_s))
    return MetricsPublisher(client, server.app_name, {"deployment": deployment, "replica": replica}, families,
                            server.metrics_period_s)
