"""The reply-token map: exact spellings only, bounded LRU, off at size 0."""

from __future__ import annotations

import threading

from chatglm_serve.engine.reply_tokens import ReplyTokenMap


def test_records_only_ids_that_spell_the_text_exactly(tokenizer):
    m = ReplyTokenMap(8, tokenizer.decode)
    ids = tokenizer.encode_continuation("Hello, world!")
    assert m.record("Hello, world!", ids)
    assert m.lookup("Hello, world!") == ids
    assert not m.record("Hello, there!", ids)  # a text these ids do not spell
    assert m.lookup("Hello, there!") is None
    assert not m.record("", [])  # nothing to reuse
    assert len(m) == 1


def test_trailing_ids_the_client_never_got_are_dropped(tokenizer):
    m = ReplyTokenMap(8, tokenizer.decode)
    ids = tokenizer.encode_continuation("one two three")
    extra = tokenizer.encode_continuation(" four five")
    # e.g. a stop string " four" cut from the text: the ids went on past it
    assert m.record("one two three", ids + extra)
    assert m.lookup("one two three") == ids
    # more than a few ids past the text: not guessed at
    many = tokenizer.encode_continuation(" and a long tail of words the client never saw" * 3)
    assert not m.record("one two", ids + many)


def test_a_reply_with_surrounding_whitespace_is_also_found_stripped(tokenizer):
    m = ReplyTokenMap(8, tokenizer.decode)
    text = "\nHello there.\n\n"
    ids = tokenizer.encode_continuation(text)
    assert tokenizer.decode(ids) == text
    assert m.record(text, ids)
    assert m.lookup(text) == ids
    inner = m.lookup("Hello there.")
    assert inner is not None and tokenizer.decode(inner) == "Hello there."
    assert inner == ids[1:-2]  # the newline byte pieces cut off


def test_bounded_least_recently_used_first(tokenizer):
    m = ReplyTokenMap(3, tokenizer.decode)
    texts = [f"reply number {i}" for i in range(5)]
    for t in texts[:3]:
        m.record(t, tokenizer.encode_continuation(t))
    assert m.lookup(texts[0]) is not None  # used: now the most recent
    m.record(texts[3], tokenizer.encode_continuation(texts[3]))
    assert len(m) == 3
    assert m.lookup(texts[1]) is None  # the least recently used went
    assert all(m.lookup(t) is not None for t in (texts[0], texts[2], texts[3]))
    # the same text again replaces its ids (the latest generation wins)
    chars = [i for c in texts[0] for i in tokenizer.encode_continuation(c)]
    assert m.record(texts[0], chars)
    assert m.lookup(texts[0]) == chars and len(m) == 3
    m.clear()
    assert len(m) == 0


def test_size_zero_records_nothing(tokenizer):
    m = ReplyTokenMap(0, tokenizer.decode)
    ids = tokenizer.encode_continuation("Hello")
    assert not m.record("Hello", ids)
    assert m.lookup("Hello") is None and len(m) == 0


def test_concurrent_record_and_lookup_stay_bounded(tokenizer):
    m = ReplyTokenMap(16, tokenizer.decode)
    ids = {f"text {i}": tokenizer.encode_continuation(f"text {i}") for i in range(64)}
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for t, i in ids.items():
                m.record(t, i)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(5):
                for t, i in ids.items():
                    got = m.lookup(t)
                    assert got is None or got == i
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (writer, writer, reader, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(m) == 16
