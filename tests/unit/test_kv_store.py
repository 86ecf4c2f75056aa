"""KV block store core against a real redis-server (no Ray): namespaces, the index's two-phase writes, lookup,
fencing, bounds and admission; the holder's LRU bookkeeping; the store client with payloads in Redis, including
a corrupt payload, an incompatible layout, and Redis going away and coming back."""

import hashlib
import json
import os
import time

import pytest
import redis
import torch

from specserve.cluster.kv.holder import SegmentLRU
from specserve.cluster.config import KVStoreConfig
from specserve.cluster.kv.index import KVIndex, register_holder
from specserve.cluster.kv import namespace
from specserve.cluster.kv.namespace import KV_FORMAT_VERSION, KVNamespace, weights_revision
from specserve.cluster.kv.payload import BlockLayout, blocks_to_bytes, bytes_to_block
from specserve.cluster.kv.store import KVStoreClient, RedisPayloads
from specserve.cluster.redis_server import EmbeddedRedis
from specserve.actors.engine.block_hash import block_hashes, root_hash

LAYOUT = BlockLayout("float32", (2, 2, 4, 2, 8))


def hashes(n: int, seed: int = 0) -> list[bytes]:
    return block_hashes(list(range(seed, seed + 4 * n)), 4, namespace="t")


def ready(index: KVIndex, hs: list[bytes], writer: str = "w", holder: str = "h", epoch: str = "e1") -> None:
    assert all(index.claim(hs, writer))
    assert all(index.commit(hs, writer, holder, epoch, [LAYOUT.nbytes] * len(hs), [0] * len(hs), LAYOUT))


# ---- namespaces ------------------------------------------------------------------------------------------------
def test_namespace_id_changes_with_every_field():
    base = KVNamespace("m", "rev", "bfloat16", 16, 30, 3, 64)
    variants = [KVNamespace("m2", "rev", "bfloat16", 16, 30, 3, 64), KVNamespace("m", "rev2", "bfloat16", 16, 30, 3, 64),
                KVNamespace("m", "rev", "float32", 16, 30, 3, 64), KVNamespace("m", "rev", "bfloat16", 32, 30, 3, 64),
                KVNamespace("m", "rev", "bfloat16", 16, 29, 3, 64), KVNamespace("m", "rev", "bfloat16", 16, 30, 4, 64),
                KVNamespace("m", "rev", "bfloat16", 16, 30, 3, 32),
                KVNamespace("m", "rev", "bfloat16", 16, 30, 3, 64, sharding="tp2"),
                KVNamespace("m", "rev", "bfloat16", 16, 30, 3, 64, tenant="acme"),
                KVNamespace("m", "rev", "bfloat16", 16, 30, 3, 64, kv_format=KV_FORMAT_VERSION + 1)]
    assert base.kv_format == KV_FORMAT_VERSION  # a change of the payload layout changes every namespace id
    ids = {base.id} | {v.id for v in variants}
    assert len(ids) == 1 + len(variants)
    assert KVNamespace("m", "rev", "bfloat16", 16, 30, 3, 64).id == base.id  # stable


def test_weights_revision_follows_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 1000)
    (tmp_path / "tokenizer.json").write_text("x")
    first = weights_revision(tmp_path)
    assert weights_revision(tmp_path) == first
    (tmp_path / "tokenizer.json").write_text("y")  # not a weights file
    assert weights_revision(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"b" * 1000)
    assert weights_revision(tmp_path) != first


def _model_dir(path, monkeypatch):
    """A model directory whose files count as settled (their digests are remembered at once)."""
    monkeypatch.setattr(namespace, "_SETTLE_NS", 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(path / "user-cache"))
    model = path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"a" * 1000)
    return model


def _cached_digests(cache_file) -> dict:
    return json.loads(cache_file.read_text())["files"]


