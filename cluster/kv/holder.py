"""Node-local holders of block payloads.

A holder is a plain Ray actor per (application, node). Each export batch becomes one object in Ray's object
store, owned by the holder (so it outlives the replica that computed it); the holder maps each block to
(object, offset, size). Readers get the object refs in one call and read the bytes straight from the object
store: no copy on the same node, one transfer from another node, Redis never on the payload path.

The holder bounds its bytes: least recently used blocks are evicted, with their index entries, and an object is
freed once none of its blocks is left. Each holder instance has a random epoch registered in Redis; a restarted
holder has a new one, so the index entries of the old instance read as misses.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from specserve.cluster.kv.fairness import FairShareLRU

log = logging.getLogger(__name__)

HOLDER_NAMESPACE = "specserve"


@dataclass
class _Segment:
    ref: object  # ObjectRef of the batch's bytes (or any payload, in tests)
    nbytes: int
    tenant: str  # whose blocks these are: a segment is one export batch of one tenant
    live: set = field(default_factory=set)  # block ids still held in this segment


class SegmentLRU:
    """Which block lives where, which is to go next, and how many bytes are held. Pure bookkeeping.

    Tenants share the capacity fairly (fairness.FairShareLRU): over capacity, the coldest block of the tenant
    whose segments hold the most bytes goes, so one tenant's flood evicts its own blocks, not everybody's."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.blocks: dict[str, tuple[int, int, int]] = {}  # block id -> (segment, offset, size)
        self.order = FairShareLRU()  # block ids by tenant and recency; tenants charged their segments' bytes
        self.segments: dict[int, _Segment] = {}
        self.held_bytes = 0
        self._next = 0

    def add(self, block_ids: list[str], sizes: list[int], ref: object, tenant: str = "") -> list[str]:
        """Record one segment holding `tenant`'s `block_ids` back to back; returns the blocks evicted to make
        room (never the new ones: a batch larger than the capacity is still kept until the next add)."""
        seg_id, self._next = self._next, self._next + 1
        seg = _Segment(ref, sum(sizes), tenant)
        self.segments[seg_id] = seg
        self.held_bytes += seg.nbytes
        self.order.charge(tenant, seg.nbytes)
        offset = 0
        for bid, size in zip(block_ids, sizes):
            self._drop(bid)
            self.blocks[bid] = (seg_id, offset, size)
            self.order.add(tenant, bid)
            seg.live.add(bid)
            offset += size
        evicted = []
        while self.held_bytes > self.capacity_bytes:
            victim = self.order.victim(exclude=seg.live)
            if victim is None:
                break
            self._drop(victim)
            evicted.append(victim)
        return evicted

    def get(self, block_id: str) -> tuple[object, int, int] | None:
        """(segment ref, offset, size), marking the block recently used; None if not held."""
        loc = self.blocks.get(block_id)
        if loc is None:
            return None
        self.order.touch(block_id)
        seg_id, offset, size = loc
        return self.segments[seg_id].ref, offset, size

    def _drop(self, block_id: str) -> None:
        loc = self.blocks.pop(block_id, None)
        if loc is None:
            return
        self.order.discard(block_id)
        seg = self.segments[loc[0]]
        seg.live.discard(block_id)
        if not seg.live:  # the object is freed once no block in it is held
            del self.segments[loc[0]]
            self.held_bytes -= seg.nbytes
            self.order.charge(seg.tenant, -seg.nbytes)

    def drop(self, block_ids: list[str]) -> None:
        for bid in block_ids:
            self._drop(bid)

    def tenant_bytes(self) -> dict[str, int]:
        """Bytes held per tenant (its segments)."""
        return dict(self.order.held)


