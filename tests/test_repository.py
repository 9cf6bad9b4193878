"""The model repository verifies every version against its card and refuses what does not match."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from gateway.repository import ModelRepository, version_key
from gateway.runtime import RuntimeOptions
from tests.conftest import MODEL


def _repo(models: Path, **options: int) -> ModelRepository:
    return ModelRepository(models, RuntimeOptions(**options))


def _edit_card(models: Path, which: str, **changes: object) -> None:
    path = models / MODEL / which / "model.yaml"
    card = yaml.safe_load(path.read_text())
    card.update(changes)
    path.write_text(yaml.safe_dump(card, sort_keys=False))


def test_discover_lists_versions_in_numeric_order_and_skips_data(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    (models / MODEL / "10").mkdir()
    (models / MODEL / "10" / "model.onnx").write_bytes(b"x")
    (models / MODEL / "data").mkdir(exist_ok=True)
    assert _repo(models).discover() == {MODEL: ["1", "2", "10"]}
    assert sorted(["10", "9", "b", "a"], key=version_key) == ["9", "10", "a", "b"]


def test_bundled_versions_load_verify_and_reproduce_their_golden_examples(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    loaded = _repo(models).load_all()[MODEL]
    for version in ("1", "2"):
        entry = loaded[version]
        assert entry.ready, entry.reason
        assert entry.golden_checked >= 10
        assert entry.sha256 == hashlib.sha256((models / MODEL / version / "model.onnx").read_bytes()).hexdigest()


def test_session_threads_come_from_the_options(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    entry = _repo(models, intra_op_threads=2, inter_op_threads=3).load_version(MODEL, "1")
    assert entry.model is not None
    options = entry.model.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 3)


def test_a_flipped_byte_is_refused_by_hash(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    path = models / MODEL / "2" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    loaded = _repo(models).load_all()[MODEL]
    assert loaded["1"].ready
    assert not loaded["2"].ready and "sha256" in loaded["2"].reason


def test_garbage_with_a_matching_hash_is_refused_by_onnxruntime(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    garbage = b"this is not an onnx file"
    (models / MODEL / "2" / "model.onnx").write_bytes(garbage)
    _edit_card(models, "2", sha256=hashlib.sha256(garbage).hexdigest())
    entry = _repo(models).load_version(MODEL, "2")
    assert not entry.ready and "onnxruntime cannot load" in entry.reason


def test_a_card_for_another_signature_is_refused(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    card = yaml.safe_load((models / MODEL / "1" / "model.yaml").read_text())
    card["signature"]["inputs"][0]["datatype"] = "FP64"
    card["signature"]["outputs"].append({"name": "extra", "datatype": "FP32", "shape": [-1]})
    _edit_card(models, "1", signature=card["signature"])
    entry = _repo(models).load_version(MODEL, "1")
    assert not entry.ready
    assert "signature differs" in entry.reason and "'age'" in entry.reason and "'extra'" in entry.reason


def test_golden_examples_that_do_not_reproduce_are_refused(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    card = yaml.safe_load((models / MODEL / "1" / "model.yaml").read_text())
    card["golden"][3]["outputs"]["probabilities"] = [0.5, 0.5]
    _edit_card(models, "1", golden=card["golden"])
    entry = _repo(models).load_version(MODEL, "1")
    assert not entry.ready and "golden example" in entry.reason and card["golden"][3]["id"] in entry.reason


@pytest.mark.parametrize(("change", "expected"), [
    ({"version": "7"}, "card names credit-risk/7"),
    ({"sha256": "not-a-hash"}, "sha256"),
    ({"owner": None}, "owner"),
])
def test_invalid_cards_are_refused_with_the_reason(repo_copy: tuple[Path, Path], change: dict[str, object],
                                                   expected: str) -> None:
    models, _ = repo_copy
    _edit_card(models, "1", **change)
    entry = _repo(models).load_version(MODEL, "1")
    assert not entry.ready and expected in entry.reason


def test_a_version_without_a_card_is_refused(repo_copy: tuple[Path, Path]) -> None:
    models, _ = repo_copy
    (models / MODEL / "2" / "model.yaml").unlink()
    entry = _repo(models).load_version(MODEL, "2")
    assert not entry.ready and "no model card" in entry.reason
