"""One request's measurements, as the client saw them, and a pass's summary statistics (latency percentiles,
throughput, goodput under an SLO, errors by kind, and specserve's own figures from the usage it reports)."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)
# SLO keys and the RequestResult value each bounds (milliseconds on the command line, seconds inside).
SLO_METRICS = {"ttft_ms": "ttft_s", "tpot_ms": "tpot_s", "e2e_ms": "e2e_s"}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@dataclass
class RequestResult:
    index: int = 0  # position in the pass's request order
    session: int = 0  # the workload session it belongs to, and its turn there (multi-turn workloads)
    turn: int = 0
    ok: bool = False
    error: str | None = None  # "HTTP 503", "gRPC UNAVAILABLE", an exception class name, "Timeout", ...
    detail: str | None = None
    status: int | None = None
    start_s: float = 0.0  # offset from the start of the pass
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    content_chunks: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    done: bool = False  # saw `data: [DONE]` (or gRPC's final chunk)
    finish_reason: str | None = None
    # Speculative decoding (specserve's usage.speculation): verification rounds with a draft, drafted and
    # accepted draft tokens.
    spec_rounds: int | None = None
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    # Prompt tokens served from a KV cache (usage.prompt_tokens_details.cached_tokens), and of those, the ones
    # imported from specserve's cluster KV store (usage.kv_store.imported_tokens).
    cached_tokens: int | None = None
    imported_tokens: int | None = None
    # specserve's prefix-aware router: the cached tokens it predicted for this request (usage.routing)
    predicted_cached_tokens: int | None = None
    text: str = ""  # the generated text (multi-turn sessions feed it back)
    _last_chunk_s: float = field(default=0.0, repr=False)

    def add_text(self, text: str, t0: float) -> None:
        """A streamed chunk's text arrived now: TTFT for the first, a gap for the others (t0: request start)."""
        now = time.perf_counter()
        if self.content_chunks == 0:
            self.ttft_s = now - t0
        else:
            self.itl_s.append(now - self._last_chunk_s)
        self._last_chunk_s = now
        self.text += text
        self.content_chunks += 1

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, slo: dict[str, float]) -> bool:
        """Completed within every bound of `slo` (ms). A bound on a value the request lacks (TPOT of a
        one-token answer) holds."""
        if not self.ok:
            return False
        for key, bound_ms in slo.items():
            value = getattr(self, SLO_METRICS[key])
            if value is not None and value * 1000.0 > bound_ms:
                return False
        return True

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_last_chunk_s")
        d["tpot_s"] = self.tpot_s
        return d


def parse_slo(text: str) -> dict[str, float]:
    """"ttft_ms=500,tpot_ms=100" -> {"ttft_ms": 500.0, "tpot_ms": 100.0}; ValueError naming what is wrong."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"bad SLO item {item!r}: expected KEY=MS with KEY one of {', '.join(SLO_METRICS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"bad SLO item {item!r}: {value.strip()!r} is not a number of milliseconds") from None
        if not out[key] > 0:
            raise ValueError(f"bad SLO item {item!r}: the bound must be > 0 ms")
    return out


def _dist(name: str, values: list[float], out: dict[str, Any]) -> None:
    for q in PERCENTILES:
        out[f"{name}_ms_p{q}"] = ms(percentile(values, q))


def summarize(results: list[RequestResult], wall_s: float, *, single_stream: bool = False,
              slo: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    tpots = [t for t in (r.tpot_s for r in ok) if t is not None]
    s: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error or "?" for r in results if not r.ok)),
        "wall_s": wall_s,
    }
    _dist("ttft", [r.ttft_s for r in ok if r.ttft_s is not None], s)
    _dist("itl", [g for r in ok for g in r.itl_s], s)
    _dist("tpot", tpots, s)
    _dist("e2e", [r.e2e_s for r in ok if r.e2e_s is not None], s)
    tpot_ms = ms(mean(tpots))
    per_s = (lambda x: x / wall_s) if wall_s > 0 else (lambda x: None)
    s.update({
        "tpot_ms_mean": tpot_ms,
        # Only meaningful when one stream has the server to itself.
        "single_stream_tok_s": (1000.0 / tpot_ms) if single_stream and tpot_ms else None,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tok_s": per_s(out_tokens),
        "total_tok_s": per_s(out_tokens + prompt_tokens),
        "req_s": per_s(len(ok)),
        "usage_reported": bool(ok) and all(r.usage_reported for r in ok),
        "slo": slo or None,
        # vLLM's request goodput: completed requests that met every SLO bound, per second.
        "goodput_req_s": per_s(sum(r.meets(slo) for r in results)) if slo else None,
        "slo_attainment": (sum(r.meets(slo) for r in results) / len(results)) if slo and results else None,
    })
    spec = [r for r in ok if r.spec_rounds is not None]
    rounds = sum(r.spec_rounds for r in spec)
    drafted = sum(r.draft_tokens or 0 for r in spec)
    accepted = sum(r.accepted_tokens or 0 for r in spec)
    cache = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    cache_prompt = sum(r.prompt_tokens for r in cache)
    cached = sum(r.cached_tokens for r in cache)
    imported = sum(r.imported_tokens or 0 for r in cache)
    predicted = [r for r in cache if r.predicted_cached_tokens is not None]
    s.update({
        "spec_rounds": rounds if spec else None,
        "draft_tokens": drafted if spec else None,
        "accepted_tokens": accepted if spec else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        # Tokens committed per speculative round (accepted drafts + the target's token).
        "mean_accepted_length": (accepted + rounds) / rounds if rounds else None,
        # Prompt tokens served from a KV cache / prompt tokens: all, the replica's own, imported from the store.
        "prefix_hit_rate": cached / cache_prompt if cache else None,
        "prefix_hit_rate_local": (cached - imported) / cache_prompt if cache else None,
        "prefix_hit_rate_store": imported / cache_prompt if cache else None,
        "imported_tokens": imported if cache else None,
        # The router's prediction against what the verifier found: mean |predicted - actual| cached tokens.
        "prediction_mae_tokens": mean([abs(r.predicted_cached_tokens - r.cached_tokens) for r in predicted])
        if predicted else None,
    })
    return s
