"""How a pass's requests arrive: `concurrency` clients sending back to back (the server always sees exactly that
many streams), or a seeded Poisson process at a request rate (open loop: arrivals do not wait for answers, as
production traffic does not). A multi-turn session is one client: its turns follow each other's replies."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from specserve.tools.bench.http_client import RequestSettings, run_request
from specserve.tools.bench.results import RequestResult
from specserve.tools.bench.workloads import Session


@dataclass(frozen=True)
class Load:
    kind: str  # "concurrency" or "rate"
    value: float  # clients, or requests per second

    @property
    def label(self) -> str:
        return f"c={int(self.value)}" if self.kind == "concurrency" else f"r={self.value:g}/s"

    def sort_key(self) -> tuple[int, float]:
        return (0 if self.kind == "concurrency" else 1, self.value)


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """`n` arrival offsets (s) of a Poisson process with `rate` per second; the first at 0."""
    rng = random.Random(f"specserve-bench:arrivals:{seed}:{rate}")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


class InFlight:
    """Requests in flight now, and the most at once."""

    def __init__(self) -> None:
        self.now = self.most = 0

    def __enter__(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def __exit__(self, *exc) -> None:
        self.now -= 1


async def run_session(client, model: str, session: Session, settings: RequestSettings, pass_t0: float,
                      in_flight: InFlight) -> list[RequestResult]:
    """Every turn of `session` in order, each prompt extending the last with its reply. A failed turn ends
    the conversation: its later turns are results with error EarlierTurnFailed (never sent)."""
    messages = list(session.messages)
    out: list[RequestResult] = []
    for turn in range(session.turns):
        if turn:
            messages += [{"role": "assistant", "content": out[-1].text},
                         {"role": "user", "content": session.follow_ups[turn - 1]}]
        with in_flight:
            r = await run_request(client, model, messages, settings, pass_t0=pass_t0)
        r.turn = turn
        out.append(r)
        if not r.ok:
            out += [RequestResult(turn=later, error="EarlierTurnFailed", detail=f"turn {turn} failed: {r.error}",
                                  start_s=r.start_s) for later in range(turn + 1, session.turns)]
            break
    return out


async def run_pass(client, model: str, sessions: list[Session], load: Load, settings: RequestSettings,
                   seed: int = 0, max_concurrency: int | None = None) -> tuple[list[RequestResult], float, int]:
    """Run `sessions` under `load`; returns (results in request order, wall seconds, most requests in flight).
    Rate loads start sessions at Poisson arrivals whose rate is `load.value` / the mean turns per session, so
    requests arrive at `load.value` per second on average; `max_concurrency` caps the sessions in flight."""
    t0 = time.perf_counter()
    in_flight = InFlight()
    by_session: list[list[RequestResult]] = [[] for _ in sessions]

    async def one(i: int) -> None:
        by_session[i] = await run_session(client, model, sessions[i], settings, t0, in_flight)

    if load.kind == "concurrency":
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(sessions)):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(max(1, min(int(load.value), len(sessions))))))
    elif sessions:
        turns = sum(s.turns for s in sessions) / len(sessions)
        arrivals = poisson_arrivals(len(sessions), load.value / turns, seed)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def arrive(i: int) -> None:
            delay = arrivals[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                await one(i)
            else:
                async with gate:
                    await one(i)

        await asyncio.gather(*(arrive(i) for i in range(len(sessions))))
    wall = time.perf_counter() - t0
    results = []
    for i, rs in enumerate(by_session):
        for r in rs:
            r.index, r.session = len(results), i
            results.append(r)
    return results, wall, in_flight.most
