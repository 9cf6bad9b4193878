"""Model cards: what a version claims to be (signature, file hash, data, metrics, reference profile).

A card lives next to its ONNX file as `model.yaml` (or `card.json`). The repository checks the
file against the card before a version may serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.tensors import NUMPY_DTYPES
from gateway.yamldoc import Problem, YamlDocumentError, read_validated

CARD_FILES = ("model.yaml", "card.json")


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Card):
    """A named tensor of the signature, in protocol terms."""

    name: str
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in NUMPY_DTYPES:
            raise ValueError(f"unknown datatype {value!r}; one of {sorted(NUMPY_DTYPES)}")
        return value


class Signature(_Card):
    """Inputs and outputs of the model."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ScoreSpec(_Card):
    """Which output element is the model's score (e.g. the positive-class probability)."""

    output: str
    index: int | None = None
    positive_label: int | str | None = None


class TrainingData(_Card):
    """Where the training data came from and its fingerprint."""

    description: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int | None = None
    date_range: list[str] | None = None
    protected_attributes: list[str] = []
    label: str | None = None


class NumericProfile(_Card):
    """Reference distribution of a numeric feature: inner quantile edges and bin shares."""

    kind: Literal["numeric"]
    bin_edges: list[float]
    frequencies: list[float]
    missing_rate: float = 0.0
    min: float | None = None
    max: float | None = None


class CategoricalProfile(_Card):
    """Reference distribution of a categorical feature."""

    kind: Literal["categorical"]
    frequencies: dict[str, float]
    missing_rate: float = 0.0


class PredictionProfile(_Card):
    """Reference distribution of the model's score."""

    output: str
    index: int | None = None
    bin_edges: list[float]
    frequencies: list[float]


class ReferenceProfile(_Card):
    """The training-time distributions that online drift is measured against."""

    rows: int
    features: dict[str, NumericProfile | CategoricalProfile]
    prediction: PredictionProfile | None = None


class GoldenExample(_Card):
    """An input row and the outputs this version must give for it."""

    id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    expected: dict[str, Any] | None = None
    """The true outcome when known (e.g. `{label: 1}`): the readiness checklist counts golden
    examples the stable version gets right and a candidate gets wrong."""


class ModelCard(_Card):
    """Everything a version declares about itself."""

    name: str
    version: str
    description: str = ""
    owner: str
    intended_use: str = ""
    """What the model is for, and who may rely on it (the readiness checklist requires it)."""
    limitations: list[str] = []
    """Known weaknesses and uses it is not fit for (the readiness checklist requires at least one)."""
    platform: str = "onnxruntime_onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.onnx")
    signature: Signature
    score: ScoreSpec | None = None
    training_data: TrainingData
    metrics: dict[str, dict[str, Any]] = {}
    reference_profile: ReferenceProfile | None = None
    golden: list[GoldenExample] = []


class CardError(Exception):
    """A card is missing, unreadable or invalid; carries positioned problems."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.describe() for p in problems))
        self.problems = problems


def find_card(version_dir: Path) -> Path | None:
    """The card file of a version directory, if any."""
    for name in CARD_FILES:
        if (version_dir / name).is_file():
            return version_dir / name
    return None


def load_card(path: Path) -> ModelCard:
    """Parse and validate a card file (YAML or JSON, JSON being a subset of YAML)."""
    try:
        card, _ = read_validated(path, ModelCard, "a model card", _stringify_version)
    except YamlDocumentError as exc:
        raise CardError(exc.problems) from None
    return card


def _stringify_version(data: dict[str, Any]) -> dict[str, Any]:
    # `version: 1` in YAML is an int; versions are names, so accept it as "1".
    if isinstance(data.get("version"), int):
        return {**data, "version": str(data["version"])}
    return data
