"""Streaming text: incremental decoding and stop strings."""

from __future__ import annotations

from loradock.serve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher


def test_incremental_text_equals_full_decode(tokenizer):
    text = "Grüße — naïve café 東京 🚀🚀 x = [1, 2]\n\tdone"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prompt = tokenizer("prefix:").input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.push(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_string_split_over_deltas_is_held_back_then_cut():
    matcher = StopStringMatcher(("END",))
    assert matcher.feed("hello E").text == "hello "
    match = matcher.feed("NDing")
    assert match.stopped and match.text == ""


def test_false_alarm_is_released():
    matcher = StopStringMatcher(("END", "\n\n"))
    assert matcher.feed("a\n").text == "a"
    assert matcher.feed("b E").text == "\nb "
    assert matcher.feed("x").text == "Ex"
    assert matcher.feed("tail E").text == "tail "
    assert matcher.flush() == "E"


def test_earliest_stop_wins():
    match = StopStringMatcher(("zz", "b")).feed("abczz")
    assert match.stopped and match.text == "a"
