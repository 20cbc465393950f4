"""docs/configuration.md is `progserve config --reference`, so the documented defaults are true."""

from __future__ import annotations

from pathlib import Path

from progserve.commands.config import reference_markdown
from progserve.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_matches_the_settings_model() -> None:
    assert DOC.read_text() == reference_markdown(), (
        "regenerate it: progserve config --reference > docs/configuration.md"
    )


def test_every_nested_setting_has_a_row_with_its_env_var() -> None:
    text = reference_markdown()
    assert "`PROGSERVE_SCHEDULER__POLICY`" in text
    assert f"`{Settings().scheduler.policy!r}`".replace("'", '"') in text
