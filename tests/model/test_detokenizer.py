"""Streaming detokenization: the stream equals the one-shot decode, never a broken character."""

from __future__ import annotations

import random

import pytest

from chatglm_serve.model.demo_tokenizer import train_demo_tokenizer_bytes
from chatglm_serve.model.detokenizer import IncrementalDetokenizer
from chatglm_serve.model.tokenizer import ChatGLMTokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())


def _byte_ids(data: bytes) -> list[int]:
    return [3 + b for b in data]  # byte pieces <0x00>..<0xFF> are ids 3..258


def _stream(tok, ids, skip=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    chunks = [detok.push(i) for i in ids]
    return chunks, detok.flush(), detok


def _random_ids(rng: random.Random, tok: ChatGLMTokenizer) -> list[int]:
    """A mix of everything a model can emit, in any order."""
    space = tok.piece_to_id("▁")
    word_ids = [i for i in range(259, tok.sp_vocab_size) if tok.id_to_piece(i).startswith("▁")]
    specials = [0, 1, 2, *tok.special_tokens.values(), tok.vocab_size + 3]
    chars = "a你😀é€𝄞龘 \n"
    ids: list[int] = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.25:
            ids.append(rng.randrange(259, tok.sp_vocab_size))  # any learned piece
        elif kind < 0.35:
            ids.append(rng.choice(word_ids + [space]))  # pieces with a leading space
        elif kind < 0.6:
            ids += _byte_ids(rng.choice(chars).encode())  # a whole character in bytes
        elif kind < 0.7:
            ids += _byte_ids(rng.choice(chars).encode())[: rng.randint(1, 3)]  # truncated
        elif kind < 0.8:
            ids.append(3 + rng.randrange(256))  # any byte, often invalid
        elif kind < 0.9:
            ids.append(rng.choice(specials))
        else:
            ids += tok.encode(rng.choice(["Hello 你好", " two", "x\n\ny", "😀!"]), False)
    return ids


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_one_shot_decode_on_random_sequences(tok, skip):
    rng = random.Random(1234)
    for _ in range(400):
        ids = _random_ids(rng, tok)
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        emitted = ""
        for k, token_id in enumerate(ids, start=1):
            chunk = detok.push(token_id)
            emitted += chunk
            so_far = tok.decode(ids[:k], skip_special_tokens=skip)
            # Everything final is out; what is held back can only be an incomplete character,
            # which the one-shot decode of the prefix shows as U+FFFD.
            assert so_far.startswith(emitted), (ids[:k], emitted, so_far)
            assert set(so_far[len(emitted) :]) <= {FFFD}, (ids[:k], emitted, so_far)
            assert detok.text == emitted
        full = tok.decode(ids, skip_special_tokens=skip)
        emitted += detok.flush()
        assert emitted == full, ids
        assert detok.text == full
        assert detok.token_ids == ids


def test_no_chunk_breaks_a_character(tok):
    rng = random.Random(7)
    for _ in range(200):
        ids = _random_ids(rng, tok)
        chunks, tail, _ = _stream(tok, ids)
        full = tok.decode(ids)
        pos = 0
        for chunk in [*chunks, tail]:
            # A U+FFFD may only be emitted where the full decode has one (an invalid byte).
            assert chunk == full[pos : pos + len(chunk)]
            pos += len(chunk)


def test_emoji_and_cjk_from_bytes_come_out_whole(tok):
    ids = tok.encode("A😀B龘€", add_special_tokens=False)
    assert sum(tok._sp.is_byte(i) for i in ids) == 4 + 3 + 3
    chunks, tail, detok = _stream(tok, ids)
    assert [c for c in chunks if c] == ["A", "😀", "B", "龘", "€"]
    assert all(FFFD not in c for c in chunks) and tail == ""
    assert detok.text == "A😀B龘€"


def test_spaces_between_words_survive_streaming(tok):
    text = "Hello world,  two spaces and\na new line"
    ids = tok.encode(text, add_special_tokens=False)
    chunks, tail, _ = _stream(tok, ids)
    assert "".join(chunks) + tail == text
    # Decoding each id alone would lose every word's space.
    assert "".join(tok.decode([i]) for i in ids) != text


def test_leading_space_pieces_at_the_start(tok):
    space = tok.piece_to_id("▁")
    hello = tok.encode("hello", add_special_tokens=False)
    for ids in ([space, *hello], [space, space, *hello], [*hello, space]):
        chunks, tail, _ = _stream(tok, ids)
        assert "".join(chunks) + tail == tok.decode(ids)


def test_specials_skipped_or_shown(tok):
    body = tok.encode("你好 Hi", add_special_tokens=False)
    ids = [tok.gmask_token_id, tok.sop_token_id, *body, tok.eos_token_id]
    chunks, tail, _ = _stream(tok, ids, skip=True)
    assert chunks[:2] == ["", ""] and chunks[-1] == "" and "".join(chunks) + tail == "你好 Hi"
    chunks, tail, _ = _stream(tok, ids, skip=False)
    assert chunks[:2] == ["[gMASK]", "sop"] and chunks[-1] == "</s>"
    assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=False)


def test_a_special_ends_a_pending_byte_run(tok):
    # Without skipping, a special between bytes splits them: the held byte is final.
    ids = [*_byte_ids("😀".encode()[:2]), tok.eop_token_id, *_byte_ids("😀".encode())]
    chunks, tail, _ = _stream(tok, ids, skip=False)
    assert chunks[2] == FFFD * 2 + "eop"
    assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=False)
    # Skipped, the special vanishes and the bytes join as in the one-shot decode.
    chunks, tail, _ = _stream(tok, ids, skip=True)
    assert "".join(chunks) + tail == tok.decode(ids)


@pytest.mark.parametrize("junk", range(1, 20))
def test_long_invalid_run_then_a_character_in_bytes(tok, junk):
    # A long held window is cut early; the cut must not split the character still arriving.
    for char in ("😀", "龘", "é"):
        ids = _byte_ids(b"\x80" * junk + char.encode())
        chunks, tail, _ = _stream(tok, ids)
        assert "".join(chunks) + tail == FFFD * junk + char
        assert tail == "" and chunks[-1].endswith(char)


def test_flush_returns_an_incomplete_tail(tok):
    detok = IncrementalDetokenizer(tok)
    assert detok.extend(tok.encode("ok", add_special_tokens=False)) == "ok"
    assert detok.extend(_byte_ids("😀".encode()[:3])) == ""
    assert detok.flush() == FFFD * 3
    assert detok.text == tok.decode(detok.token_ids)
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.push(5)
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok).push(-1)


class _CountingTokenizer:
    """Records how many ids each decode sees: the per-step cost of the detokenizer."""

    def __init__(self, tok: ChatGLMTokenizer):
        self._tok = tok
        self.sizes: list[int] = []

    def decode_segment(self, ids, *, at_start):
        self.sizes.append(len(ids))
        return self._tok.decode_segment(ids, at_start=at_start)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize(
    "make_ids",
    [
        lambda tok: tok.encode("流式输出 streaming 😀 output.\n" * 200, add_special_tokens=False),
        lambda tok: _byte_ids(b"\x80" * 500),  # invalid bytes forever
        lambda tok: _byte_ids(b"\xe4\xbd" * 300),  # truncated characters forever
    ],
)
def test_work_per_token_is_bounded(tok, make_ids):
    ids = make_ids(tok)
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    streamed = detok.extend(ids) + detok.flush()
    assert streamed == tok.decode(ids)
    assert len(ids) > 300 and max(counting.sizes) <= 9
    assert len(counting.sizes) <= 3 * len(ids)
