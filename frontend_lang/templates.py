"""Prompt templates: what the DSL accepts as a prompt, and the `{{name}}` form it emits.

Two ways of writing a prompt reach the same wire format (`scheduler.spec`):
- f-string style: `f"Summarise: {chunk}"` where `chunk` is a `SemanticVariable`;
  interpolating a variable writes its placeholder `{{chunk_name}}`;
- explicit: `"Summarise: {{chunk}}"`, naming a variable of the program.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scheduler.spec import VARIABLE_REF, referenced_variables

from .errors import ProgramDefinitionError
from .variables import JoinedVariables, SemanticVariable, placeholder

__all__ = ["placeholder", "referenced_variables", "render", "to_template"]


def to_template(prompt: Any, *, what: str = "prompt") -> str:
    """A prompt as a template string. Variables and joins render as placeholders; anything
    else must already be a string (numbers and such are a likely mistake, so refuse)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, SemanticVariable | JoinedVariables):
        return str(prompt)
    if isinstance(prompt, list | tuple):
        return "".join(to_template(part, what=what) for part in prompt)
    raise ProgramDefinitionError(
        f"{what} must be a string, a variable or a list of them, not {type(prompt).__name__}"
    )


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill every placeholder in one pass (values are never re-scanned for placeholders)."""
    return VARIABLE_REF.sub(lambda m: values[m.group(1)], template)
