"""The reading both validation and tokenization share: lines out of 1 MiB blocks, and format detection."""

from __future__ import annotations

import io
import random

import pytest

from tuneforge.data import formats
from tuneforge.data.formats import detect_format, iter_lines, matching_formats


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64])
def test_iter_lines_matches_split_for_any_block_size(block: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(formats, "BLOCK_BYTES", block)
    rng = random.Random(block)
    for _ in range(50):
        data = bytes(rng.choice(b"ab\n") for _ in range(rng.randint(0, 40)))
        want = data.split(b"\n")
        if want and want[-1] == b"":
            want.pop()
        got = [None if x is None else bytes(x) for x in iter_lines(io.BytesIO(data).read, 5)]
        assert got == [x if len(x) <= 5 else None for x in want]


def test_detect_format_takes_the_first_format_whose_keys_a_record_has():
    assert detect_format({"text": "a"}) == "general"
    assert detect_format({"prompt": "p", "completion": "c", "extra": 1}) == "instruction"
    assert detect_format({"text": "a", "messages": []}) == "general"  # several match: the first, in FORMATS order
    assert matching_formats({"text": "a", "messages": []}) == ["general", "conversation"]
    assert detect_format({"prompt": "p"}) is None
    assert detect_format(["text"]) is None