class KVHolder:
    """The Ray actor (see `holder_actor`). Block ids are index entry keys, so eviction can delete the entries."""

    def __init__(self, name: str, redis_config: dict, capacity_bytes: int, events_stream: str = ""):
        """`events_stream`: where prefix-aware routers learn of evicted blocks ("" when no router listens)."""
        from specserve.cluster.kv.redis_client import connect

        self.name = name
        self.events_stream = events_stream
        self.epoch = uuid.uuid4().hex[:16]
        self.lru = SegmentLRU(capacity_bytes)
        self.redis = connect(**redis_config)
        self.stats_ = {"puts": 0, "put_blocks": 0, "put_bytes": 0, "gets": 0, "get_blocks": 0, "get_missing": 0,
                       "evicted_blocks": 0, "redis_errors": 0}
        self._register()
        log.info("KV holder %s up (epoch %s, %.0f MB)", name, self.epoch, capacity_bytes / 1e6)

    def _register(self) -> None:
        from specserve.cluster.kv.index import register_holder

        try:
            register_holder(self.redis, self.name, self.epoch)
        except Exception as exc:  # noqa: BLE001 - Redis down: entries cannot be committed until it is back
            self.stats_["redis_errors"] += 1
            log.warning("KV holder %s: cannot register in Redis: %s", self.name, exc)

    def put(self, block_ids: list[str], sizes: list[int], data, tenant: str = "") -> str:
        """Keep `data` (`tenant`'s blocks' bytes back to back) as one object; returns this instance's epoch,
        which the writer's commit must name. Re-registers the epoch, so a Redis that restarted learns it again."""
        import ray

        ref = ray.put(data)
        evicted = self.lru.add(block_ids, sizes, ref, tenant)
        self.stats_["puts"] += 1
        self.stats_["put_blocks"] += len(block_ids)
        self.stats_["put_bytes"] += sum(sizes)
        self._register()
        if evicted:
            self.stats_["evicted_blocks"] += len(evicted)
            self._forget(evicted)
        return self.epoch

    def _forget(self, block_ids: list[str]) -> None:
        from specserve.cluster.kv.index import release_entries

        try:
            release_entries(self.redis, block_ids, "holder", self.name, self.epoch)
        except Exception:  # noqa: BLE001 - the entries then point at blocks we lack: readers see a miss
            self.stats_["redis_errors"] += 1
        if self.events_stream:
            from specserve.cluster.kv.events import STORE, publish_ops

            hashes = [bytes.fromhex(b.rsplit(":", 1)[1]) for b in block_ids]  # block ids are index entry keys
            publish_ops(self.redis, self.events_stream, STORE, [(False, h) for h in hashes])

    def get(self, block_ids: list[str]) -> tuple[str, list]:
        """(epoch, [(object ref, offset, size) or None per block]). The refs are nested, so Ray passes them
        back unresolved and the reader fetches the bytes itself (zero-copy on this node)."""
        self.stats_["gets"] += 1
        found = [self.lru.get(b) for b in block_ids]
        self.stats_["get_blocks"] += sum(1 for f in found if f is not None)
        self.stats_["get_missing"] += sum(1 for f in found if f is None)
        return self.epoch, [[f[0], f[1], f[2]] if f is not None else None for f in found]

    def drop(self, block_ids: list[str]) -> None:
        """Readers report blocks whose bytes failed their checksum."""
        self.lru.drop(block_ids)

    def stats(self) -> dict:
        return dict(self.stats_, name=self.name, epoch=self.epoch, held_bytes=self.lru.held_bytes,
                    held_blocks=len(self.lru.blocks), capacity_bytes=self.lru.capacity_bytes,
                    tenant_bytes=self.lru.tenant_bytes())

    def shutdown(self) -> None:
        from specserve.cluster.kv.index import unregister_holder

        try:
            unregister_holder(self.redis, self.name, self.epoch)
        except Exception:  # noqa: BLE001
            pass


def holder_name_prefix(app_name: str) -> str:
    """What the names of `app_name`'s holders start with (one holder per node)."""
    return f"specserve-kv-holder-{app_name}-"


