"""`specserve chaos`: kill parts of a running specserve while a steady stream of greedy requests runs, and check
that every request either completes with the right tokens or fails with a retriable status (never a wrong token,
never a hang), and that the cluster recovers to full service on its own (and how long that takes).

The faults: a verifier replica, a drafter's worker, an expert actor, the Redis server, a KV holder. Each is
injected into the same app in turn; the expected tokens come from the healthy app itself (greedy, float32, so
batching cannot change them: the engine tests hold it to Hugging Face `generate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx

# Statuses a client retries: overload, unavailable (replica died or restarting, draining), deadline.
RETRIABLE_HTTP = {429, 503, 504}


def classify(status: int | None, tokens: list[int] | None, expected: list[int], *, timed_out: bool = False) -> str:
    """completed (right tokens), retriable (a status to retry), wrong (200 with other tokens: never allowed),
    failed (any other error), lost (no answer within the client's deadline: a hang)."""
    if timed_out:
        return "lost"
    if status == 200:
        return "completed" if tokens == expected else "wrong"
    return "retriable" if status in RETRIABLE_HTTP else "failed"


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    status: int | None = None
    detail: str = ""


class SteadyLoad:
    """`clients` threads, each sending the prompts in turn (greedy completions with token ids) until stopped."""

    def __init__(self, url: str, model: str, prompts: list[list[int]], expected: list[list[int]], *,
                 clients: int = 3, max_tokens: int = 16, timeout_s: float = 120.0):
        self.url, self.model, self.prompts, self.expected = url.rstrip("/"), model, prompts, expected
        self.clients, self.max_tokens, self.timeout_s = clients, max_tokens, timeout_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def request(self, client: httpx.Client, i: int) -> Outcome:
        body = {"model": self.model, "prompt": self.prompts[i], "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        t0 = time.monotonic()
        try:
            r = client.post(f"{self.url}/v1/completions", json=body, timeout=self.timeout_s)
        except httpx.TimeoutException as exc:
            return Outcome("lost", t0, time.monotonic(), None, type(exc).__name__)
        except httpx.HTTPError as exc:  # connection refused/reset: the front door itself was down
            return Outcome("failed", t0, time.monotonic(), None, f"{type(exc).__name__}: {exc}"[:200])
        tokens = r.json()["choices"][0].get("token_ids") if r.status_code == 200 else None
        kind = classify(r.status_code, tokens, self.expected[i])
        return Outcome(kind, t0, time.monotonic(), r.status_code, "" if kind == "completed" else r.text[:200])

    def _client(self, offset: int) -> None:
        with httpx.Client() as client:
            i = offset
            while not self._stop.is_set():
                self.outcomes.append(self.request(client, i % len(self.prompts)))
                i += 1

    def start(self) -> "SteadyLoad":
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        return list(self.outcomes)


# ---- faults ----------------------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    what: str
    applies: Callable  # (server) -> None, or why it does not apply to this app
    inject: Callable  # (server) -> a function that tells whether the part is back (the recovery check)


def _named(fragment: str, namespace: str | None = None) -> list[tuple[str, str]]:
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if fragment in a["name"] and (namespace is None or a["namespace"] == namespace)]


def _kill(fragment: str, *, restart: bool, namespace: str | None = None) -> str:
    import ray

    found = _named(fragment, namespace)
    if not found:
        raise RuntimeError(f"no live actor named like {fragment!r}")
    name, ns = sorted(found)[0]
    ray.kill(ray.get_actor(name, namespace=ns), no_restart=not restart)
    time.sleep(1.0)  # ray.kill returns before the process is gone: no recovery check may see the old one
    return name


def _answers(name_fragment: str, method: str = "ready", namespace: str | None = None) -> bool:
    import ray

    try:
        name, ns = sorted(_named(name_fragment, namespace))[0]
        ray.get(getattr(ray.get_actor(name, namespace=ns), method).remote(), timeout=5)
        return True
    except Exception:  # noqa: BLE001 - not back yet
        return False


def _verifier_stats(server) -> dict:
    from ray import serve

    return serve.get_deployment_handle("Verifier", server.config.server.app_name).stats.remote().result(timeout_s=10)


def _kill_verifier(server):
    fragment = f"{server.config.server.app_name}#Verifier"
    killed = _kill(fragment, restart=False)  # Serve starts a new replica
    return lambda: killed not in {n for n, _ in _named(fragment)} and bool(_named(fragment))


def _kill_draft_worker(server):
    from specserve.actors.drafter import WORKER_NAME_PREFIX

    killed = _kill(WORKER_NAME_PREFIX, restart=False)  # its replica fails its health check

    def back() -> bool:
        client = _verifier_stats(server).get("drafter_client") or {}
        return bool(_named(WORKER_NAME_PREFIX)) and killed not in {n for n, _ in _named(killed)} \
            and client.get("workers", 0) >= 1
    return back


def _kill_expert_actor(server):
    from specserve.actors.experts.ray_transport import ACTOR_NAME_PREFIX

    killed = _kill(ACTOR_NAME_PREFIX, restart=True)  # Ray restarts it; the transport resends or waits
    return lambda: _answers(killed)


def _kill_redis(server, down_s: float = 3.0):
    from specserve.cluster.redis_server import EmbeddedRedis

    port = server.redis.port
    server.redis.stop()
    time.sleep(down_s)  # requests meanwhile: store and router misses, metrics unpublished
    server.redis = EmbeddedRedis(port=port, password=server.redis.password).start()
    return lambda: bool((_verifier_stats(server).get("kv_store") or {}).get("available"))


def _kill_holder(server):
    from specserve.cluster.kv.holder import HOLDER_NAMESPACE, holder_name_prefix

    prefix = holder_name_prefix(server.config.server.app_name)
    killed = _kill(prefix, restart=True, namespace=HOLDER_NAMESPACE)  # its entries become misses
    return lambda: _answers(killed, "stats", HOLDER_NAMESPACE)


def _drafters(server):
    sp = server.config.speculative
    return None if sp.remote else f"speculative.method {sp.method} runs no drafter replicas"


def _experts(server):
    from specserve.actors.experts.ray_transport import ACTOR_NAME_PREFIX

    if not server.config.experts.num_actors:
        return "experts.num_actors is 0"
    return None if _named(ACTOR_NAME_PREFIX) else "no expert actors (a dense model?)"


def _own_redis(server):
    return None if server.redis is not None else "Redis is external (chaos restarts only the embedded one)"


def _holders(server):
    kv = server.config.kv_store
    return None if kv.enabled and kv.payload == "holder" else "no KV holder actors (kv_store off or payload redis)"


FAULTS = {f.name: f for f in [
    Fault("verifier", "a verifier replica killed", lambda s: None, _kill_verifier),
    Fault("drafter", "a drafter's worker killed", _drafters, _kill_draft_worker),
    Fault("experts", "an expert actor killed (Ray restarts it)", _experts, _kill_expert_actor),
    Fault("redis", "the Redis server killed, restarted 3 s later", _own_redis, _kill_redis),
    Fault("holder", "a KV holder actor killed (Ray restarts it)", _holders, _kill_holder),
]}


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class FaultResult:
    fault: str
    what: str
    requests: int = 0  # sent while the fault was in effect (from injection to recovery)
    completed: int = 0
    retriable: int = 0
    wrong: int = 0
    failed: int = 0
    lost: int = 0
    recovery_s: float | None = None
    skipped: str = ""
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or (self.recovery_s is not None and not (self.wrong or self.failed or self.lost))


def _healthy(server) -> bool:
    from ray import serve

    app = serve.status().applications.get(server.config.server.app_name)
    return app is not None and app.status == "RUNNING" and all(
        d.status == "HEALTHY" for d in app.deployments.values())


def reference(load: SteadyLoad) -> list[list[int]]:
    """Each prompt's greedy tokens from the healthy app, one request at a time."""
    out = []
    with httpx.Client() as client:
        for p in load.prompts:
            r = client.post(f"{load.url}/v1/completions", timeout=load.timeout_s, json={
                "model": load.model, "prompt": p, "max_tokens": load.max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            r.raise_for_status()
            out.append(r.json()["choices"][0]["token_ids"])
    return out


def run_fault(server, load_args: dict, fault: Fault, *, settle_s: float = 2.0, recovery_timeout_s: float = 180.0,
              log: Callable[[str], None] = lambda m: None) -> FaultResult:
    """Load on, inject, wait until the part is back, the deployments are healthy and a request on the side
    completes right; then load off. Requests counted: those sent from the injection until recovery."""
    result = FaultResult(fault.name, fault.what)
    why_not = fault.applies(server)
    if why_not:
        result.skipped = why_not
        return result
    load = SteadyLoad(**load_args).start()
    probe = SteadyLoad(**{**load_args, "clients": 1})
    try:
        time.sleep(settle_s)
        t_fault = time.monotonic()
        log(f"{fault.name}: injecting ({fault.what})")
        back = fault.inject(server)
        deadline, i = t_fault + recovery_timeout_s, 0
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                try:
                    part_back = back() and _healthy(server)
                except Exception:  # noqa: BLE001 - stats calls fail while the part is down
                    part_back = False
                if part_back and probe.request(client, i % len(probe.prompts)).kind == "completed":
                    result.recovery_s = time.monotonic() - t_fault
                    break
                i += 1
                time.sleep(0.5)
        t_end = time.monotonic()
        log(f"{fault.name}: " + (f"recovered in {result.recovery_s:.1f} s" if result.recovery_s is not None
                                 else f"not recovered within {recovery_timeout_s:.0f} s"))
    finally:
        outcomes = load.stop()
    during = [o for o in outcomes if t_fault <= o.start <= t_end or o.start < t_fault < o.end]
    result.requests = len(during)
    for o in during:
        setattr(result, o.kind, getattr(result, o.kind) + 1)
        if o.kind != "completed" and len(result.details) < 5:
            result.details.append(f"{o.kind} {o.status}: {o.detail}")
    return result


def format_table(results: list[FaultResult]) -> str:
    head = f"{'fault':<10}{'requests':>9}{'completed':>10}{'retriable':>10}{'wrong':>6}{'failed':>7}{'lost':>5}" \
           f"{'recovery s':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.skipped:
            lines.append(f"{r.fault:<10}  skipped: {r.skipped}")
            continue
        rec = f"{r.recovery_s:.1f}" if r.recovery_s is not None else "never"
        lines.append(f"{r.fault:<10}{r.requests:>9}{r.completed:>10}{r.retriable:>10}{r.wrong:>6}{r.failed:>7}"
                     f"{r.lost:>5}{rec:>11}")
    return "\n".join(lines)


def prompts_for(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(8, 40))] for _ in range(n)]


def run_chaos(server, faults: list[str], *, clients: int = 3, max_tokens: int = 16, num_prompts: int = 6,
              timeout_s: float = 120.0, recovery_timeout_s: float = 180.0, prompts: list[list[int]] | None = None,
              expected: list[list[int]] | None = None,
              log: Callable[[str], None] = lambda m: None) -> list[FaultResult]:
    """Every named fault against the running `server` (a LocalServer that owns its Redis), in turn. `prompts`
    and their `expected` greedy tokens: by default seeded random prompts, judged by the healthy app's answers."""
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {sorted(FAULTS)}")
    if prompts is None:
        from transformers import AutoConfig

        from specserve.actors.model_loader import resolve_model_path

        vocab = AutoConfig.from_pretrained(resolve_model_path(server.config.model.source,
                                                              server.config.model.cache_dir)).vocab_size
        prompts = prompts_for(num_prompts, min(vocab, 30000))
    args = dict(url=server.url, model=server.config.model.name, prompts=prompts, expected=expected or [],
                clients=clients, max_tokens=max_tokens, timeout_s=timeout_s)
    if expected is None:
        args["expected"] = reference(SteadyLoad(**args))
        log(f"reference: {len(prompts)} prompts x {max_tokens} greedy tokens from the healthy app")
    return [run_fault(server, args, FAULTS[f], recovery_timeout_s=recovery_timeout_s, log=log) for f in faults]


def main(argv: list[str]) -> int:
    from specserve.deploy.launcher import LocalServer, add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="specserve chaos", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma list of {', '.join(FAULTS)}")
    parser.add_argument("--clients", type=int, default=3, help="concurrent clients of the steady load")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--recovery-timeout", type=float, default=180.0, help="seconds a fault may take to heal")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32"  # greedy tokens independent of batching: a wrong token is then a real one
    try:
        config = config_from_args(args)
        faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    except Exception as exc:  # noqa: BLE001 - one line for a bad config
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = LocalServer(config)
    log = lambda m: print(f"[chaos] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        server.start(progress=True)
        results = run_chaos(server, faults, clients=args.clients, max_tokens=args.max_tokens,
                            recovery_timeout_s=args.recovery_timeout, log=log)
    finally:
        server.stop()
    print(format_table(results))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 0 if all(r.ok for r in results) else 1
