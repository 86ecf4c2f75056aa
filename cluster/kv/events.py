"""KV events: replicas tell routers which blocks entered and left their prefix caches, through a Redis stream.

Publishers (one per verifier replica) batch the block manager's events off the engine thread and append them to
the stream; a replica that starts announces a reset first, so routers forget what an earlier incarnation held.
Subscribers (one per router) read the stream from its start (it is capped, so that replays recent history) in a
background thread and apply it to their PrefixIndex, so the routing decision itself never waits on Redis.
A lost event only makes the router's view stale: a worse guess, never a wrong answer.

Record: {replica, ops} where ops is a msgpack list of [stored, block hash] pairs; or {replica, reset: 1}. The KV
store's blocks travel as the pseudo-replica STORE: verifiers announce the blocks they commit to it, KV holders the
blocks they evict (never reset: many processes write for it). Subscribers apply records to anything with
PrefixIndex's add/remove/purge (routing/prefix_index.py), the router's view.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import msgpack

log = logging.getLogger(__name__)

STORE = "__kv_store__"  # the holder name of blocks in the cluster's KV store
# Records the stream keeps (approximately): the recent history a starting router replays.
STREAM_MAXLEN = 200_000


def stream_key(app_name: str) -> str:
    return f"specserve:kv-events:{app_name}"


def pack_ops(events: Iterable[tuple[bool, bytes]]) -> bytes:
    return msgpack.packb([[stored, h] for stored, h in events])


def unpack_ops(ops: bytes) -> list[tuple[bool, bytes]]:
    return [(bool(stored), bytes(h)) for stored, h in msgpack.unpackb(ops)]


def publish_ops(client, stream: str, holder: str, events: list[tuple[bool, bytes]],
                maxlen: int = STREAM_MAXLEN) -> bool:
    """Append one record; False if Redis refused (routers then see a stale view until the next events)."""
    try:
        client.xadd(stream, {"replica": holder, "ops": pack_ops(events)}, maxlen=maxlen, approximate=True)
        return True
    except Exception as exc:  # noqa: BLE001
        log.debug("KV events not published: %s", exc)
        return False


class KVEventPublisher:
    def __init__(self, client, stream: str, replica_id: str, *, maxlen: int = STREAM_MAXLEN, flush_s: float = 0.1):
        self.r = client
        self.stream = stream
        self.replica_id = replica_id
        self.maxlen = maxlen
        self.flush_s = flush_s
        self._pending: dict[str, list[tuple[bool, bytes]]] = {}  # holder -> events in order
        self._lock = threading.Lock()
        self._reset_sent = False
        self._stop = threading.Event()
        self.dropped_events = 0
        self.published_events = 0
        self._thread = threading.Thread(target=self._loop, name="specserve-kv-events", daemon=True)
        self._thread.start()

    def publish(self, events: list[tuple[bool, bytes]], holder: str | None = None) -> None:
        """Queue events of this replica's cache, or of `holder` (STORE); never blocks on Redis."""
        if events:
            with self._lock:
                self._pending.setdefault(holder or self.replica_id, []).extend(events)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        try:
            if not self._reset_sent:
                self.r.xadd(self.stream, {"replica": self.replica_id, "reset": 1}, maxlen=self.maxlen,
                            approximate=True)
                self._reset_sent = True
        except Exception as exc:  # noqa: BLE001 - retried at the next flush
            log.debug("KV events: reset not published: %s", exc)
        for holder, events in pending.items():
            if holder == self.replica_id and not self._reset_sent:
                self.dropped_events += len(events)  # a reset still to come would erase them
            elif publish_ops(self.r, self.stream, holder, events, self.maxlen):
                self.published_events += len(events)
            else:
                self.dropped_events += len(events)

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()


class KVEventSubscriber:
    def __init__(self, client, stream: str, index):
        self.r = client
        self.stream = stream
        self.index = index
        self.last_id = "0-0"
        self.applied_events = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self, block_ms: int | None = None, count: int = 1000) -> int:
        """Apply the records that arrived since the last poll; returns how many."""
        reply = self.r.xread({self.stream: self.last_id}, count=count, block=block_ms)
        n = 0
        for _, records in reply or []:
            for record_id, fields in records:
                self.last_id = record_id
                n += 1
                replica = fields[b"replica"].decode()
                if b"reset" in fields:
                    self.index.purge(replica)
                    continue
                stored: list[bytes] = []
                ops = unpack_ops(fields[b"ops"])
                for is_stored, h in ops:
                    if is_stored:
                        stored.append(h)
                        continue
                    if stored:  # keep the order: adds before this removal go in first
                        self.index.add(replica, stored)
                        stored = []
                    self.index.remove(replica, [h])
                if stored:
                    self.index.add(replica, stored)
                self.applied_events += len(ops)
        return n

    def start(self) -> "KVEventSubscriber":
        def loop():
            while not self._stop.is_set():
                try:
                    self.poll(block_ms=500)
                except Exception as exc:  # noqa: BLE001 - Redis away: retry, the index keeps its last view
                    self.errors += 1
                    log.debug("KV events: %s", exc)
                    time.sleep(1.0)

        self._thread = threading.Thread(target=loop, name="specserve-kv-events-sub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
