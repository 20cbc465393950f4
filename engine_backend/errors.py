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


class StreamInterruptedError(EngineOverloadedError):
    """The upstream cut a stream short to serve another request (llama-cpp-python's
    `interrupt_requests`) and the call could not be resumed there. The replica is up."""


class EngineUnavailableError(EngineError):
    """The engine cannot be reached or died mid-request (retryable on another replica).

    When the broken stream's chunks did not carry token counts, the engine may say what it
    had delivered: `delivered_tokens` output tokens (a resume asks only for the rest of
    `max_new_tokens`) for a prompt of `prompt_tokens`. `resumable` False: the call must
    not be resumed elsewhere (what it delivered cannot be counted or continued)."""

    status_code = 502

    def __init__(self, message: str = "", *, delivered_tokens: int = 0, prompt_tokens: int = 0,
                 resumable: bool = True) -> None:
        super().__init__(message)
        self.delivered_tokens = delivered_tokens
        self.prompt_tokens = prompt_tokens
        self.resumable = resumable


class UpstreamProtocolError(EngineError):
    """The upstream answered, but not in the protocol the engine speaks (a server of
    another kind, a route it lacks). Not a dead replica: nothing is retried (HTTP 502)."""

    status_code = 502


class EngineStreamEndedError(EngineUnavailableError):
    """An engine stream ended without a final chunk (the engine broke its contract, or
    the connection to it was cut between chunks)."""

    status_code = 502
