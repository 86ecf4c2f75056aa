"""KV events through a real Redis stream: order kept, resets purge, a late subscriber replays the stream."""

import pytest
import redis

from specserve.cluster.redis_server import EmbeddedRedis
from specserve.routing.block_hash import block_hashes
from specserve.routing.kv_events import KVEventPublisher, KVEventSubscriber, pack_ops, unpack_ops
from specserve.routing.prefix_index import PrefixIndex


@pytest.fixture(scope="module")
def r():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url, socket_timeout=2)


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