def test_weights_revision_remembers_digests_and_uses_them(tmp_path, monkeypatch):
    model = _model_dir(tmp_path, monkeypatch)
    first = weights_revision(model)
    cache = model / namespace._DIGEST_CACHE
    digests = _cached_digests(cache)
    st = (model / "model.safetensors").stat()
    assert digests["model.safetensors"] == {"stamp": [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns],
                                            "sha256": hashlib.sha256(b"a" * 1000).hexdigest()}
    assert weights_revision(model) == first
    # An unchanged file is not read again: a (planted) remembered digest is what the revision is made of.
    digests["model.safetensors"]["sha256"] = "00" * 32
    cache.write_text(json.dumps({"files": digests}))
    assert weights_revision(model) != first


def _replace_keeping_size_and_mtime(path, data, in_place):
    st = path.stat()
    if in_place:  # rsync --inplace -t: same inode, new bytes
        with open(path, "r+b") as f:
            f.write(data)
    else:  # rsync -t: a new file renamed over the old one
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("in_place", [False, True])
def test_weights_revision_sees_a_file_replaced_with_the_same_size_and_mtime(tmp_path, monkeypatch, in_place):
    model = _model_dir(tmp_path, monkeypatch)
    weights = model / "model.safetensors"
    first = weights_revision(model)
    assert "model.safetensors" in _cached_digests(model / namespace._DIGEST_CACHE)
    if in_place:
        # The write must land on a later timestamp tick than the one remembered (file timestamps come from a
        # coarse clock): wait for the clock to pass it.
        ctime = weights.stat().st_ctime_ns
        while time.time_ns() < ctime + 50_000_000:
            time.sleep(0.01)
    _replace_keeping_size_and_mtime(weights, b"b" * 1000, in_place)
    second = weights_revision(model)
    assert second != first
    assert weights_revision(model) == second


def test_weights_revision_falls_back_to_the_user_cache_when_the_directory_is_not_writable(tmp_path, monkeypatch):
    model = _model_dir(tmp_path, monkeypatch)
    (model / namespace._DIGEST_CACHE).mkdir()  # neither readable nor replaceable as a file (we run as root)
    first = weights_revision(model)
    user = list((tmp_path / "user-cache" / "specserve" / "weights-digests").iterdir())
    assert len(user) == 1 and "model.safetensors" in _cached_digests(user[0])
    assert weights_revision(model) == first
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "unwritable"))
    (tmp_path / "unwritable").write_text("a file, not a directory")
    assert weights_revision(model) == first  # no cache anywhere: hashed every time


# ---- index -----------------------------------------------------------------------------------------------------
def test_two_phase_write_and_one_call_lookup(r):
    index = KVIndex.from_config(r, "ns1", KVStoreConfig())
    register_holder(r, "h", "e1")
    hs = hashes(4)
    assert index.claim(hs[:2], "w1") == [True, True]
    assert index.claim(hs[:3], "w2") == [False, False, True]  # NX: the first writer keeps its claims
    assert index.lookup(hs, LAYOUT) == ([], "writing")  # claimed, not ready: invisible to readers
    assert index.commit(hs[:2], "w2", "h", "e1", [LAYOUT.nbytes] * 2, [1, 2], LAYOUT) == [False, False]
    assert index.commit(hs[:2], "w1", "h", "e1", [LAYOUT.nbytes] * 2, [1, 2], LAYOUT) == [True, True]
    entries, reason = index.lookup(hs, LAYOUT)
    assert [e.block_hash for e in entries] == hs[:2] and reason == "writing"
    assert entries[1].crc == 2 and entries[0].layout == LAYOUT and entries[0].holder == "h"
    entries, reason = index.lookup(hs[1:], LAYOUT)
    assert [e.block_hash for e in entries] == [hs[1]] and reason == "writing"
    assert index.lookup([hashes(1, seed=99)[0]], LAYOUT) == ([], "not_found")
    assert index.size() == 2


