"""The benchmark MLP is reproducible from its seed and passes the repository's load-time checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.card import load_card
from gateway.repository import ModelRepository
from gateway.runtime import RuntimeOptions
from tests.conftest import MODELS


def _build(out: Path) -> Path:
    subprocess.run([sys.executable, str(MODELS / "build_mlp.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out / "mlp" / "1"


def test_build_is_byte_for_byte_reproducible_and_loads(tmp_path: Path) -> None:
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    for name in ("model.onnx", "model.yaml"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    entry = ModelRepository(tmp_path / "a", RuntimeOptions()).load_version("mlp", "1")
    assert entry.ready, entry.reason  # sha256, signature and golden examples verified at load
    assert entry.golden_checked == 12
    card = load_card(first / "model.yaml")
    inputs = card.signature.inputs
    assert [t.name for t in inputs] == [f"f{i:02d}" for i in range(30)]
    assert all(t.datatype == "FP32" and t.shape == [-1, 1] for t in inputs)
    assert {t.name: (t.datatype, t.shape) for t in card.signature.outputs} == {
        "label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 2])}
    assert card.reference_profile is not None and len(card.reference_profile.features) == 30


def test_build_never_writes_into_the_served_repository() -> None:
    assert not (MODELS / "mlp").exists(), "the MLP must stay out of models/ (the test suite serves it)"
