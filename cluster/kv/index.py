"""The KV block index in Redis: one hash per block, written in two phases, read as a whole prompt in one call.

Per namespace (all keys share the hash tag {ns}):
  {p}:e:<block>  entry: state (writing|ready), writer, holder, epoch, size, crc, dtype, shape, created, ready_at
  {p}:p:<block>  payload bytes, only when payloads live in Redis (holder "redis")
  {p}:s:<block>  how many times the block was computed (admission after n sightings)
  {p}:lru:<tenant>  sorted set of a tenant's ready entries by last use: bounds the index and ages it
  {p}:tenants    sorted set of tenants by how many ready entries they have; {p}:count: all ready entries
and, across namespaces, `specserve:kv:holders`: holder name -> epoch of its live instance.

The index keeps at most max_entries ready entries per namespace, shared fairly by the tenants whose blocks it
holds (their hash roots differ, their entries share the namespace): over the bound, the least recently used
entries of the tenant with the most entries go first (fairness.py), so one tenant's flood evicts its own.

Writers claim a block (only if nobody has), move the payload, then flip the entry to ready only if their claim
and their holder's epoch still stand: readers never see half-written blocks and a dead writer's claim expires.
A holder that restarts gets a new epoch, so entries naming the old one read as misses (fencing).
All scripts are atomic; lookup walks the prompt's chain and stops at the first block that is not usable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from specserve.cluster.config import KVStoreConfig
from specserve.cluster.kv.payload import BlockLayout

HOLDERS_KEY = "specserve:kv:holders"
REDIS_HOLDER = "redis"  # holder name of payloads stored in Redis itself (never fenced)
DEFAULT_TENANT = "default"

# Keeps {p}:tenants (tenant -> its entries) and {p}:count (all entries) in step with a tenant's LRU set, after
# every change of that set. `p` is the namespace's key prefix.
_RECOUNT = """
local function recount(p, t)
  local n = redis.call('ZCARD', p .. ':lru:' .. t)
  local before = tonumber(redis.call('ZSCORE', p .. ':tenants', t) or '0')
  if n > 0 then redis.call('ZADD', p .. ':tenants', n, t) else redis.call('ZREM', p .. ':tenants', t) end
  if n ~= before then redis.call('INCRBY', p .. ':count', n - before) end
