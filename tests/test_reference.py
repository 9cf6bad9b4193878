"""Generated documentation stays in step with the code."""

from __future__ import annotations

from gateway.reference import refresh
from tests.conftest import ROOT


def test_readme_reference_tables_are_up_to_date() -> None:
    text = (ROOT / "README.md").read_text()
    assert "<!-- BEGIN policy-reference -->" in text and "<!-- BEGIN settings-reference -->" in text
    assert refresh(text) == text, "README reference tables are stale: run `make schema`"


def test_every_policy_and_settings_field_is_documented() -> None:
    from gateway.reference import POLICY_SECTIONS
    from gateway.settings import Settings

    undocumented = [f"{model.__name__}.{name}" for _, model in POLICY_SECTIONS
                    for name, info in model.model_fields.items() if not info.description]
    undocumented += [f"Settings.{name}" for name, info in Settings.model_fields.items() if not info.description]
    assert undocumented == []
