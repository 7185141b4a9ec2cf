"""ChatGLM2 tokenizer construction, chat prompt, decode, and the demo tokenizer.

Always run against test-made SentencePiece models (the demo BPE model and a unigram model
trained here). Set CHATGLM_TOKENIZER_MODEL to chatglm2-6b's tokenizer.model to also check the
exact ids of the real file.
"""

from __future__ import annotations

import io
import os

import pytest
import sentencepiece as spm

from chatglm_serve.model.demo_tokenizer import (
    CORPUS_PATH,
    DEFAULT_VOCAB_SIZE,
    demo_corpus_lines,
    train_demo_tokenizer,
    train_demo_tokenizer_bytes,
)
from chatglm_serve.model.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer, build_chat_prompt

REAL_TOKENIZER = os.environ.get("CHATGLM_TOKENIZER_MODEL")

TEXTS = [
    "你好",
    "Hello, world!",
    "  two leading spaces, two  inner spaces and a trailing one ",
    "line one\nline two\n\nline four\n",
    "\ttabs\tand\r\nwindows newlines",
    "emoji 😀👍🏽 and rare CJK 龘靐 and Ελληνικά and кириллица",
    "数字 1234567890 and 3.14159",
    "[gMASK] sop eop <s> </s> <unk> typed by a user are plain text",
    "",
    " ",
    "\n",
]


