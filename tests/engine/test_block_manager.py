"""Block manager: allocation, reference counts, prefix cache hits, LRU eviction, no leaks."""

from __future__ import annotations

import random

import pytest

from chatglm_serve.engine.block_manager import BlockManager
from chatglm_serve.engine.sequence import Request, Sequence
from chatglm_serve.engine.types import SamplingParams

BS = 4


def make_seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    req = Request(f"r{seq_id}", tokens, SamplingParams(), max_tokens=100)
    return Sequence(seq_id, req, 0, None, None)


def computed(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the forward pass computed every token but the last."""
    seq.num_computed_tokens = seq.num_tokens - 1
    bm.register_computed(seq)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(10, BS)
    a, b = make_seq(list(range(9)), 0), make_seq(list(range(100, 105)), 1)
    assert bm.allocate(a) and bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert set(a.block_table).isdisjoint(b.block_table)
    assert bm.num_free_blocks == 5
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10
    bm.check_consistency()


def test_allocate_refuses_without_changing_anything():
    bm = BlockManager(3, BS)
    seq = make_seq(list(range(13)))  # needs 4 blocks
    assert not bm.can_allocate(seq)
    assert not bm.allocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 3
    small = make_seq(list(range(8)))
    assert not bm.allocate(small, reserve=2)  # 2 blocks + 2 reserved > 3
    assert bm.allocate(small, reserve=1)


def test_prefix_hit_shares_blocks_and_skips_computed_tokens():
    bm = BlockManager(16, BS)
    first = make_seq(list(range(10)))
    assert bm.allocate(first)
    assert first.num_computed_tokens == 0
    computed(bm, first)  # blocks 0 and 1 are full and computed
    second = make_seq(list(range(8)) + [50, 51, 52])
    assert bm.allocate(second)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert second.num_computed_tokens == 8
    assert bm.ref_counts[first.block_table[0]] == 2
    # a different first block breaks the chain, even if later blocks match
    third = make_seq([99] + list(range(1, 10)))
    assert bm.allocate(third)
    assert third.num_computed_tokens == 0
    for s in (first, second, third):
        bm.free(s)
    assert bm.num_free_blocks == 16
    bm.check_consistency()


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(8)))
    bm.allocate(a)
    a.num_computed_tokens = 8
    bm.register_computed(a)
    b = make_seq(list(range(8)))  # exactly the two cached blocks
    bm.allocate(b)
    # the second block must be the sequence's own: its last token is recomputed into it
    assert b.num_computed_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_freed_blocks_stay_cached_until_evicted_in_lru_order():
    bm = BlockManager(6, BS)
    a = make_seq(list(range(9)))  # 3 blocks, 2 full and registered
    bm.allocate(a)
    computed(bm, a)
    cached_a = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 6
    # a returning prefix revives the cached blocks
    again = make_seq(list(range(8)) + [7])
    bm.allocate(again)
    assert again.block_table[:2] == cached_a and again.num_computed_tokens == 8
    bm.free(again)
    # fill the cache with unrelated sequences: unregistered free blocks go first, then LRU
    other = make_seq(list(range(200, 216)))  # 4 blocks: exactly the unregistered ones
    bm.allocate(other)
    assert set(other.block_table).isdisjoint(cached_a)
    more = make_seq(list(range(300, 305)))  # 2 blocks: must evict both cached ones
    bm.allocate(more)
    assert set(more.block_table) == set(cached_a)
    bm.free(other)
    bm.free(more)
    probe = make_seq(list(range(8)) + [7])
    bm.allocate(probe)
    assert probe.num_computed_tokens == 0  # evicted: nothing served from the cache
    bm.check_consistency()


def test_tail_blocks_are_evicted_before_prefix_blocks():
    bm = BlockManager(4, BS)
    a = make_seq(list(range(13)))  # 4 blocks, 3 registered
    bm.allocate(a)
    computed(bm, a)
    table = list(a.block_table)
    bm.free(a)
    filler = make_seq(list(range(500, 505)))  # 2 blocks: the unregistered one + 1 evicted
    bm.allocate(filler)
    assert set(filler.block_table) == {table[3], table[2]}
    assert bm.match_prefix(list(range(13)))[0] == table[:2]


def test_blocks_filled_while_decoding_are_registered_for_the_next_turn():
    bm = BlockManager(16, BS)
    turn1 = make_seq([10, 11, 12, 13, 14])  # prompt: 1 full block + 1 token
    bm.allocate(turn1)
    turn1.num_computed_tokens = turn1.num_tokens  # the prefill step
    bm.register_computed(turn1)
    turn1.token_ids.append(20)  # ... samples the first reply token
    # decode steps, as the engine runs them: room for the new token, compute it, sample one
    for token in range(21, 29):
        bm.append_slots(turn1)
        turn1.num_computed_tokens += 1
        bm.register_computed(turn1)
        turn1.token_ids.append(token)
    # 14 tokens, 13 computed (the last sampled one never is): 3 full blocks registered,
    # two of them filled by decoding
    assert turn1.num_tokens == 14 and turn1.num_computed_tokens == 13
    assert len(turn1.block_hashes) == 3
    reply_blocks, tail = turn1.block_table[:3], turn1.block_table[3]
    bm.free(turn1)  # the request finishes
    # the next turn: the whole reply, then new text
    turn2 = make_seq(turn1.token_ids + [90, 91, 92])
    assert bm.allocate(turn2)
    assert turn2.block_table[:3] == reply_blocks
    # ... and the partly filled last block (1 computed token) is taken over too
    assert turn2.block_table[3] == tail and turn2.num_computed_tokens == 13
    bm.free(turn2)
    bm.check_consistency()


def _finished(bm: BlockManager, tokens: list[int], computed_tokens: int) -> list[int]:
    """A sequence that computed its first `computed_tokens` tokens, then was freed."""
    seq = make_seq(tokens)
    assert bm.allocate(seq)
    seq.num_computed_tokens = computed_tokens
    bm.register_computed(seq)
    table = list(seq.block_table)
    bm.free(seq)
    bm.check_consistency()
    return table


def test_a_freed_partly_filled_block_is_taken_over_by_one_continuation():
    bm = BlockManager(16, BS)
    table = _finished(bm, list(range(11)), 10)  # blocks: 2 full, then 2 of 4 tokens computed
    follow = make_seq(list(range(11)) + [50, 51])
    assert bm.allocate(follow)
    assert follow.block_table[:3] == table[:3] and follow.num_computed_tokens == 10
    assert bm.block_partial[table[2]] is None  # no longer offered: this sequence writes it
    other = make_seq(list(range(11)) + [60])
    assert bm.allocate(other)
    assert other.block_table[:2] == table[:2] and other.block_table[2] != table[2]
    assert other.num_computed_tokens == 8
    for s in (follow, other):
        bm.free(s)
    bm.check_consistency()


def test_a_partly_filled_block_is_reused_up_to_where_the_tokens_differ():
    bm = BlockManager(16, BS)
    table = _finished(bm, list(range(8)) + [20, 21, 22, 23], 11)  # 3 of the last 4 computed
    seq = make_seq(list(range(8)) + [20, 21, 99, 98, 97])
    assert bm.allocate(seq)
    assert seq.block_table[2] == table[2] and seq.num_computed_tokens == 10  # 20, 21 reused
    bm.free(seq)
    # the last token is never served from a cached block, partial or not
    bm = BlockManager(16, BS)
    table = _finished(bm, list(range(7)), 6)
    seq = make_seq(list(range(7)))
    assert bm.allocate(seq)
    assert seq.block_table[1] == table[1] and seq.num_computed_tokens == 6
    bm.free(seq)
    bm.check_consistency()


def test_partial_blocks_are_evicted_like_cached_ones_and_not_kept_without_prefix_caching():
    bm = BlockManager(4, BS)
    table = _finished(bm, list(range(6)), 5)  # 1 full + 1 partial block, both cached
    filler = make_seq(list(range(100, 109)))  # 3 blocks: 2 plain + the partial (LRU first)
    assert bm.allocate(filler)
    assert table[1] in filler.block_table and table[0] not in filler.block_table
    bm.check_consistency()
    assert bm.partial == {}
    bm.free(filler)
    probe = make_seq(list(range(6)) + [9])
    assert bm.allocate(probe)
    assert probe.num_computed_tokens == 4
    bm.free(probe)
    bm.reset_prefix_cache()
    assert bm.partial == {} and all(k is None for k in bm.block_partial)
    bm.check_consistency()

    off = BlockManager(8, BS, enable_prefix_caching=False)
    _finished(off, list(range(6)), 5)
    assert off.partial == {}
    seq = make_seq(list(range(6)) + [9])
    assert off.allocate(seq) and seq.num_computed_tokens == 0


def test_hash_collision_is_not_trusted():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(5)))
    bm.allocate(a)
    computed(bm, a)
    block = a.block_table[0]
    # corrupt the recorded tokens: a lookup with the same hash but other tokens must miss
    bm.block_tokens[block] = (9, 9, 9, 9)
    assert bm.match_prefix(list(range(5))) == ([], [])


def test_prefix_caching_off_never_shares():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    bm.allocate(a)
    computed(bm, a)
    b = make_seq(list(range(9)))
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)


def test_append_slots_grows_by_one_block_at_boundaries():
    bm = BlockManager(4, BS)
    s = make_seq(list(range(4)))
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.token_ids.append(4)
    assert bm.can_append(s)
    bm.append_slots(s)
    assert len(s.block_table) == 2
    s.token_ids.extend([5, 6, 7])
    bm.append_slots(s)  # still fits in block 2
    assert len(s.block_table) == 2


def test_random_workload_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(32, BS)
    live: list[Sequence] = []
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    for i in range(500):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
        s = make_seq(toks, i)
        if bm.allocate(s):
            computed(bm, s)
            live.append(s)
        bm.check_consistency()
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == 32
    assert all(r == 0 for r in bm.ref_counts)
    bm.check_consistency()
    assert bm.cache_hit_blocks > 0


def test_double_free_is_caught():
    bm = BlockManager(4, BS)
    s = make_seq([1, 2, 3])
    bm.allocate(s)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(AssertionError):
        bm.free(s)
