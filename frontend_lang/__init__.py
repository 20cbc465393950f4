"""frontend_lang: a Python DSL for LLM programs over semantic variables.

    from frontend_lang import program, gen, select, tool, fork, join, let
    from frontend_lang import system, user, assistant, conversation
    from frontend_lang import LocalRuntime, RemoteRuntime

See `frontend_lang/program.py` for the programming model and README.md for a tour.
"""

from .errors import (
    CallFailedError,
    CycleError,
    DSLError,
    NoActiveProgramError,
    ProgramCancelledError,
    ProgramDefinitionError,
    ProgramNotFoundError,
    RuntimeUnavailableError,
    UnknownVariableError,
)
from .primitives import Branch, conversation, fork, gen, join, let, select, tool
from .program import Program, ProgramResult, program
from .roles import Message, assistant, system, tool_result, user
from .runtime import Runtime
from .variables import JoinedVariables, SemanticVariable

# The runtimes import the server stack (or httpx): loaded on first use, so that importing
# the DSL to define programs stays light.
_LAZY = {
    "LocalRuntime": "frontend_lang.runtime_local",
    "RemoteRuntime": "frontend_lang.runtime_remote",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'frontend_lang' has no attribute {name!r}")


__all__ = [
    "Branch",
    "CallFailedError",
    "CycleError",
    "DSLError",
    "JoinedVariables",
    "LocalRuntime",
    "Message",
    "NoActiveProgramError",
    "Program",
    "ProgramCancelledError",
    "ProgramDefinitionError",
    "ProgramNotFoundError",
    "ProgramResult",
    "RemoteRuntime",
    "Runtime",
    "RuntimeUnavailableError",
    "SemanticVariable",
    "UnknownVariableError",
    "assistant",
    "conversation",
    "fork",
    "gen",
    "join",
    "let",
    "program",
    "select",
    "system",
    "tool",
    "tool_result",
    "user",
]