end
-- The entry key's namespace prefix and the tenant it counts for (nil: it is in no LRU set, e.g. a claim).
local function forget(e)
  local t = redis.call('HGET', e, 'tenant')
  local p = string.gsub(e, ':e:%x+$', '')
  redis.call('DEL', e, p .. ':p:' .. string.sub(e, #p + 4))
  if t then
    redis.call('ZREM', p .. ':lru:' .. t, e)
    recount(p, t)
  end
end
"""

_CLAIM = _RECOUNT + """
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
      forget(e)
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

_COMMIT = _RECOUNT + """
local n, writer, holder, epoch = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local ttl, now, max_entries = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local dtype, shape, oldest, p, tenant = ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local lru = p .. ':lru:' .. tenant
local live = holder == 'redis' or redis.call('HGET', KEYS[1], holder) == epoch
local out = {}
for i = 1, n do
  local e = KEYS[1 + i]
  local cur = redis.call('HMGET', e, 'state', 'writer')
  if live and cur[1] == 'writing' and cur[2] == writer then
    redis.call('HSET', e, 'state', 'ready', 'holder', holder, 'epoch', epoch, 'size', ARGV[12 + 2 * i - 1],
               'crc', ARGV[12 + 2 * i], 'dtype', dtype, 'shape', shape, 'ready_at', now, 'tenant', tenant)
    redis.call('PEXPIRE', e, ttl)
    if holder == 'redis' then redis.call('PEXPIRE', KEYS[1 + n + i], ttl) end
    redis.call('ZADD', lru, now, e)
    out[i] = 1
  else
    out[i] = 0
  end
end
-- entries not used within their TTL have expired: forget them
redis.call('ZREMRANGEBYSCORE', lru, '-inf', oldest)
recount(p, tenant)
-- keep at most max_entries: the least recently used entries of the tenant with the most entries go first
local over = tonumber(redis.call('GET', p .. ':count') or '0') - max_entries
while over > 0 do
  local top = redis.call('ZREVRANGE', p .. ':tenants', 0, 1, 'WITHSCORES')
  if #top == 0 then break end
  local t = top[1]
  local tl = p .. ':lru:' .. t
  if redis.call('ZREMRANGEBYSCORE', tl, '-inf', oldest) == 0 then
    -- down to the next largest tenant's count (and one more), at most what is over
    local k = math.min(over, tonumber(top[2]) - tonumber(top[4] or '0') + 1)
    local victims = redis.call('ZPOPMIN', tl, k)
    for j = 1, #victims, 2 do
      redis.call('DEL', victims[j], (string.gsub(victims[j], ':e:', ':p:')))
    end
  end
  recount(p, t)
  over = tonumber(redis.call('GET', p .. ':count') or '0') - max_entries
end
return out
"""

# Returns one string (holder TAB epoch TAB crc per block, one block per line) and the stop reason: a reply of
# hundreds of small fields costs more to build and parse than the lookup itself.
_LOOKUP = r"""
local ttl, now, dtype, shape, size, p = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local out, reason, live, touched = {}, '', {}, {}
for i = 2, #KEYS do
  local e = redis.call('HMGET', KEYS[i], 'state', 'holder', 'epoch', 'size', 'crc', 'dtype', 'shape', 'tenant')
  if not e[1] then reason = 'not_found' break end
  if e[1] ~= 'ready' then reason = 'writing' break end
  if e[6] ~= dtype or e[7] ~= shape or e[4] ~= size then reason = 'incompatible' break end
  if e[2] ~= 'redis' then
    if live[e[2]] == nil then live[e[2]] = redis.call('HGET', KEYS[1], e[2]) end
    if live[e[2]] ~= e[3] then reason = 'fenced' break end
  end
  redis.call('PEXPIRE', KEYS[i], ttl)
  if e[2] == 'redis' then redis.call('PEXPIRE', (string.gsub(KEYS[i], ':e:', ':p:')), ttl) end
  local t = e[8] or ''
  if touched[t] == nil then touched[t] = {} end
  local tt = touched[t]
  tt[#tt + 1] = now
  tt[#tt + 1] = KEYS[i]
  out[#out + 1] = e[2] .. '\t' .. e[3] .. '\t' .. e[5]
end
-- XX: only entries still in their tenant's LRU set are refreshed; the counts do not change
for t, tt in pairs(touched) do redis.call('ZADD', p .. ':lru:' .. t, 'XX', unpack(tt)) end
return {table.concat(out, '\n'), reason}
"""

_RELEASE = _RECOUNT + """
local field, value, epoch, removed = ARGV[1], ARGV[2], ARGV[3], 0
for i = 1, #KEYS do
  local cur = redis.call('HMGET', KEYS[i], field, 'epoch')
  if cur[1] == value and (epoch == '' or cur[2] == epoch) then
    forget(KEYS[i])
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

    def __init__(self, client, namespace_id: str, *, entry_ttl_s: float, claim_ttl_s: float, max_entries: int):
        self.r = client
        self.namespace_id = namespace_id
        self.prefix = f"specserve:kv:{{{namespace_id}}}"
        self.count_key = f"{self.prefix}:count"
        self.tenants_key = f"{self.prefix}:tenants"
        self.entry_ttl_ms = int(entry_ttl_s * 1000)
        self.claim_ttl_ms = int(claim_ttl_s * 1000)
        self.max_entries = max_entries
        self._claim = client.register_script(_CLAIM)
        self._commit = client.register_script(_COMMIT)
        self._lookup = client.register_script(_LOOKUP)

    @classmethod
    def from_config(cls, client, namespace_id: str, config: KVStoreConfig) -> "KVIndex":
        return cls(client, namespace_id, entry_ttl_s=config.entry_ttl_s, claim_ttl_s=config.claim_ttl_s,
                   max_entries=config.max_index_entries)

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
               crcs: list[int], layout: BlockLayout, tenant: str = DEFAULT_TENANT) -> list[bool]:
        """Phase 2: flip `writer`'s claimed entries to ready, naming the holder instance that has the bytes,
        if the claims and the holder's epoch still stand. The entries count as `tenant`'s in the bound."""
        if not hashes:
            return []
        keys = [HOLDERS_KEY] + [self.entry_key(h) for h in hashes]
        if holder == REDIS_HOLDER:
            keys += [self.payload_key(h) for h in hashes]
        now = _now_ms()
        args = [len(hashes), writer, holder, epoch, self.entry_ttl_ms, now, self.max_entries, layout.dtype,
                layout.shape_str, now - self.entry_ttl_ms, self.prefix, tenant]
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
        rows, reason = self._lookup(keys=[HOLDERS_KEY] + [self.entry_key(h) for h in hashes],
                                    args=[self.entry_ttl_ms, _now_ms(), layout.dtype, layout.shape_str, layout.nbytes,
                                          self.prefix])
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
        return int(self.r.get(self.count_key) or 0)

    def tenant_sizes(self) -> dict[str, int]:
        """Ready entries per tenant."""
        return {_s(t): int(n) for t, n in self.r.zrange(self.tenants_key, 0, -1, withscores=True)}


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