def test_expired_claim_frees_the_key(r):
    index = KVIndex.from_config(r, "ns2", KVStoreConfig(claim_ttl_s=0.2))
    register_holder(r, "h", "e1")
    hs = hashes(1)
    assert index.claim(hs, "dead-writer") == [True]
    time.sleep(0.3)
    assert index.claim(hs, "w2") == [True]
    assert index.commit(hs, "dead-writer", "h", "e1", [1], [1], LAYOUT) == [False]  # its claim is gone
    assert index.commit(hs, "w2", "h", "e1", [LAYOUT.nbytes], [1], LAYOUT) == [True]
    assert len(index.lookup(hs, LAYOUT)[0]) == 1
    assert index.lookup(hs, BlockLayout("bfloat16", LAYOUT.shape)) == ([], "incompatible")


def test_restarted_holder_fences_its_old_entries(r):
    index = KVIndex.from_config(r, "ns3", KVStoreConfig())
    register_holder(r, "h", "e1")
    hs = hashes(3)
    ready(index, hs)
    assert len(index.lookup(hs, LAYOUT)[0]) == 3
    register_holder(r, "h", "e2")  # the holder restarted
    assert index.lookup(hs, LAYOUT) == ([], "fenced")
    assert index.claim(hs[:1], "w2") == [True]  # a fenced entry can be written again
    # a commit naming an epoch that is not the live one is refused
    assert index.commit(hs[:1], "w2", "h", "e1", [1], [1], LAYOUT) == [False]
    assert index.commit(hs[:1], "w2", "h", "e2", [LAYOUT.nbytes], [1], LAYOUT) == [True]
    assert len(index.lookup(hs, LAYOUT)[0]) == 1


def test_hits_refresh_ttl_and_index_is_bounded(r):
    index = KVIndex.from_config(r, "ns4", KVStoreConfig(entry_ttl_s=100, max_index_entries=5))
    register_holder(r, "h", "e1")
    hs = hashes(8)
    ready(index, hs[:4])
    r.pexpire(index.entry_key(hs[0]), 1000)
    time.sleep(0.01)  # LRU scores are milliseconds
    index.lookup(hs[:1], LAYOUT)
    assert r.pttl(index.entry_key(hs[0])) > 90_000  # the hit refreshed it
    time.sleep(0.01)
    ready(index, hs[4:])  # 8 ready entries, bound 5: the 3 least recently used go
    assert index.size() == 5
    gone = [h for h in hs if not r.exists(index.entry_key(h))]
    assert gone == hs[1:4]  # hs[0] was hit after hs[1:4] were written


def test_admission_after_second_computation(r):
    index = KVIndex.from_config(r, "ns5", KVStoreConfig())
    hs = hashes(2)
    assert index.claim(hs, "w", admit_after=2) == [False, False]
    assert index.claim(hs, "w", admit_after=2) == [True, True]


def test_release_only_touches_the_named_holder(r):
    index = KVIndex.from_config(r, "ns6", KVStoreConfig())
    register_holder(r, "h", "e1")
    register_holder(r, "g", "e1")
    hs = hashes(2)
    ready(index, hs[:1], holder="h")
    ready(index, hs[1:], writer="w2", holder="g")
    assert index.release(hs, "h", "e1") == 1
    assert not r.exists(index.entry_key(hs[0])) and r.exists(index.entry_key(hs[1]))
    assert index.size() == 1


# ---- holder bookkeeping ----------------------------------------------------------------------------------------
def test_segment_lru_evicts_coldest_blocks_and_frees_whole_segments():
    lru = SegmentLRU(capacity_bytes=300)
    assert lru.add(["a", "b"], [100, 100], "seg-ab") == []
    assert lru.add(["c"], [100], "seg-c") == []
    assert lru.get("a") == ("seg-ab", 0, 100)  # a becomes the most recently used
    # 400 bytes held: b goes first but its segment still holds a (no bytes freed), then c (100 freed)
    assert lru.add(["d"], [100], "seg-d") == ["b", "c"]
    assert lru.held_bytes == 300 and lru.get("b") is None and lru.get("a") == ("seg-ab", 0, 100)
    lru.drop(["a"])  # the last block of seg-ab: now its bytes go
    assert lru.held_bytes == 100 and [s.ref for s in lru.segments.values()] == ["seg-d"]


