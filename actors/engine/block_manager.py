"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, a block table per sequence, reference counts,
and automatic prefix caching of full blocks keyed by the chained block hash, with LRU eviction.

Pure Python: it decides which block holds which token; the model runner owns the tensors.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from specserve.actors.engine.block_hash import block_hashes, root_hash
from specserve.actors.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class BlockImport:
    """An import in progress (BlockManager.begin_import): the blocks it pins, and the new ones to fill."""

    pinned: list[int] = field(default_factory=list)  # every block of the run, in hash order
    new: list[tuple[int, int, bytes]] = field(default_factory=list)  # (position in the hashes, block, hash)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True, namespace: str = "",
                 record_events: bool = False):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root = root_hash(namespace)
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_blocks: deque[int] = deque(range(num_blocks))  # never held, no cached content
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached content, unreferenced; LRU first
        # Counters for metrics: queried/hit prompt tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0
        # KV events for the router's index, in order: (True, hash) entered the prefix cache, (False, hash) left it.
        self.events: list[tuple[bool, bytes]] | None = [] if record_events else None

    # ---- capacity -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            old = self.block_hash[block]
            if old is not None and self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
                if self.events is not None:
                    self.events.append((False, old))
            self.block_hash[block] = None
        else:
            raise NoFreeBlocksError("KV cache pool is full")
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None  # most recently used goes last
            else:
                self.free_blocks.append(block)

    # ---- sequences ------------------------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], root: bytes | None = None) -> list[int]:
        """Cached blocks holding the longest prefix of `token_ids` (full blocks only, never the whole prompt:
        the last token must be computed to get logits). `root`: the tenant's hash root (default: the pool's)."""
        if not self.enable_prefix_caching:
            return []
        usable = (len(token_ids) - 1) // self.block_size
        hits = []
        for h in block_hashes(token_ids[:usable * self.block_size], self.block_size, parent=root or self.root):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _reusable_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks `seq` may start from: none while it gathers prompt logprobs (its prompt's logits
        must be computed)."""
        return [] if seq.prompt_logprobs is not None else self.match_prefix(seq.token_ids, seq.hash_root)

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        hits = self._reusable_prefix(seq)
        # Hit blocks sitting in the evictable list are counted as free but will not be taken.
        hits_evictable = sum(1 for b in hits if self.ref_counts[b] == 0)
        need = self.blocks_needed(len(seq)) - len(hits)
        return self.num_free_blocks - hits_evictable - need >= reserve

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its current tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits = self._reusable_prefix(seq)
        for block in hits:
            self._ref(block)
        seq.block_table = list(hits)
        seq.block_hashes = [self.block_hash[b] for b in hits]
        try:
            for _ in range(self.blocks_needed(len(seq)) - len(hits)):
                seq.block_table.append(self._take_block())
        except NoFreeBlocksError:
            self.free(seq)
            raise
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:  # prompt-cache figures describe the first admission, not recomputes
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += seq.num_cached_tokens

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` (another choice of `parent`'s request: its tokens are the prompt) the prompt's KV, which
        `parent` has computed. The child recomputes only the last prompt token, whose logits give its first
        token: the blocks before that token's block are shared (referenced), and that block is the child's own,
        as it writes there. Returns (parent's block, child's block) when the child's must first be a copy of the
        parent's (it holds earlier prompt tokens too), else None. Raises NoFreeBlocksError, leaving `child`
        without blocks."""
        assert not child.block_table and len(parent.block_table) * self.block_size >= child.num_prompt_tokens
        last = child.num_prompt_tokens - 1  # the position the child recomputes
        own = self._take_block()
        shared = parent.block_table[:last // self.block_size]
        for block in shared:
            self._ref(block)
        child.block_table = [*shared, own]
        child.block_hashes = parent.block_hashes[:len(shared)]
        child.num_computed_tokens = last
        return (parent.block_table[len(shared)], own) if last % self.block_size else None

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total (e.g. before a decode step writes a new token)."""
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_block())

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        return need <= 0 or self.num_free_blocks >= need

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._unref(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def register_computed_blocks(self, seq: Sequence) -> list[tuple[int, bytes, bytes | None]]:
        """Register the full, computed blocks of `seq` in the prefix cache (after a forward step). Returns the
        (block, hash, the sequence's hash root) of the blocks new to the cache."""
        if not self.enable_prefix_caching:
            return []
        num_full = seq.num_computed_tokens // self.block_size
        start = len(seq.block_hashes)
        if num_full <= start:
            return []
        parent = seq.block_hashes[-1] if seq.block_hashes else (seq.hash_root or self.root)
        new = block_hashes(seq.token_ids[:num_full * self.block_size], self.block_size, parent=parent, start_block=start)
        added = []
        for i, h in enumerate(new, start=start):
            block = seq.block_table[i]
            seq.block_hashes.append(h)
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                added.append((block, h, seq.hash_root))
        if self.events is not None:
            self.events.extend((True, h) for _, h, _ in added)
        return added

    def missing_prefix(self, token_ids: list[int], root: bytes | None = None) -> tuple[int, list[bytes]]:
        """(number of leading blocks cached here, hashes of the full blocks after them) for a prompt: what a
        store could supply. Safe to call from another thread: it only reads, and a stale answer costs a miss."""
        if not self.enable_prefix_caching:
            return 0, []
        usable = (len(token_ids) - 1) // self.block_size
        hashes = block_hashes(token_ids[:usable * self.block_size], self.block_size, parent=root or self.root)
        cached = 0
        while cached < len(hashes) and hashes[cached] in self.hash_to_block:
            cached += 1
        return cached, hashes[cached:]

    # ---- blocks computed elsewhere (KV store) -------------------------------------------------------------------
    def cached_block(self, h: bytes) -> int | None:
        return self.hash_to_block.get(h)

    def begin_import(self, hashes: list[bytes]) -> BlockImport:
        """Blocks for the longest leading run of `hashes` (a prompt's chained block hashes) this pool can hold.

        Every block of the run, those cached here already and the new ones, stays referenced (pinned) until
        end_import: taking a block for a later hash may evict other cached blocks (LRU) but never one of this
        import, which would put two hashes' KV in one block. The run ends at the first hash no block can be had
        for (or a repeated hash, which no chain has): a partial import is a shorter prefix hit, never a wrong one.
        """
        imp = BlockImport()
        new_hashes: set[bytes] = set()
        for i, h in enumerate(hashes):
            block = self.hash_to_block.get(h)
            if block is not None:
                self._ref(block)
            elif h in new_hashes:
                break
            else:
                try:
                    block = self._take_block()
                except NoFreeBlocksError:
                    break
                imp.new.append((i, block, h))
                new_hashes.add(h)
            imp.pinned.append(block)
        return imp

    def end_import(self, imp: BlockImport, *, written: bool) -> int:
        """Finish an import: register the new blocks under their hashes if their KV was `written`, then unpin
        the run (its head last, so the LRU evicts a prefix's tail first). Returns how many blocks were added."""
        if written:
            for _, block, h in imp.new:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
                if self.events is not None:
                    self.events.append((True, h))
        for block in reversed(imp.pinned):
            self._unref(block)
        imp.pinned = []
        return len(imp.new) if written else 0

    def drain_events(self) -> list[tuple[bool, bytes]]:
        """The (stored?, hash) events since the last drain, oldest first."""
        if self.events is None:
            return []
        out, self.events = self.events, []
        return out

    def check_invariants(self) -> None:
        """For tests: every block is in exactly one of held / evictable / free."""
        held = {b for b in range(self.num_blocks) if self.ref_counts[b] > 0}
        ev, fr = set(self.evictable), set(self.free_blocks)
        assert not (held & ev) and not (held & fr) and not (ev & fr)
        assert len(held) + len(ev) + len(fr) == self.num_blocks
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h
