"""Typed engine errors. The server maps each to one HTTP status (see progserve.errors)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error an engine raises on purpose."""

    status_code = 500


class InvalidRequestError(EngineError, ValueError):
    """The request is malformed or out of range (a client error: HTTP 400)."""

    status_code = 400


class UnsupportedError(InvalidRequestError):
    """The request asks for something this engine cannot do (logprobs, regex, ...)."""


class UnknownRequestError(EngineError, KeyError):
    """`abort(rid)` named a request the engine does not know (HTTP 404)."""

    status_code = 404

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown request"


class EngineOverloadedError(EngineError):
    """The engine cannot take more work now (HTTP 429 / 503 upstream)."""

    status_code = 503


class EngineUnavailableError(EngineError):
    """The engine cannot be reached or died mid-request (retryable on another replica)."""

    status_code = 502


class EngineStreamEndedError(EngineUnavailableError):
    """An engine stream ended without a final chunk (the engine broke its contract, or
    the connection to it was cut between chunks)."""

    status_code = 502
