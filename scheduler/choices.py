"""Select calls (a DSL `select`): the output must be one of a list of choices. Engines
that can constrain decoding get a regex of the choices; otherwise the generation is
mapped to the choice it meant."""

from __future__ import annotations

import re

# Characters a regex gives a meaning (`re.escape` also escapes spaces and more, which
# grammar engines such as xgrammar warn about).
_REGEX_SPECIAL = re.compile(r"[.^$*+?{}\[\]\\|()]")


def choices_regex(choices: list[str]) -> str:
    """A regex matching exactly one of `choices`."""
    return "(" + "|".join(_REGEX_SPECIAL.sub(r"\\\g<0>", c) for c in choices) + ")"


def pick_choice(text: str, choices: list[str]) -> str:
    """The choice an unconstrained generation meant: an exact or prefix match first, then
    the choice sharing the longest common prefix with the text."""
    stripped = text.strip()
    for choice in choices:
        if stripped == choice:
            return choice
    for choice in choices:
        if stripped.startswith(choice) or (stripped and choice.startswith(stripped)):
            return choice

    def common(choice: str) -> int:
        n = 0
        for a, b in zip(choice, stripped, strict=False):
            if a != b:
                break
            n += 1
        return n

    return max(choices, key=common)
