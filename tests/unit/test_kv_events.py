"""KV events through a real Redis stream: order kept, resets purge, a late subscriber replays the stream; the
KV store's blocks appear as the STORE holder when committed and leave when a holder evicts them."""

import torch

from specserve.cluster.kv.holder import KVHolder
from specserve.cluster.config import KVStoreConfig
from specserve.cluster.kv.index import KVIndex
from specserve.cluster.kv.payload import BlockLayout
from specserve.cluster.kv.store import KVStoreClient, RedisPayloads
from specserve.actors.engine.block_hash import block_hashes
from specserve.cluster.kv.events import STORE, KVEventPublisher, KVEventSubscriber, pack_ops, unpack_ops
from specserve.routing.prefix_index import PrefixIndex


def test_ops_round_trip():
    hs = block_hashes(list(range(48)), 16)
    events = [(True, hs[0]), (False, hs[1]), (True, hs[2])]
    assert unpack_ops(pack_ops(events)) == events


def test_subscriber_index_follows_publishers(r):
    hs = block_hashes(list(range(64)), 16)
    a = KVEventPublisher(r, "s1", "replica-a", flush_s=60)
    b = KVEventPublisher(r, "s1", "replica-b", flush_s=60)
    a.publish([(True, h) for h in hs])
    a.publish([(False, hs[3]), (True, hs[3])])  # evicted, then computed again: still held
    b.publish([(True, hs[0]), (True, hs[1])])
    a.flush()
    b.flush()
    index = PrefixIndex()
    sub = KVEventSubscriber(r, "s1", index)
    assert sub.poll() == 4  # each publisher: its reset, then its ops
    assert index.match(hs) == {"replica-a": 4, "replica-b": 2}
    a.publish([(False, hs[2])])
    a.flush()
    sub.poll()
    assert index.match(hs) == {"replica-a": 2, "replica-b": 2}
    # replica-b restarts: its new incarnation announces a reset, the router forgets what it held
    b2 = KVEventPublisher(r, "s1", "replica-b", flush_s=60)
    b2.flush()
    sub.poll()
    assert index.match(hs) == {"replica-a": 2}
    # a router that starts later replays the stream to the same view
    late = PrefixIndex()
    KVEventSubscriber(r, "s1", late).poll()
    assert late.match(hs) == index.match(hs)
    for p in (a, b, b2):
        p.close()


def test_store_blocks_follow_commits_and_holder_evictions(r, redis_server):
    layout = BlockLayout("float32", (2, 1, 4, 1, 4))
    hs = block_hashes(list(range(16)), 4, namespace="events")
    index = KVIndex.from_config(r, "events", KVStoreConfig())
    publisher = KVEventPublisher(r, "s2", "replica-a", flush_s=60)
    store = KVStoreClient.from_config(index, RedisPayloads(), layout, KVStoreConfig())
    store.on_committed = lambda committed: publisher.publish([(True, h) for h in committed], holder=STORE)
    assert store.export(hs[:3], torch.zeros(3, *layout.shape)) and store.flush()
    publisher.flush()
    view = PrefixIndex()
    sub = KVEventSubscriber(r, "s2", view)
    sub.poll()
    assert view.match(hs) == {STORE: 3}
    # a holder evicting the second block tells the routers; a later reset of a replica leaves STORE alone
    holder = KVHolder("h", {"url": redis_server.url, "timeout_s": 2.0}, 1 << 20, events_stream="s2")
    holder._forget([index.entry_key(hs[1])])
    KVEventPublisher(r, "s2", "replica-a", flush_s=60).close()
    sub.poll()
    assert view.match(hs) == {STORE: 1} and view.num_blocks(STORE) == 2
    store.close()
    publisher.close()
