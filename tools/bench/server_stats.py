"""specserve's own figures for a pass, from the server's `/metrics` before and after it (counters are summed over
replicas; a pass's figure is the difference): acceptance by draft position, local prefix-cache and KV-store hit
rates, routing decisions, rows per expert actor. Other servers have no `specserve:` metrics: None.

Replicas publish their metrics every `server.metrics_period_s` (2 s by default), so a scrape waits that long
after a pass before reading it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

P = "specserve:"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Labels that tell replicas apart: summed away, so counters read per application.
_REPLICA_LABELS = {"deployment", "replica", "model_name"}


def parse(text: str) -> Samples:
    """Prometheus text -> {(sample name, labels without replica labels): value summed over replicas}."""
    out: Samples = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith(P):
                continue
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in _REPLICA_LABELS))
            out[(s.name, labels)] += s.value
    return dict(out)


def per_replica(text: str, name: str, **labels: str) -> dict[str, float]:
    """One gauge's value per replica ("deployment/replica"), of the samples carrying `labels`."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[f"{s.labels.get('deployment', '')}/{s.labels.get('replica', '')}"] = s.value
    return out


async def scrape(client) -> str | None:
    """The target's /metrics text when it carries specserve's metrics, else None (gRPC targets: None)."""
    if not isinstance(client, httpx.AsyncClient):
        return None
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 and P in r.text else None


def _delta(before: Samples, after: Samples) -> Samples:
    out = {}
    for key, v in after.items():
        d = v - before.get(key, 0.0)
        out[key] = v if d < 0 else d  # a replica restarted: its counters began again from zero
    return out


def _by_label(d: Samples, name: str, label: str) -> dict[int, float]:
    return {int(dict(labels)[label]): v for (n, labels), v in d.items() if n == name and label in dict(labels)}


def _one(d: Samples, name: str) -> float:
    return sum(v for (n, _), v in d.items() if n == name)


def pass_figures(before_text: str | None, after_text: str | None) -> dict[str, Any] | None:
    if not (before_text and after_text):
        return None
    d = _delta(parse(before_text), parse(after_text))
    drafts = _one(d, P + "spec_decode_num_drafts_total")
    per_pos = _by_label(d, P + "spec_decode_num_accepted_tokens_per_pos_total", "position")
    queries = _one(d, P + "prefix_cache_queries_total")
    lookups = _one(d, P + "kv_store_lookup_blocks_total")
    rows = _by_label(d, P + "expert_rows_total", "actor")
    decisions = {dict(labels)["reason"]: v for (n, labels), v in d.items()
                 if n == P + "router_decisions_total" and v}
    rows_list = [rows[a] for a in sorted(rows)]
    return {
        # vLLM's definition: accepted at position i / verification rounds that carried a draft.
        "acceptance_by_position": [per_pos[i] / drafts for i in sorted(per_pos)] if drafts else None,
        "spec_drafts": drafts,
        "local_prefix_hit_rate": _one(d, P + "prefix_cache_hits_total") / queries if queries else None,
        "store_block_hit_rate": _one(d, P + "kv_store_hit_blocks_total") / lookups if lookups else None,
        "router_decisions": decisions or None,
        "expert_rows": rows_list or None,
        # max / mean rows per actor: 1.0 is a perfect balance.
        "expert_imbalance": (max(rows_list) * len(rows_list) / sum(rows_list)) if sum(rows_list) else None,
    }
