"""Streamed text: pieces are shown as soon as they are safe, a stop string never shows (not even its start), and a
character split over tokens is never shown half."""

from __future__ import annotations

from collections.abc import Sequence

from tuneforge.serve.text import TextStream


class Bytes:
    """A decoder whose tokens are single bytes (so a multi-byte character spans tokens)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _run(text: str, stops: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(Bytes(), stops)
    pieces = [stream.push(b) for b in text.encode()]
    pieces.append(stream.finish())
    return [p for p in pieces if p], stream


def test_pieces_join_to_the_text_and_never_split_a_character() -> None:
    pieces, stream = _run("héllo wörld ✓")
    assert "".join(pieces) == "héllo wörld ✓" == stream.text
    assert all("\ufffd" not in p for p in pieces)


def test_a_stop_string_ends_the_text_before_it_and_never_shows() -> None:
    pieces, stream = _run("Answer: 42\nUser: more", stops=("\nUser:",))
    assert "".join(pieces) == "Answer: 42" and stream.stopped
    assert not any("\n" in p for p in pieces)  # the stop's first character was held back, then dropped


def test_text_that_only_looks_like_a_stop_is_shown_once_it_cannot_be_one() -> None:
    pieces, stream = _run("a\nUb\nUser", stops=("\nUser",))
    assert "".join(pieces) == "a\nUb" and stream.stopped


def test_the_earliest_of_several_stops_wins() -> None:
    _, stream = _run("one two three", stops=("three", "two"))
    assert stream.text == "one "


def test_special_tokens_add_no_text() -> None:
    stream = TextStream(Bytes())
    assert stream.push(ord("a")) == "a"
    assert stream.push(0, special=True) == ""
    assert stream.finish() == "" and stream.text == "a"
