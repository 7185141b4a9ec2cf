"""Stop-string streaming: held back while ambiguous, cut before the stop, never emitted."""

from __future__ import annotations

import random

from chatglm_serve.engine.stop import find_stop, partial_stop_len, split_stream


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """Feed pieces as the engine does; returns the emitted chunks and whether it stopped."""
    emitted, held = [], ""
    for i, piece in enumerate(pieces):
        emit, held, stopped = split_stream(held + piece, stops, final=i == len(pieces) - 1)
        emitted.append(emit)
        if stopped:
            return emitted, True
    return emitted, False


def test_find_and_partial():
    assert find_stop("abc STOP def", ["STOP", "c S"]) == 2
    assert find_stop("abc", ["x"]) == -1
    assert partial_stop_len("hello ST", ["STOP"]) == 2
    assert partial_stop_len("hello", ["STOP"]) == 0
    assert partial_stop_len("aaa", ["aab"]) == 2


def test_stop_split_across_pieces_is_cut_cleanly():
    emitted, stopped = stream(["Hello wor", "ld, ST", "O", "P and more"], ["STOP"])
    assert stopped
    assert "".join(emitted) == "Hello world, "
    assert all("S" not in e for e in emitted[1:])  # the partial stop was held, not sent


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop():
    emitted, stopped = stream(["abc S", "TAR", "T"], ["STOP"])
    assert not stopped and "".join(emitted) == "abc START"
    assert emitted[0] == "abc "


def test_final_piece_releases_everything():
    emitted, stopped = stream(["x ST"], ["STOP"])
    assert not stopped and emitted == ["x ST"]


def test_random_splits_never_leak_a_stop():
    rng = random.Random(0)
    stops = ["</s>", "\n\n", "答："]
    for _ in range(300):
        text = "".join(
            rng.choice(["a", "b", "<", "/", "s", ">", "\n", "答", "：", " "]) for _ in range(40)
        )
        cuts = sorted(rng.sample(range(1, len(text)), 8))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, stopped = stream(pieces, stops)
        out = "".join(emitted)
        first = find_stop(text, stops)
        if first == -1:
            assert not stopped and out == text
        else:
            assert stopped and out == text[:first]
