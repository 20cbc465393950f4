"""Constrained decoding (regex, JSON schema) with xgrammar, when it is installed.

A grammar is compiled once per distinct pattern (xgrammar caches compilations) against the
model's vocabulary; each request gets its own matcher, which masks the logits before
sampling and advances with every sampled token.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from engine_backend.errors import InvalidRequestError, UnsupportedError


def xgrammar_available() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


class GrammarMask:
    """A request's grammar state (implements `sampling.TokenMask`)."""

    __slots__ = ("_matcher", "_bitmask", "_xgr")

    def __init__(self, xgr: Any, matcher: Any, vocab_size: int) -> None:
        self._xgr = xgr
        self._matcher = matcher
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.view(1, -1)
        self._xgr.apply_token_bitmask_inplace(row, self._bitmask.to(row.device))

    def accept(self, token: int) -> None:
        self._matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GrammarCompiler:
    """Compiles regexes and JSON schemas for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        if not xgrammar_available():
            raise UnsupportedError("constrained decoding needs xgrammar (pip install xgrammar)")
        import xgrammar as xgr

        self._xgr = xgr
        self._vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def mask(self, *, regex: str | None, json_schema: str | None) -> GrammarMask:
        """A fresh matcher; raises `InvalidRequestError` for a pattern that does not compile."""
        try:
            if json_schema is not None:
                # Compact JSON: small models otherwise wander off into whitespace.
                compiled = self._compiler.compile_json_schema(json_schema, any_whitespace=False)
            else:
                compiled = self._compiler.compile_regex(regex or "")
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subtypes
            kind = "json_schema" if json_schema is not None else "regex"
            raise InvalidRequestError(f"invalid {kind}: {exc}") from None
        return GrammarMask(self._xgr, self._xgr.GrammarMatcher(compiled), self._vocab_size)
