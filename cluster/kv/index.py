"""The KV block index in Redis: one hash per block, written in two phases, read as a whole prompt in one call.

Per namespace (all keys share the hash tag {ns}):
  {p}:e:<block>  entry: state (writing|ready), writer, holder, epoch, size, crc, dtype, shape, created, ready_at
  {p}:p:<block>  payload bytes, only when payloads live in Redis (holder "redis")
  {p}:s:<block>  how many times the block was computed (admission after n sightings)
  {p}:lru        sorted set of ready entries by last use: bounds the index and ages it
and, across namespaces, `specserve:kv:holders`: holder name -> epoch of its live instance.

Writers claim a block (only if nobody has), move the payload, then flip the entry to ready only if their claim
and their holder's epoch still stand: readers never see half-written blocks and a dead writer's claim expires.
A holder that restarts gets a new epoch, so entries naming the old one read as misses (fencing).
All scripts are atomic; lookup walks the prompt's chain and stops at the first block that is not usable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from specserve.cluster.kv.payload import BlockLayout

HOLDERS_KEY = "specserve:kv:holders"
REDIS_HOLDER = "redis"  # holder name of payloads stored in Redis itself (never fenced)

_CLAIM = """
local n, writer = tonumber(ARGV[1]), ARGV[2]
local ttl, admit, seen_ttl, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local out = {}
for i = 1, n do
  local e, ok = KEYS[1 + i], 1
  if admit > 1 then
    local seen = redis.call('INCR', KEYS[1 + n + i])
    redis.call('PEXPIRE', KEYS[1 + n + i], seen_ttl)
    if seen < admit then ok = 0 end
  end
  if ok == 1 and redis.call('EXISTS', e) == 1 then
    local cur = redis.call('HMGET', e, 'state', 'holder', 'epoch')
    -- a ready entry whose holder instance is gone is dead weight: take it over
    if cur[1] == 'ready' and cur[2] ~= 'redis' and redis.call('HGET', KEYS[1], cur[2]) ~= cur[3] then
      redis.call('DEL', e)
    else
      ok = 0
    end
  end
  if ok == 1 then
    redis.call('HSET', e, 'state', 'writing', 'writer', writer, 'created', now)
    redis.call('PEXPIRE', e, ttl)
  end
  out[i] = ok
end
return out
"""

_COMMIT = """
local n, writer, holder, epoch = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local ttl, now, max_entries = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local dtype, shape, oldest = ARGV[8], ARGV[9], ARGV[10]
local lru = KEYS[2]
local live = holder == 'redis' or redis.call('HGET', KEYS[1], holder) == epoch
local out = {}
for i = 1, n do
  local e = KEYS[2 + i]
  local cur = redis.call('HMGET', e, 'state', 'writer')
  if live and cur[1] == 'writing' and cur[2] == writer then
    redis.call('HSET', e, 'state', 'ready', 'holder', holder, 'epoch', epoch, 'size', ARGV[10 + 2 * i - 1],
               'crc', ARGV[10 + 2 * i], 'dtype', dtype, 'shape', shape, 'ready_at', now)
    redis.call('PEXPIRE', e, ttl)
    if holder == 'redis' then redis.call('PEXPIRE', KEYS[2 + n + i], ttl) end
    redis.call('ZADD', lru, now, e)
    out[i] = 1
  else
    out[i] = 0
  end
end
-- entries not used within their TTL have expired: forget them; then keep at most max_entries
redis.call('ZREMRANGEBYSCORE', lru, '-inf', oldest)
local over = redis.call('ZCARD', lru) - max_entries
if over > 0 then
  local victims = redis.call('ZPOPMIN', lru, over)
  for j = 1, #victims, 2 do
    redis.call('DEL', victims[j], (string.gsub(victims[j], ':e:', ':p:')))
  end
