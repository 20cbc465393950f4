"""frontend_lang: a Python DSL for LLM programs over semantic variables.

    from frontend_lang import program, gen, select, tool, fork, join, let
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
from .primitives import Branch, fork, gen, join, let, select, tool
from .program import Program, ProgramResult, program
from .runtime import Runtime
from .variables import JoinedVariables, SemanticVariable

__all__ = [
    "Branch",
    "CallFailedError",
    "CycleError",
    "DSLError",
    "JoinedVariables",
    "NoActiveProgramError",
    "Program",
    "ProgramCancelledError",
    "ProgramDefinitionError",
    "ProgramNotFoundError",
    "ProgramResult",
    "Runtime",
    "RuntimeUnavailableError",
    "SemanticVariable",
    "UnknownVariableError",
    "fork",
    "gen",
    "join",
    "let",
    "program",
    "select",
    "tool",
]
