"""The sim engine's tokenizer: deterministic, prefix-stable word pieces hashed into a vocab.

Pieces follow GPT-2's pre-tokenizer shape (a word with its leading space, up to 3 digits,
a punctuation run, whitespace), so a prompt that extends another tokenizes to an
extension of it (except when the shorter one ends in the middle of a piece, as with any
real tokenizer), and the radix cache hits on shared prefixes. A piece's id is a CRC-32 of
its bytes modulo the vocabulary: stable across processes (unlike `hash(str)`).
`"".join(pieces) == text` always holds, so offsets and decoding are exact.
"""

from __future__ import annotations

import re
import zlib

# Llama-3's vocabulary size and special ids; hashed pieces land below `FIRST_SPECIAL_ID`.
VOCAB_SIZE = 128_256
FIRST_SPECIAL_ID = 128_000
BOS_ID = 128_000
EOS_ID = 128_009  # <|eot_id|>

_PIECE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")
_SYLLABLES = (
    "ka lo mi ne ru sa to vi be da fe gi ho ju la me no pa qui re si tu va we xo ya ze "
    "an el in or us ar en is on ur"
).split()


def pseudo_word(token_id: int) -> str:
    """A deterministic readable word for an id that no text produced (bench input_ids)."""
    n = len(_SYLLABLES)
    parts = [_SYLLABLES[token_id % n]]
    token_id //= n
    while token_id:
        parts.append(_SYLLABLES[token_id % n])
        token_id //= n
    return " " + "".join(parts)


class SimTokenizer:
    """Text <-> token ids. One instance per engine (no module-level state)."""

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, max_cached_pieces: int = 1 << 20) -> None:
        self._ids: dict[str, int] = {}
        self._pieces: dict[int, str] = {}
        self._max_cached = max_cached_pieces

    def piece_id(self, piece: str) -> int:
        token_id = self._ids.get(piece)
        if token_id is None:
            if len(self._ids) >= self._max_cached:
                self._ids.clear()  # bounded memory; ids are recomputed identically
            token_id = zlib.crc32(piece.encode("utf-8")) % FIRST_SPECIAL_ID
            self._ids[piece] = token_id
            self._pieces.setdefault(token_id, piece)
        return token_id

    @staticmethod
    def split(text: str) -> list[str]:
        return _PIECE.findall(text)

    def encode(self, text: str) -> list[int]:
        piece_id = self.piece_id
        return [piece_id(p) for p in _PIECE.findall(text)]

    def encode_pieces(self, text: str) -> tuple[list[int], list[str]]:
        pieces = _PIECE.findall(text)
        piece_id = self.piece_id
        return [piece_id(p) for p in pieces], pieces

    def piece(self, token_id: int) -> str:
        """The text of one token (specials decode to the empty string)."""
        piece = self._pieces.get(token_id)
        if piece is not None:
            return piece
        if token_id >= FIRST_SPECIAL_ID:
            return ""
        return pseudo_word(token_id)

    def decode(self, token_ids: list[int]) -> str:
        piece = self.piece
        return "".join([piece(t) for t in token_ids])
