"""Streaming text out of token ids: incremental detokenization and stop strings.

`IncrementalDetokenizer` decodes only a short window of recent tokens per step (vLLM's
prefix/read offsets), and holds back text while the last token ends inside a multi-byte
character. `StopStrings` cuts the text before the first stop string and holds back any
tail that might still become one, so a stop string never leaks into the stream.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    __slots__ = ("_tokenizer", "_ids", "_prefix_offset", "_read_offset")

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        """New text made complete by `ids` (possibly empty)."""
        self._ids.extend(ids)
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(window)
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(prefix_text):
            return ""  # an incomplete character, or nothing visible yet
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix_text) :]


class StopStrings:
    __slots__ = ("_stops", "_held")

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string matched or None)."""
        if not self._stops:
            return text, None
        text = self._held + text
        self._held = ""
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            return text[: first[0]], first[1]
        hold = self._longest_partial(text)
        if hold:
            self._held = text[-hold:]
            return text[:-hold], None
        return text, None

    def flush(self) -> str:
        """At the end of the stream: the held-back tail turned out not to be a stop."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, text: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