def holder_name(app_name: str, node_id: str) -> str:
    return holder_name_prefix(app_name) + node_id[:16]


def holder_actor(app_name: str, node_id: str, redis_config: dict, capacity_bytes: int, events_stream: str = ""):
    """Get or start the holder of `app_name` on node `node_id`. Detached, so it outlives the replica that
    started it (the launcher kills it with the app); restarted by Ray if its process dies (with a new epoch)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = holder_name(app_name, node_id)
    return ray.remote(KVHolder).options(
        name=name, namespace=HOLDER_NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(name, redis_config, capacity_bytes, events_stream)


def kill_holders(app_name: str) -> int:
    """Kill the app's holders on every node (the launcher, when it stops the app)."""
    import ray

    killed = 0
    for node in ray.nodes():
        try:
            actor = ray.get_actor(holder_name(app_name, node["NodeID"]), namespace=HOLDER_NAMESPACE)
        except ValueError:
            continue
        try:
            ray.get(actor.shutdown.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - killing it anyway
            pass
        ray.kill(actor, no_restart=True)
        killed += 1
    return killed


class HolderPayloads:
    """Payload transport through holder actors (see store.PayloadTransport). Writers put into their node's
    holder; readers ask each entry's holder for object refs and read the bytes from the object store."""

    def __init__(self, local_holder_factory):
        """`local_holder_factory()` -> (name, actor handle) of this node's holder, started if needed."""
        self._factory = local_holder_factory
        self.holder, self.local = local_holder_factory()
        self._handles = {self.holder: self.local}

    def put(self, index, hashes: list[bytes], data, tenant: str = "") -> str:
        import ray
        from ray.exceptions import RayActorError

        keys = [index.entry_key(h) for h in hashes]
        try:
            return ray.get(self.local.put.remote(keys, [data.shape[1]] * len(keys), data, tenant), timeout=60)
        except RayActorError:  # killed for good: start a new one for the next export
            self.holder, self.local = self._factory()
            self._handles[self.holder] = self.local
            raise

    def _handle(self, name: str):
        import ray

        h = self._handles.get(name)
        if h is None:
            h = ray.get_actor(name, namespace=HOLDER_NAMESPACE)  # ValueError if there is no such actor
            self._handles[name] = h
        return h

    def get(self, index, entries, timeout_s: float) -> tuple[list, str | None]:
        import time

        import ray
        from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

        deadline = time.monotonic() + timeout_s
        by_holder: dict[str, list] = {}
        for e in entries:
            by_holder.setdefault(e.holder, []).append(e)
        calls, failed = {}, {}
        for name, es in by_holder.items():
            try:
                calls[name] = self._handle(name).get.remote([index.entry_key(e.block_hash) for e in es])
            except ValueError:
                failed[name] = "holder_gone"
        answers = {}
        for name, ref in calls.items():
            try:
                epoch, locs = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                answers[name] = (epoch, dict(zip((e.block_hash for e in by_holder[name]), locs)))
            except GetTimeoutError:
                failed[name] = "timeout"
            except RayActorError:
                self._handles.pop(name, None)
                failed[name] = "holder_gone"
        # The run of entries whose bytes can be had, in order.
        run, reason = [], None
        for e in entries:
            if e.holder in failed:
                reason = failed[e.holder]
                break
            epoch, locs = answers[e.holder]
            if epoch != e.epoch:
                reason = "fenced"  # the holder restarted since this entry was written
                break
            if locs.get(e.block_hash) is None:
                reason = "evicted"
                break
            run.append(locs[e.block_hash])
        if not run:
            return [], reason
        refs = list(dict.fromkeys(r[0] for r in run))
        try:
            arrays = ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError:
            return [], "timeout"
        except (RayActorError, ObjectLostError):
            return [], "holder_gone"
        flat = {r: a.reshape(-1) for r, a in zip(refs, arrays)}
        return [flat[ref][off:off + size] for ref, off, size in run], reason
