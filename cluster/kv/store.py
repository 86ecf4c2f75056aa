"""The KV store client a verifier uses: fetch the blocks of a prompt it lacks, export blocks it computed.

fetch() runs on a request's way into the engine (not on the engine thread): one index lookup for the prompt's
missing blocks, one payload fetch per holder, a checksum per block. Anything that goes wrong — Redis down or
slow, a holder gone, a corrupt or incompatible block — ends the prefix there and is counted as a miss with its
reason; the engine then prefills the rest. After a Redis error the store is skipped for `retry_after_s`, then
tried again: a Redis that comes back is used again without a restart.

export() only queues: a background thread claims the blocks, hands the bytes to the payload transport and
commits them. A full queue or an unavailable Redis drops the export (counted), never waits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from specserve.cluster.config import KVStoreConfig
from specserve.cluster.kv.index import DEFAULT_TENANT, REDIS_HOLDER, Entry, KVIndex
from specserve.cluster.latency import LatencyStat
from specserve.cluster.kv.payload import BlockLayout, blocks_to_bytes, bytes_to_block, checksum

log = logging.getLogger(__name__)

MISS_REASONS = ("not_found", "writing", "fenced", "redis_unavailable", "timeout", "holder_gone", "evicted",
                "checksum", "incompatible", "error")


_COUNTERS = ("lookups", "lookup_blocks", "hit_blocks", "bytes_in", "bytes_out", "exported_blocks",
             "export_skipped_blocks", "export_dropped_blocks", "export_fenced_blocks", "export_errors", "redis_errors")


class PayloadTransport(Protocol):
    """Moves block bytes between a writer/reader and where they are held."""

    holder: str  # the holder name this writer's blocks are recorded under

    def put(self, index: KVIndex, hashes: list[bytes], data: np.ndarray, tenant: str) -> str:
        """Store `data` ([n, nbytes] uint8, one row per block, all `tenant`'s); returns the holder epoch to commit
        with."""

    def get(self, index: KVIndex, entries: list[Entry], timeout_s: float) -> tuple[list, str | None]:
        """Buffers of the longest fetchable run of `entries`, and why it stopped (a miss reason) or None."""


class RedisPayloads:
    """Payloads in Redis next to the index: no holder actors (small deployments)."""

    holder = REDIS_HOLDER

    def put(self, index: KVIndex, hashes: list[bytes], data: np.ndarray, tenant: str = DEFAULT_TENANT) -> str:
        index.put_payloads(hashes, list(data))  # bounded with their entries, per tenant
        return "0"

    def get(self, index: KVIndex, entries: list[Entry], timeout_s: float) -> tuple[list, str | None]:
        bufs = []
        for buf in index.get_payloads([e.block_hash for e in entries]):
            if buf is None:
                return bufs, "evicted"
            bufs.append(buf)
        return bufs, None


def tenant_label(hash_root: bytes | None) -> str:
    """The tenant a block counts for in the store's bounds (index entries, holder bytes): the default tenant, or
    the root of the tenant's block hashes (so a tenant's name never reaches Redis)."""
    return DEFAULT_TENANT if hash_root is None else hash_root.hex()[:32]


@dataclass
class Fetched:
    """The blocks a fetch found, in prompt order, from the first block asked for."""

    hashes: list[bytes] = field(default_factory=list)
    blocks: list[torch.Tensor] = field(default_factory=list)
    miss_reason: str | None = None  # why the run ended before the last block asked for, None if it did not


class KVStoreClient:
    def __init__(self, index: KVIndex, transport: PayloadTransport, layout: BlockLayout, *, timeout_s: float,
                 retry_after_s: float, admit_after: int, min_import_blocks: int, max_pending_export_bytes: int,
                 export_batch_s: float = 0.0):
        self.index = index
        self.transport = transport
        self.layout = layout
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.admit_after = admit_after
        self.min_import_blocks = min_import_blocks
        self.max_pending_export_bytes = max_pending_export_bytes
        self.export_batch_s = export_batch_s
        self.writer = uuid.uuid4().hex[:16]
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.counters: Counter = Counter()
        self.misses: Counter = Counter()  # blocks asked for and not served, by reason
        self.import_latency = LatencyStat()
        self.export_latency = LatencyStat()
        self.lookup_latency = LatencyStat()
        # Called from the export thread with the hashes of blocks this client has just made readable (the
        # verifier tells prefix-aware routers through it that the store holds them).
        self.on_committed: Callable[[list[bytes]], None] | None = None
        self._pending_bytes = 0
        self._exports: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._exporter = threading.Thread(target=self._export_loop, name="specserve-kv-export", daemon=True)
        self._exporter.start()

    @classmethod
    def from_config(cls, index: KVIndex, transport: PayloadTransport, layout: BlockLayout,
                    config: KVStoreConfig) -> "KVStoreClient":
        return cls(index, transport, layout, timeout_s=config.timeout_s, retry_after_s=config.retry_after_s,
                   admit_after=config.admit_after, min_import_blocks=config.min_import_blocks,
                   max_pending_export_bytes=int(config.max_pending_export_mb * (1 << 20)),
                   export_batch_s=config.export_batch_s)

    # ---- availability -----------------------------------------------------------------------------------------
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _redis_failed(self, exc: BaseException) -> None:
        if self.available():
            log.warning("KV store: Redis unavailable (%s); skipping the store for %.1fs", exc, self.retry_after_s)
        self._down_until = time.monotonic() + self.retry_after_s
        self._count("redis_errors")

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _miss(self, reason: str, n: int) -> None:
        if n > 0:
            with self._lock:
                self.misses[reason] += n

    # ---- import -----------------------------------------------------------------------------------------------
    def fetch(self, hashes: list[bytes]) -> Fetched:
        """The longest run of `hashes` (from the first) that the store can supply, checked and decoded."""
        out = Fetched()
        if len(hashes) < self.min_import_blocks:
            return out
        t0 = time.perf_counter()
        self._count("lookups")
        self._count("lookup_blocks", len(hashes))
        if not self.available():
            out.miss_reason = "redis_unavailable"
            self._miss(out.miss_reason, len(hashes))
            return out
        try:
            entries, reason = self.index.lookup(hashes, self.layout)
        except Exception as exc:  # noqa: BLE001 - any failure is a miss
            out.miss_reason = self._failure(exc, "lookup")
            self._miss(out.miss_reason, len(hashes))
            return out
        self.lookup_latency.add(time.perf_counter() - t0)
        bufs: list = []
        if entries:
            try:
                bufs, fetch_reason = self.transport.get(self.index, entries, self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - any failure is a miss
                fetch_reason = self._failure(exc, "payload fetch")
            if fetch_reason:
                reason = fetch_reason
            if fetch_reason in ("holder_gone", "evicted", "fenced") and len(bufs) < len(entries):
                self._forget_unreachable(entries[len(bufs):], fetch_reason)
        for entry, buf in zip(entries, bufs):
            if len(buf) != entry.size or checksum(buf) != entry.crc:
                reason = "checksum"
                self._drop_corrupt(entry)
                break
            out.hashes.append(entry.block_hash)
            out.blocks.append(bytes_to_block(buf, self.layout))
        out.miss_reason = reason if len(out.hashes) < len(hashes) else None
        self._count("hit_blocks", len(out.hashes))
        self._count("bytes_in", len(out.hashes) * self.layout.nbytes)
        if out.miss_reason:
            self._miss(out.miss_reason, len(hashes) - len(out.hashes))
        if out.hashes:
            self.import_latency.add(time.perf_counter() - t0)
        return out

    def _failure(self, exc: BaseException, what: str) -> str:
        """The miss reason for an exception; a Redis error also starts the back-off."""
        import redis

        if isinstance(exc, redis.RedisError):
            self._redis_failed(exc)
            return "timeout" if isinstance(exc, redis.TimeoutError) else "redis_unavailable"
        log.warning("KV store %s failed: %r", what, exc)
        return "error"

    def _forget_unreachable(self, entries: list[Entry], reason: str) -> None:
        """The first entry's bytes cannot be had: delete it so nobody tries again, and with it the rest of the
        run held by the same gone (or restarted) holder instance."""
        first = entries[0]
        if reason == "evicted":
            doomed = [first]
        else:
            doomed = [e for e in entries if e.holder == first.holder and e.epoch == first.epoch]
        try:
            self.index.release([e.block_hash for e in doomed], first.holder, first.epoch)
        except Exception:  # noqa: BLE001 - they will be missed again, no harm
            pass

    def _drop_corrupt(self, entry: Entry) -> None:
        log.warning("KV store: block %s from %s failed its checksum; dropping it", entry.block_hash.hex()[:12],
                    entry.holder)
        try:
            self.index.release([entry.block_hash], entry.holder, entry.epoch)
        except Exception:  # noqa: BLE001 - it will be missed again, no harm
            pass

    # ---- export -----------------------------------------------------------------------------------------------
    def export(self, hashes: list[bytes], kv: torch.Tensor, hash_root: bytes | None = None) -> bool:
        """Queue computed blocks ([n, *block shape], a copy the caller will not touch) for export. `hash_root`:
        the root of their tenant's block hashes (None: the default tenant), whose share of the store they use."""
        nbytes = len(hashes) * self.layout.nbytes
        if not hashes or self._closed:
            return False
        if not self.available() or self._pending_bytes + nbytes > self.max_pending_export_bytes:
            self._count("export_dropped_blocks", len(hashes))
            return False
        with self._lock:
            self._pending_bytes += nbytes
        self._exports.put((hashes, kv, tenant_label(hash_root), time.perf_counter()))
        return True

    def _export_loop(self) -> None:
        while True:
            item = self._exports.get()
            if item is None:
                return
            batch, closing = [item], False
            # Blocks queued within export_batch_s go out together: one claim, transfer and commit instead of one
            # per engine step. Each round trip is Python work on this thread, which holds the GIL the engine
            # thread needs between its ops.
            deadline = time.monotonic() + self.export_batch_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._exports.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            for hashes, kv, tenant, t_queued, queued in _by_tenant(batch):
                try:
                    self._export(hashes, kv, tenant)
                    self.export_latency.add(time.perf_counter() - t_queued)
                except Exception as exc:  # noqa: BLE001 - an export that fails is just not stored
                    self._failure(exc, "export")
                    self._count("export_errors")
                finally:
                    with self._lock:
                        self._pending_bytes -= queued * self.layout.nbytes
            if closing:
                return

    def _export(self, hashes: list[bytes], kv: torch.Tensor, tenant: str) -> None:
        if not self.available():
            self._count("export_dropped_blocks", len(hashes))
            return
        if BlockLayout.of(kv[0]) != self.layout:
            raise ValueError(f"exported blocks {BlockLayout.of(kv[0])} do not match the store layout {self.layout}")
        claimed = self.index.claim(hashes, self.writer, self.admit_after)
        mine = [i for i, c in enumerate(claimed) if c]
        self._count("export_skipped_blocks", len(hashes) - len(mine))  # held already, or not admitted yet
        if not mine:
            return
        data = blocks_to_bytes(kv if len(mine) == len(hashes) else kv[mine])
        mine_hashes = [hashes[i] for i in mine]
        try:
            epoch = self.transport.put(self.index, mine_hashes, data, tenant)
            crcs = [checksum(row) for row in data]
            done = self.index.commit(mine_hashes, self.writer, self.transport.holder, epoch,
                                     [self.layout.nbytes] * len(mine), crcs, self.layout, tenant)
        except BaseException:
            try:
                self.index.release_claims(mine_hashes, self.writer)
            except Exception:  # noqa: BLE001 - the claims expire anyway
                pass
            raise
        n = sum(done)
        if n and self.on_committed is not None:
            self.on_committed([h for h, ok in zip(mine_hashes, done) if ok])
        self._count("exported_blocks", n)
        self._count("bytes_out", n * self.layout.nbytes)
        self._count("export_fenced_blocks", len(mine) - n)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued exports are done (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while self._pending_bytes > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._pending_bytes <= 0

    def close(self) -> None:
        self._closed = True
        self._exports.put(None)

    # ---- metrics ----------------------------------------------------------------------------------------------
    def stats(self, *, with_index_size: bool = True) -> dict:
        with self._lock:
            counters = dict(self.counters)
            misses = {r: self.misses.get(r, 0) for r in MISS_REASONS}
        index_size = None
        if with_index_size and self.available():
            try:
                index_size = self.index.size()
            except Exception as exc:  # noqa: BLE001 - reported as unknown
                self._failure(exc, "index size")
        return {
            "namespace": self.index.namespace_id,
            "holder": self.transport.holder,
            "available": self.available(),
            **{name: counters.get(name, 0) for name in _COUNTERS},
            "miss_blocks": misses,
            "lookup_latency": self.lookup_latency.as_dict(),
            "import_latency": self.import_latency.as_dict(),
            "export_latency": self.export_latency.as_dict(),
            "index_size": index_size,
        }


def _by_tenant(batch: list[tuple[list[bytes], torch.Tensor, str, float]]):
    """Queued exports merged per tenant, in queue order, each block once: (hashes, blocks, tenant, time the first
    was queued, blocks queued)."""
    groups: dict[str, list[tuple[list[bytes], torch.Tensor, str, float]]] = {}
    for item in batch:
        groups.setdefault(item[2], []).append(item)
    for tenant, items in groups.items():
        seen: set[bytes] = set()
        hashes: list[bytes] = []
        blocks: list[torch.Tensor] = []
        for item_hashes, kv, _, _ in items:
            keep = [i for i, h in enumerate(item_hashes) if h not in seen]  # recomputed within the window: once
            seen.update(item_hashes)
            hashes += [item_hashes[i] for i in keep]
            blocks.append(kv if len(keep) == len(item_hashes) else kv[keep])
        yield (hashes, blocks[0] if len(blocks) == 1 else torch.cat(blocks), tenant, items[0][3],
               sum(len(item[0]) for item in items))