def _train(**options) -> bytes:
    """A SentencePiece model of the demo corpus, byte fallback and no normalisation, as ours."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_corpus_lines()),
        model_writer=buf,
        vocab_size=1500,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return buf.getvalue()


def _unigram_model() -> bytes:
    # A second, differently built test model: unigram instead of BPE, another size.
    return _train(
        model_type="unigram",
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        shuffle_input_sentence=False,
    )


@pytest.fixture(scope="module", params=["demo-bpe", "unigram"])
def tok(request) -> ChatGLMTokenizer:
    data = train_demo_tokenizer_bytes() if request.param == "demo-bpe" else _unigram_model()
    return ChatGLMTokenizer.from_bytes(data)


def _sp(tok: ChatGLMTokenizer) -> spm.SentencePieceProcessor:
    return tok._sp


# -- construction -------------------------------------------------------------------------


def test_special_ids_follow_the_sentencepiece_vocab(tok):
    n = _sp(tok).get_piece_size()
    assert tok.sp_vocab_size == n
    assert tok.vocab_size == len(tok) == n + 5
    assert tok.special_tokens == {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert (tok.mask_token_id, tok.gmask_token_id, tok.smask_token_id) == (n, n + 1, n + 2)
    assert (tok.sop_token_id, tok.eop_token_id) == (n + 3, n + 4)
    assert [tok.id_to_piece(i) for i in range(n, n + 5)] == list(SPECIAL_TOKENS)
    assert [tok.piece_to_id(name) for name in SPECIAL_TOKENS] == list(range(n, n + 5))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    with pytest.raises(IndexError):
        tok.id_to_piece(n + 5)


def test_encode_prefixes_gmask_sop_and_is_one_sentencepiece_call(tok):
    sp = _sp(tok)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[:2] == [tok.gmask_token_id, tok.sop_token_id]
        assert ids[2:] == sp.encode(text) == tok.encode(text, add_special_tokens=False)
        assert all(i < tok.sp_vocab_size for i in ids[2:])


def test_newline_is_the_byte_piece_13(tok):
    assert tok.id_to_piece(13) == "<0x0A>"
    ids = tok.encode("a\nb\n\nc", add_special_tokens=False)
    assert ids.count(13) == 3


def test_byte_fallback_spells_unknown_characters_in_bytes(tok):
    emoji = "😀"  # not in the corpus: must come out as its 4 UTF-8 bytes
    ids = tok.encode(emoji, add_special_tokens=False)
    byte_ids = [i for i in ids if _sp(tok).is_byte(i)]
    assert [tok.id_to_piece(i) for i in byte_ids] == [f"<0x{b:02X}>" for b in emoji.encode()]
    assert byte_ids == [3 + b for b in emoji.encode()]
    assert tok.decode(ids) == emoji


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_chat_prompt_matches_chatglm2():
    assert build_chat_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert build_chat_prompt("你好", []) == "[Round 1]\n\n问：你好\n\n答："
    history = [("hi", "Hello!"), ("1+1?", "2")]
    assert build_chat_prompt("thanks", history) == (
        "[Round 1]\n\n问：hi\n\n答：Hello!\n\n"
        "[Round 2]\n\n问：1+1?\n\n答：2\n\n"
        "[Round 3]\n\n问：thanks\n\n答："
    )


def test_encode_chat_encodes_the_whole_prompt_at_once(tok):
    history = [("你好", "你好！有什么可以帮你？"), ("Tell me a joke 😀", "No.")]
    prompt = tok.build_chat_prompt("再见", history)
    ids = tok.encode_chat("再见", history)
    assert ids == tok.prefix_token_ids + _sp(tok).encode(prompt)
    # One call: a single dummy-prefix piece at the very start, every newline a byte piece.
    assert tok.id_to_piece(ids[2]).startswith("▁")
    assert ids.count(13) == prompt.count("\n")
    # Encoding the rounds separately would give each its own dummy-prefix piece.
    past, last = prompt.split("[Round 3]")
    assert ids[2:] != _sp(tok).encode(past) + _sp(tok).encode("[Round 3]" + last)
    assert tok.decode(ids) == prompt


def test_decode_skips_specials_unless_asked(tok):
    body = tok.encode("Hello 你好", add_special_tokens=False)
    ids = [tok.gmask_token_id, tok.sop_token_id, *body, tok.eop_token_id, tok.eos_token_id]
    assert tok.decode(ids) == "Hello 你好"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 你好"
    shown = tok.decode(ids, skip_special_tokens=False)
    assert shown == "[gMASK]sop Hello 你好eop</s>"
    # pad, bos and ids past the vocab (padded output rows) carry no text when skipping.
    assert tok.decode([tok.pad_token_id, tok.bos_token_id, *body, tok.vocab_size + 7]) == (
        "Hello 你好"
    )
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_decode_segment_keeps_the_space_of_a_continuation(tok):
    ids = tok.encode("world", add_special_tokens=False)
    assert tok.id_to_piece(ids[0]).startswith("▁")
    assert tok.decode_segment(ids, at_start=True) == "world"
    assert tok.decode_segment(ids, at_start=False) == " world"
    assert tok.decode_segment([], at_start=False) == ""


def test_special_names_in_user_text_are_plain_text(tok):
    ids = tok.encode("[gMASK] eop", add_special_tokens=False)
    assert not any(tok.is_special(i) for i in ids)


# -- splicing generated reply ids into a chat prompt ---------------------------------------

REPLIES = [
    "你好！有什么可以帮你？",
    "Hello, world!",
    " a leading space and two  inner ones",
    "trailing spaces  ",
    "line one\nline two\n\n- a list item",
    "emoji 😀👍🏽 and rare 龘靐",
    "数字 1234567890",
    "[gMASK] eop typed as text",
    "x",
]


@pytest.mark.parametrize(
    "text", ["\n\n[Round 2]\n\n问：hi\n\n答：", *REPLIES, " ", "\n", "\n\nword"]
)
def test_encode_continuation_has_no_dummy_prefix(tok, text):
    ids = tok.encode_continuation(text)
    assert tok.decode_segment(ids, at_start=False) == text
    # what follows a newline (a byte piece) is tokenized as on its own, minus the dummy prefix
    for before in ("你好", "Hello, world!", "答：", "a "):
        joined = before + "\n" + text
        assert _sp(tok).encode(joined) == _sp(tok).encode(before) + tok.encode_continuation(
            "\n" + text
        )
    assert tok.encode_continuation("") == []


def _history(n: int) -> list[tuple[str, str]]:
    queries = ["你好", "Tell me a joke 😀", "再见", "1+1?", "next", "", "and?", "ok", "?"]
    return [(queries[i % len(queries)], REPLIES[i % len(REPLIES)]) for i in range(n)]


@pytest.mark.parametrize("rounds", [1, 2, len(REPLIES)])
def test_splicing_canonical_reply_ids_gives_the_plain_ids(tok, rounds):
    history = _history(rounds)
    plain = tok.encode_chat("最后一个问题", history)
    # the reply's own tokenization where it stands (after "答：", a piece boundary)
    canonical = {r: tok.encode_continuation(r) for _, r in history}
    assert tok.encode_chat("最后一个问题", history, reply_ids=canonical.get) == plain
    # only some replies known: the same
    some = {r: ids for i, (r, ids) in enumerate(canonical.items()) if i % 2}
    assert tok.encode_chat("最后一个问题", history, reply_ids=some.get) == plain
    assert tok.encode_chat("最后一个问题", history, reply_ids=lambda r: None) == plain


def test_generated_reply_ids_are_spliced_in_and_an_edited_reply_is_text(tok):
    history = _history(3)
    plain = tok.encode_chat("再来", history)
    # "generated" ids that spell the replies one character at a time: not their tokenization
    generated = {
        r: [i for c in r for i in tok.encode_continuation(c)] for _, r in history if r != "x"
    }
    spliced = tok.encode_chat("再来", history, reply_ids=generated.get)
    assert spliced != plain
    assert tok.decode(spliced) == tok.decode(plain) == tok.build_chat_prompt("再来", history)
    # the prompt is the text before each reply, the reply's ids, then the text after it
    head = tok.encode(f"[Round 1]\n\n问：{history[0][0]}\n\n答：")
    first = generated[history[0][1]]
    assert spliced[: len(head) + len(first)] == head + first
    for _, reply in history:
        ids = generated[reply]
        assert any(spliced[i : i + len(ids)] == ids for i in range(len(spliced))), reply
    tail = tok.encode_continuation("\n\n[Round 4]\n\n问：再来\n\n答：")
    assert spliced[-len(tail) :] == tail
    # the client edited the second reply: that one is encoded as text again
    edited = [history[0], (history[1][0], history[1][1] + " (edited)"), history[2]]
    spliced_edited = tok.encode_chat("再来", edited, reply_ids=generated.get)
    assert tok.decode(spliced_edited) == tok.build_chat_prompt("再来", edited)
    assert spliced_edited[: len(head) + len(first)] == head + first
    assert not any(
        spliced_edited[i : i + len(generated[history[1][1]])] == generated[history[1][1]]
        for i in range(len(spliced_edited))
    )
    # nothing known: plain ChatGLM2 ids
    assert tok.encode_chat("再来", edited, reply_ids={}.get) == tok.encode_chat("再来", edited)


def test_a_vocabulary_with_a_newline_piece_never_splices():
    tok = ChatGLMTokenizer.from_bytes(_train(model_type="bpe", user_defined_symbols=["\n"]))
    assert tok.encode_continuation("\n\nabc") is None
    history = [("q", "a reply")]
    assert tok.encode_chat("q2", history, reply_ids=lambda r: [5, 6]) == tok.encode_chat(
        "q2", history
    )


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        ChatGLMTokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        ChatGLMTokenizer(bad)


# -- the demo tokenizer -------------------------------------------------------------------


def test_demo_tokenizer_is_deterministic_and_loadable(tmp_path):
    a = train_demo_tokenizer(tmp_path / "a" / "tokenizer.model")
    b = train_demo_tokenizer(tmp_path / "b" / "tokenizer.model")
    assert a == tmp_path / "a" / "tokenizer.model"
    assert a.read_bytes() == b.read_bytes() == train_demo_tokenizer_bytes()
    assert [p.name for p in a.parent.iterdir()] == ["tokenizer.model"]  # no temp left over
    tok = ChatGLMTokenizer(a)
    assert tok.sp_vocab_size == DEFAULT_VOCAB_SIZE
    assert tok.source == str(a)


def test_demo_tokenizer_layout_matches_chatglm2():
    tok = ChatGLMTokenizer.from_bytes(train_demo_tokenizer_bytes())
    sp = _sp(tok)
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == -1
    assert [sp.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(sp.is_byte(i) for i in range(3, 259))
    # Digits are split one per piece.
    pieces = sp.encode("year 2024, 1234567", out_type=str)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("20241234567")
    # The template's own words are learned pieces, not bytes.
    for word in ("问", "答", "Round", "你好"):
        assert not any(sp.is_byte(i) for i in sp.encode(word))


def test_demo_tokenizer_refuses_impossible_sizes(tmp_path):
    with pytest.raises(ValueError, match="500"):
        train_demo_tokenizer(tmp_path / "t.model", vocab_size=500)
    assert not (tmp_path / "t.model").exists()


def test_demo_corpus_is_small_and_mixed():
    data = CORPUS_PATH.read_bytes()
    assert len(data) < 100_000
    lines = demo_corpus_lines()
    assert len(lines) >= 300
    assert any("你好" in line for line in lines) and any("Hello" in line for line in lines)


# -- the real chatglm2-6b file (only when given) ------------------------------------------

needs_real = pytest.mark.skipif(
    not REAL_TOKENIZER,
    reason="set CHATGLM_TOKENIZER_MODEL=/path/to/chatglm2-6b/tokenizer.model to check real ids",
)


@needs_real
def test_real_file_layout():
    tok = ChatGLMTokenizer(REAL_TOKENIZER)
    assert tok.sp_vocab_size == 64789
    assert tok.vocab_size == 64794
    assert tok.special_tokens == {
        "[MASK]": 64789,
        "[gMASK]": 64790,
        "[sMASK]": 64791,
        "sop": 64792,
        "eop": 64793,
    }
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.id_to_piece(13) == "<0x0A>"


@needs_real
def test_real_file_ids():
    tok = ChatGLMTokenizer(REAL_TOKENIZER)
    assert tok.encode("你好") == [64790, 64792, 36474, 54591]
    expected = [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701]
    expected += [13, 13, 55437, 31211]
    assert tok.encode("[Round 1]\n\n问：你好\n\n答：") == expected
    assert tok.encode_chat("你好") == expected
    for text in (
        "你好",
        "Hello, world!",
        "emoji 😀 and 龘",
        build_chat_prompt("你好", [("a", "b")]),
    ):
        assert tok.decode(tok.encode(text)) == text
    # the splice invariant on the real vocabulary
    history = [("你好", r) for r in ("你好👋！我是人工智能助手 ChatGLM2-6B。", "Hello!", "a\nb ")]
    canonical = {r: tok.encode_continuation(r) for _, r in history}
    assert tok.encode_chat("再见", history, reply_ids=canonical.get) == tok.encode_chat(
        "再见", history
    )
