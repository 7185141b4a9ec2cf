"""Paged KV cache bookkeeping: which blocks each sequence holds, and the prefix cache.

A block holds `block_size` consecutive tokens of one sequence. Blocks are reference counted so
sequences with a common prefix (the history of a chat, the n choices of one request) share them.
With prefix caching, every full block whose K/V has been computed is registered under a chained
hash of all token ids up to its end; a later sequence that starts with the same tokens takes the
same blocks instead of recomputing them. Freed registered blocks stay in the cache, in LRU order,
until a fresh block is needed and none unregistered is free.

A sequence's last, partly filled block is remembered too when the sequence is freed (finished,
aborted or preempted): under the hash of the blocks before it and the tokens it holds K/V for.
A later sequence whose prompt continues the same text (a chat's next turn, which starts with the
whole previous reply) takes that block over, exclusively, and computes only the tokens after
the common part, writing over the rest. Without this, up to block_size - 1 tokens at the end of
every reply would be recomputed on the next turn.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from chatglm_serve.engine.sequence import Sequence


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # tokens of a registered block: guards against a hash collision handing out wrong K/V
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chained hash -> block id
        # freed partly filled tail blocks: hash of the blocks before -> {tokens held: block id}
        self.partial: dict[int | None, dict[tuple[int, ...], int]] = {}
        self.block_partial: list[tuple[int | None, tuple[int, ...]] | None] = [None] * num_blocks
        self.free_plain: deque[int] = deque(range(num_blocks))  # unregistered, unreferenced
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; LRU
        self.pinned: list[int] = []  # held for good (P-Tuning v2 prefixes), never in a table
        # counters
        self.cache_hit_blocks = 0
        self.cache_queried_blocks = 0

    # ---- capacity ----
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- prefix cache ----
    def _lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        b = self.cached.get(h)
        if b is not None and self.block_tokens[b] == tokens:
            return b
        return None

    def match_prefix(
        self, token_ids: list[int], seed: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Cached blocks (and their hashes) covering the longest cached prefix of token_ids.

        At least the last token is always left uncached: its logits are needed to sample, and it
        must be written into a block of the sequence's own, never into a shared one. `seed`
        starts the hash chain: sequences of different adapters never share blocks.
        """
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        blocks: list[int] = []
        hashes: list[int] = []
        prev: int | None = seed
        for j in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[j * bs : (j + 1) * bs])
            h = chain_hash(prev, tokens)
            b = self._lookup(h, tokens)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
            prev = h
        return blocks, hashes

    def match_partial(
        self, token_ids: list[int], hashes: list[int], seed: int | None = None
    ) -> tuple[int, int] | None:
        """(block, tokens) of a freed partly filled block to take over after the full blocks
        `match_prefix` found (their hashes given): the one sharing the most tokens with what
        follows them, never reaching the last token. None when no such block shares any."""
        if not self.enable_prefix_caching:
            return None
        candidates = self.partial.get(hashes[-1] if hashes else seed)
        if not candidates:
            return None
        start = len(hashes) * self.block_size
        follow = token_ids[start : min(start + self.block_size, len(token_ids) - 1)]
        best: tuple[int, int] | None = None
        for tokens, b in candidates.items():
            n = 0
            for x, y in zip(tokens, follow, strict=False):
                if x != y:
                    break
                n += 1
            if n and (best is None or n > best[1]):
                best = (b, n)
        return best

    def _register_partial(self, seq: Sequence) -> None:
        """On free: remember the sequence's partly filled last computed block, if it is its own."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        j, k = divmod(seq.num_computed_tokens, bs)
        if k == 0 or j >= len(seq.block_table) or len(seq.block_hashes) != j:
            return
        b = seq.block_table[j]
        if self.ref_counts[b] != 1 or self.block_hash[b] is not None:
            return
        parent = seq.block_hashes[-1] if j else seq.hash_seed
        tokens = tuple(seq.token_ids[j * bs : j * bs + k])
        entries = self.partial.setdefault(parent, {})
        if tokens not in entries:  # else the same tokens are remembered already
            entries[tokens] = b
            self.block_partial[b] = (parent, tokens)

    def _forget_partial(self, b: int) -> None:
        key = self.block_partial[b]
        if key is None:
            return
        parent, tokens = key
        entries = self.partial[parent]
        del entries[tokens]
        if not entries:
            del self.partial[parent]
        self.block_partial[b] = None

    def register_computed(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        prev = seq.block_hashes[-1] if seq.block_hashes else seq.hash_seed
        for j in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[j * bs : (j + 1) * bs])
            h = chain_hash(prev, tokens)
            b = seq.block_table[j]
            if h not in self.cached and self.block_hash[b] is None:
                self.cached[h] = b
                self.block_hash[b] = h
                self.block_tokens[b] = tokens
            seq.block_hashes.append(h)
            prev = h

    # ---- allocation ----
    def _pop_free(self) -> int:
        if self.free_plain:
            b = self.free_plain.popleft()
        else:  # evict the least recently freed cached block
            b, _ = self.free_cached.popitem(last=False)
            h = self.block_hash[b]
            if h is not None and self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = None
            self.block_tokens[b] = None
            self._forget_partial(b)
        self.ref_counts[b] = 1
        return b

    def _take(self, b: int) -> None:
        if self.ref_counts[b] == 0:
            del self.free_cached[b]
        self.ref_counts[b] += 1

    def _match(self, seq: Sequence) -> tuple[list[int], list[int], tuple[int, int] | None]:
        if seq.wants_prompt_logprobs:
            # cached blocks hold K/V but not the logits its prompt logprobs need: recompute
            return [], [], None
        blocks, hashes = self.match_prefix(seq.token_ids, seq.hash_seed)
        return blocks, hashes, self.match_partial(seq.token_ids, hashes, seq.hash_seed)

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        blocks, _, partial = self._match(seq)
        hit = blocks + [partial[0]] if partial else blocks
        return self._blocks_needed(seq, hit) + reserve <= self.num_free_blocks

    def _blocks_needed(self, seq: Sequence, hit_blocks: list[int]) -> int:
        fresh = self.blocks_for(seq.num_tokens) - len(hit_blocks)
        revived = sum(1 for b in hit_blocks if self.ref_counts[b] == 0)  # leave the free pool
        return fresh + revived

    def allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False (and changes nothing) when fewer than needed + reserve blocks are free.
        """
        assert not seq.block_table, "sequence already holds blocks"
        blocks, hashes, partial = self._match(seq)
        hit = blocks + [partial[0]] if partial else blocks
        if self._blocks_needed(seq, hit) + reserve > self.num_free_blocks:
            return False
        for b in blocks:
            self._take(b)
        if partial:  # taken over: this sequence writes the rest of it
            self._forget_partial(partial[0])
            self._take(partial[0])
        fresh = [self._pop_free() for _ in range(self.blocks_for(seq.num_tokens) - len(hit))]
        seq.block_table = hit + fresh
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(blocks) * self.block_size + (partial[1] if partial else 0)
        if self.enable_prefix_caching:
            self.cache_queried_blocks += (seq.num_tokens - 1) // self.block_size
            self.cache_hit_blocks += len(blocks)
        return True

    def pin(self, n: int) -> list[int]:
        """Take n blocks out of circulation for good (shared prefixes computed once)."""
        if n > len(self.free_plain) + len(self.free_cached):
            raise RuntimeError(f"cannot pin {n} KV blocks: only {self.num_free_blocks} are free")
        blocks = [self._pop_free() for _ in range(n)]
        self.pinned += blocks
        return blocks

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: Sequence) -> None:
        """Make room for all of the sequence's tokens (a decode step adds at most one block)."""
        need = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("append_slots without can_append")
        for _ in range(need):
            seq.block_table.append(self._pop_free())

    def free(self, seq: Sequence) -> None:
        # Tail blocks are freed first so they are evicted before the (more shareable) prefix.
        self._register_partial(seq)
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is not None or self.block_partial[b] is not None:
                    self.free_cached[b] = None
                else:
                    self.free_plain.append(b)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (e.g. after the cache contents became untrustworthy)."""
        for b in list(self.free_cached):
            self.free_plain.append(b)
        self.free_cached.clear()
        self.cached.clear()
        self.partial.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks
        self.block_partial = [None] * self.num_blocks

    def check_consistency(self) -> None:
        """Invariants, for tests: every block is free exactly once or referenced."""
        free = list(self.free_plain) + list(self.free_cached)
        free_set = set(free)
        assert len(free) == len(free_set), "a block is free twice"
        for b in range(self.num_blocks):
            assert (self.ref_counts[b] == 0) == (b in free_set), f"block {b} ref/free mismatch"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
        partial = [(p, t, b) for p, entries in self.partial.items() for t, b in entries.items()]
        for parent, tokens, b in partial:
            assert self.block_partial[b] == (parent, tokens) and self.block_hash[b] is None
            assert self.ref_counts[b] == 0 and b in self.free_cached
        assert sum(k is not None for k in self.block_partial) == len(partial)
