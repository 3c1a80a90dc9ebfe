"""Token ids to text as they stream: incremental decoding that never splits a character, and stop strings that are
cut before they show (a stream holds back the text that could still become a stop string)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class TextStream:
    """The text of one choice as its tokens arrive. `push` returns the new text that is safe to show; `stopped` is
    set once a stop string appeared (the text ends before it)."""

    decoder: Decoder
    stops: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0
    stopped: bool = False

    def push(self, token_id: int, *, special: bool = False) -> str:
        if self.stopped:
            return ""
        if not special:
            self.ids.append(token_id)
        full = self.decoder.decode(self.ids, skip_special_tokens=True)
        # A character split over tokens decodes as U+FFFD until its last byte arrives.
        settled = full[: len(full) - 1] if full.endswith("\ufffd") else full
        self.text = settled
        cut = self._first_stop(settled)
        if cut is not None:
            self.text = settled[:cut]
            self.stopped = True
            return self._advance(len(self.text))
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self._advance(max(self.shown, len(settled) - hold))

    def finish(self) -> str:
        """The rest of the text, once no token will follow."""
        if not self.stopped:
            full = self.decoder.decode(self.ids, skip_special_tokens=True)
            cut = self._first_stop(full)
            self.text = full if cut is None else full[:cut]
            self.stopped = self.stopped or cut is not None
        return self._advance(len(self.text))

    def _first_stop(self, text: str) -> int | None:
        found = [i for s in self.stops if s and (i := text.find(s)) >= 0]
        return min(found) if found else None

    def _advance(self, upto: int) -> str:
        upto = min(upto, len(self.text))
        if upto <= self.shown:
            return ""
        piece = self.text[self.shown : upto]
        self.shown = upto
        return piece