# ---- payloads and the client -----------------------------------------------------------------------------------
def test_payload_bytes_round_trip_in_bfloat16():
    kv = torch.randn(3, *LAYOUT.shape).to(torch.bfloat16)
    data = blocks_to_bytes(kv)
    layout = BlockLayout.of(kv[0])
    assert data.shape == (3, layout.nbytes)
    for i in range(3):
        assert torch.equal(bytes_to_block(data[i].tobytes(), layout), kv[i])


def _client(r, ns="store", **kw) -> KVStoreClient:
    config = KVStoreConfig(timeout_s=0.5, retry_after_s=0.3, **kw)
    return KVStoreClient.from_config(KVIndex.from_config(r, ns, config), RedisPayloads(), LAYOUT, config)


def test_store_round_trip_with_redis_payloads(r):
    writer, reader = _client(r), _client(r)
    hs = hashes(5)
    kv = torch.randn(5, *LAYOUT.shape)
    assert writer.export(hs[:4], kv[:4]) and writer.flush()
    got = reader.fetch(hs)
    assert got.hashes == hs[:4] and got.miss_reason == "not_found"
    assert all(torch.equal(a, b) for a, b in zip(got.blocks, kv[:4]))
    st = reader.stats()
    assert st["hit_blocks"] == 4 and st["miss_blocks"]["not_found"] == 1 and st["bytes_in"] == 4 * LAYOUT.nbytes
    assert writer.stats()["exported_blocks"] == 4 and st["index_size"] == 4
    assert writer.export(hs[:2], kv[:2]) and writer.flush()  # already stored: claimed by nobody, not re-sent
    assert writer.stats()["export_skipped_blocks"] == 2 and writer.stats()["exported_blocks"] == 4
    writer.close()
    reader.close()


def test_exports_within_the_batch_window_share_one_claim_and_commit_per_tenant(r):
    writer, reader = _client(r, ns="batched", export_batch_s=0.5), _client(r, ns="batched")
    claims = []
    claim = writer.index.claim
    writer.index.claim = lambda hs, *a, **kw: claims.append(len(hs)) or claim(hs, *a, **kw)  # counts real calls
    hs = hashes(6)
    kv = torch.randn(6, *LAYOUT.shape)
    other_tenant = root_hash("batched/tenant/acme")
    for i in range(3):  # three engine steps' blocks, one step of another tenant between them
        assert writer.export(hs[2 * i:2 * i + 2], kv[2 * i:2 * i + 2], hash_root=other_tenant if i == 1 else None)
    assert writer.flush()
    assert sorted(claims) == [2, 4]  # default tenant: steps 1 and 3 in one claim; acme: its own
    default = reader.fetch(hs[:2] + hs[4:])
    assert default.hashes == hs[:2] + hs[4:]
    assert all(torch.equal(a, b) for a, b in zip(default.blocks, torch.cat([kv[:2], kv[4:]])))
    assert writer.stats()["exported_blocks"] == 6
    # A block recomputed within the window (evicted and computed again) goes out once.
    more = hashes(2, seed=9)
    assert writer.export(more, kv[:2]) and writer.export(more[1:], kv[1:2])
    assert writer.flush() and claims[-1] == 2 and writer.stats()["exported_blocks"] == 8
    assert writer._pending_bytes == 0
    writer.close()
    reader.close()


def test_close_during_the_batch_window_still_exports_what_was_queued(r):
    writer, reader = _client(r, ns="closing", export_batch_s=5.0), _client(r, ns="closing")
    hs = hashes(2)
    kv = torch.randn(2, *LAYOUT.shape)
    assert writer.export(hs, kv)
    writer.close()
    writer._exporter.join(timeout=10)
    assert not writer._exporter.is_alive() and writer.stats()["exported_blocks"] == 2
    assert reader.fetch(hs).hashes == hs
    reader.close()


