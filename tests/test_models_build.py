"""The example model repository is reproducible from its seed and consistent with its cards."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.card import load_card
from tests.conftest import MODEL, MODELS

#: files people write next to the generated ones (sign-offs are decisions, not build output)
HAND_WRITTEN = ("signoffs.yaml",)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in HAND_WRITTEN}


@pytest.mark.slow
def test_build_script_regenerates_the_committed_repository(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(MODELS / "build_credit_risk.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    built = _digests(tmp_path / MODEL)
    committed = _digests(MODELS / MODEL)
    assert built.keys() == committed.keys()
    changed = [name for name in built if built[name] != committed[name]]
    assert not changed, f"rebuilt files differ from the committed ones: {changed} (run `make models`?)"


@pytest.mark.parametrize("version", ["1", "2"])
def test_card_describes_its_file(version: str) -> None:
    card = load_card(MODELS / MODEL / version / "model.yaml")
    onnx_bytes = (MODELS / MODEL / version / "model.onnx").read_bytes()
    assert card.sha256 == hashlib.sha256(onnx_bytes).hexdigest()
    assert card.name == MODEL and card.version == version
    assert card.reference_profile is not None and card.reference_profile.prediction is not None
    assert len(card.golden) >= 10
    heldout = card.metrics["heldout"]
    assert heldout["split"] == "time" and 0.6 < heldout["auc"] < 1.0
    for name, profile in card.reference_profile.features.items():
        total = sum(profile.frequencies.values()) if profile.kind == "categorical" else sum(profile.frequencies)
        assert total == pytest.approx(1.0, abs=1e-4), name
    # the protected attribute is recorded for fairness checks but is never a model input
    assert "gender" in card.training_data.protected_attributes
    assert "gender" not in {t.name for t in card.signature.inputs}


def test_training_data_hash_matches_the_data_set() -> None:
    import csv
    import io

    card = load_card(MODELS / MODEL / "1" / "model.yaml")
    text = (MODELS / MODEL / "data" / "applications.csv").read_text()
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    split = header.index("split")
    train = [header] + [r for r in body if r[split] == "train"]
    assert len(train) - 1 == card.training_data.rows
    assert {"application_date", "gender", "default", "customer_id"} <= set(header)
