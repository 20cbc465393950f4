"""Request bodies validated as JSON types, not Python's lax coercions.

Pydantic's default (lax) mode turns `0` into `False`, `false` into `0` and `"5"` into `5`:
`abort_all: 0`, `top_logprobs: false` or `prompt: [[false]]` were accepted although the
OpenAPI schema says boolean, integer and integer. Bodies are therefore validated in strict
mode (a JSON boolean for a boolean, a JSON number for a number), with one allowance that
JSON itself makes: a number with a zero fraction (`1.0`) is an integer (JSON Schema says
so, and JSON has a single number type), so it is read as one.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def validate_body(model: type[M], data: dict[str, Any]) -> M:
    """`model` from a parsed JSON object, strictly (see the module docstring)."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        if not any(err["type"] == "int_type" and _integral_float(err.get("input"))
                   for err in exc.errors()):
            raise
    # Rare: an integer written as `1.0`. Read such numbers as integers and validate again.
    return model.model_validate(_integral_floats_as_ints(data), strict=True)


def _integral_float(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    if _integral_float(value) and abs(value) < 2**63:
        return int(value)
    return value