def test_corrupt_payload_is_a_checksum_miss_and_is_dropped(r):
    client = _client(r)
    hs = hashes(3)
    kv = torch.randn(3, *LAYOUT.shape)
    client.export(hs, kv)
    client.flush()
    key = client.index.payload_key(hs[1])
    byte = r.getrange(key, 10, 10)
    r.setrange(key, 10, bytes([byte[0] ^ 0x01]))
    got = client.fetch(hs)
    assert got.hashes == hs[:1] and got.miss_reason == "checksum"
    assert client.stats()["miss_blocks"]["checksum"] == 2
    assert not r.exists(client.index.entry_key(hs[1]))  # nobody is served the corrupt block again
    client.close()


def test_incompatible_layout_is_a_miss(r):
    writer = _client(r, ns="shared")
    other = KVStoreClient.from_config(KVIndex.from_config(r, "shared", KVStoreConfig()), RedisPayloads(),
                                      BlockLayout("bfloat16", LAYOUT.shape), KVStoreConfig())
    hs = hashes(2)
    writer.export(hs, torch.randn(2, *LAYOUT.shape))
    writer.flush()
    got = other.fetch(hs)
    assert got.hashes == [] and got.miss_reason == "incompatible"
    writer.close()
    other.close()


def test_redis_down_is_a_miss_and_the_store_recovers(tmp_path):
    server = EmbeddedRedis().start()
    port = server.port
    r = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    client = _client(r)
    hs = hashes(2)
    kv = torch.randn(2, *LAYOUT.shape)
    try:
        server.stop()
        t0 = time.perf_counter()
        got = client.fetch(hs)
        assert got.hashes == [] and got.miss_reason == "redis_unavailable"
        assert time.perf_counter() - t0 < 2.0
        assert client.fetch(hs).miss_reason == "redis_unavailable"  # skipped while backing off: no wait
        assert not client.export(hs, kv)  # dropped, never queued
        assert client.stats()["export_dropped_blocks"] == 2
        server = EmbeddedRedis(port=port).start()  # Redis is back (empty)
        time.sleep(0.35)  # retry_after_s
        assert client.export(hs, kv) and client.flush()
        got = client.fetch(hs)
        assert got.hashes == hs and got.miss_reason is None
        assert client.stats()["redis_errors"] >= 1
    finally:
        client.close()
        server.stop()


def test_sentinel_config_reaches_the_master(tmp_path):
    """server.redis_sentinels: the client asks a real redis-sentinel (the same redis-server binary) for the
    master and uses it."""
    import subprocess

    from specserve.cluster.kv.redis_client import connect
    from specserve.cluster.redis_server import free_port, redis_server_binary

    master = EmbeddedRedis().start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
    proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = connect(sentinels=[f"127.0.0.1:{port}"], master="mymaster", timeout_s=1.0)
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        index = KVIndex.from_config(client, "sentinel", KVStoreConfig())
        register_holder(client, "h", "e1")
        ready(index, hashes(2))
        direct = redis.Redis.from_url(master.url)
        assert int(direct.get(index.count_key)) == 2  # written to the master the sentinel named
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        master.stop()


def test_slow_redis_is_a_timeout_miss(redis_server):
    import threading

    fast = redis.Redis.from_url(redis_server.url, socket_timeout=0.3)
    config = KVStoreConfig(timeout_s=0.3, retry_after_s=0.3)
    client = KVStoreClient.from_config(KVIndex.from_config(fast, "slow", config), RedisPayloads(), LAYOUT, config)
    sleeper = threading.Thread(target=lambda: redis.Redis.from_url(redis_server.url).execute_command(
        "DEBUG", "SLEEP", "1"))
    sleeper.start()
    time.sleep(0.05)
    try:
        t0 = time.perf_counter()
        got = client.fetch(hashes(2))
        assert got.hashes == [] and got.miss_reason == "timeout"
        assert time.perf_counter() - t0 < 0.9  # did not wait for Redis
    finally:
        sleeper.join()
        client.close()