end
return out
"""

# Returns one string (holder TAB epoch TAB crc per block, one block per line) and the stop reason: a reply of
# hundreds of small fields costs more to build and parse than the lookup itself.
_LOOKUP = r"""
local ttl, now, dtype, shape, size = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local out, reason, live, touched = {}, '', {}, {}
for i = 3, #KEYS do
  local e = redis.call('HMGET', KEYS[i], 'state', 'holder', 'epoch', 'size', 'crc', 'dtype', 'shape')
  if not e[1] then reason = 'not_found' break end
  if e[1] ~= 'ready' then reason = 'writing' break end
  if e[6] ~= dtype or e[7] ~= shape or e[4] ~= size then reason = 'incompatible' break end
  if e[2] ~= 'redis' then
    if live[e[2]] == nil then live[e[2]] = redis.call('HGET', KEYS[1], e[2]) end
    if live[e[2]] ~= e[3] then reason = 'fenced' break end
  end
  redis.call('PEXPIRE', KEYS[i], ttl)
  if e[2] == 'redis' then redis.call('PEXPIRE', (string.gsub(KEYS[i], ':e:', ':p:')), ttl) end
  touched[#touched + 1] = now
  touched[#touched + 1] = KEYS[i]
  out[#out + 1] = e[2] .. '\t' .. e[3] .. '\t' .. e[5]
end
if #touched > 0 then redis.call('ZADD', KEYS[2], unpack(touched)) end
return {table.concat(out, '\n'), reason}
"""

_RELEASE = """
local field, value, epoch, removed = ARGV[1], ARGV[2], ARGV[3], 0
for i = 1, #KEYS do
  local cur = redis.call('HMGET', KEYS[i], field, 'epoch')
  if cur[1] == value and (epoch == '' or cur[2] == epoch) then
    redis.call('DEL', KEYS[i], (string.gsub(KEYS[i], ':e:', ':p:')))
    redis.call('ZREM', (string.gsub(KEYS[i], ':e:%x+$', ':lru')), KEYS[i])
    removed = removed + 1
  end
end
return removed
"""


@dataclass(frozen=True)
class Entry:
    """A ready block as the index describes it."""

    block_hash: bytes
    holder: str
    epoch: str
    size: int
    crc: int
    layout: BlockLayout


def _now_ms() -> int:
    return int(time.time() * 1000)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class KVIndex:
    """Index operations for one namespace. `client` is a redis-py client (bytes responses)."""

    def __init__(self, client, namespace_id: str, *, entry_ttl_s: float = 3600, claim_ttl_s: float = 30,
                 max_entries: int = 200_000):
        self.r = client
        self.namespace_id = namespace_id
        self.prefix = f"specserve:kv:{{{namespace_id}}}"
        self.lru_key = f"{self.prefix}:lru"
        self.entry_ttl_ms = int(entry_ttl_s * 1000)
        self.claim_ttl_ms = int(claim_ttl_s * 1000)
        self.max_entries = max_entries
        self._claim = client.register_script(_CLAIM)
        self._commit = client.register_script(_COMMIT)
        self._lookup = client.register_script(_LOOKUP)

    def entry_key(self, h: bytes) -> str:
        return f"{self.prefix}:e:{h.hex()}"

    def payload_key(self, h: bytes) -> str:
        return f"{self.prefix}:p:{h.hex()}"

    def _seen_key(self, h: bytes) -> str:
        return f"{self.prefix}:s:{h.hex()}"

    # ---- writers ----------------------------------------------------------------------------------------------
    def claim(self, hashes: list[bytes], writer: str, admit_after: int = 1) -> list[bool]:
        """Phase 1: claim each block nobody has (NX, expiring) for `writer` (a token unique to the writer).
        With admit_after > 1, only blocks computed that many times are claimed. Returns which blocks this
        writer now owns."""
        if not hashes:
            return []
        keys = [HOLDERS_KEY] + [self.entry_key(h) for h in hashes]
        if admit_after > 1:
            keys += [self._seen_key(h) for h in hashes]
        out = self._claim(keys=keys, args=[len(hashes), writer, self.claim_ttl_ms, admit_after, self.entry_ttl_ms,
                                           _now_ms()])
        return [bool(x) for x in out]

    def put_payloads(self, hashes: list[bytes], bufs: list) -> None:
        """Payloads stored in Redis (holder "redis"): written between claim and commit, expiring like a claim
        until the commit extends them."""
        pipe = self.r.pipeline(transaction=False)
        for h, buf in zip(hashes, bufs):
            pipe.set(self.payload_key(h), memoryview(buf), px=self.claim_ttl_ms)
        pipe.execute()

    def commit(self, hashes: list[bytes], writer: str, holder: str, epoch: str, sizes: list[int],
               crcs: list[int], layout: BlockLayout) -> list[bool]:
        """Phase 2: flip `writer`'s claimed entries to ready, naming the holder instance that has the bytes,
        if the claims and the holder's epoch still stand."""
        if not hashes:
            return []
        keys = [HOLDERS_KEY, self.lru_key] + [self.entry_key(h) for h in hashes]
        if holder == REDIS_HOLDER:
            keys += [self.payload_key(h) for h in hashes]
        now = _now_ms()
        args = [len(hashes), writer, holder, epoch, self.entry_ttl_ms, now, self.max_entries, layout.dtype,
                layout.shape_str, now - self.entry_ttl_ms]
        for size, crc in zip(sizes, crcs):
            args += [size, crc]
        return [bool(x) for x in self._commit(keys=keys, args=args)]

    def release_claims(self, hashes: list[bytes], writer: str) -> int:
        """Give up `writer`'s claims (a failed write); other writers' entries are left alone."""
        return release_entries(self.r, [self.entry_key(h) for h in hashes], "writer", writer)

    def release(self, hashes: list[bytes], holder: str, epoch: str = "") -> int:
        """Delete ready entries that name this holder instance: a payload found missing or corrupt."""
        return release_entries(self.r, [self.entry_key(h) for h in hashes], "holder", holder, epoch)

    # ---- readers ----------------------------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes], layout: BlockLayout) -> tuple[list[Entry], str | None]:
        """The longest run of ready, unfenced blocks with this `layout` from the start of `hashes`, in one round
        trip, refreshing their TTLs. Also returns why the run stopped ('not_found', 'writing', 'incompatible',
        'fenced'), None if it did not."""
        if not hashes:
            return [], None
        rows, reason = self._lookup(keys=[HOLDERS_KEY, self.lru_key] + [self.entry_key(h) for h in hashes],
                                    args=[self.entry_ttl_ms, _now_ms(), layout.dtype, layout.shape_str, layout.nbytes])
        entries = []
        for h, row in zip(hashes, rows.decode().split("\n") if rows else []):
            holder, epoch, crc = row.split("\t")
            entries.append(Entry(h, holder, epoch, layout.nbytes, int(crc), layout))
        return entries, (_s(reason) or None)

    def get_payloads(self, hashes: list[bytes]) -> list[bytes | None]:
        return self.r.mget([self.payload_key(h) for h in hashes])

    # ---- holders and size -------------------------------------------------------------------------------------
    def size(self) -> int:
        """Ready entries in this namespace (bounded by max_entries)."""
        return int(self.r.zcard(self.lru_key))


def release_entries(client, entry_keys: list[str], field: str, value: str, epoch: str = "") -> int:
    """Delete the given entries (with their payloads and LRU records) whose `field` (writer or holder) is
    `value` and, if given, whose epoch is `epoch`."""
    if not entry_keys:
        return 0
    return int(client.eval(_RELEASE, len(entry_keys), *entry_keys, field, value, epoch))


def register_holder(client, name: str, epoch: str) -> None:
    client.hset(HOLDERS_KEY, name, epoch)


def unregister_holder(client, name: str, epoch: str) -> None:
    """Forget a holder instance (its entries then read as fenced), unless a newer instance took the name."""
    client.eval("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) "
                "end return 0", 1, HOLDERS_KEY, name, epoch)
