"""The versioned model repository on disk: discover, verify against the card, load and warm up.

Layout: `<root>/<model>/<version>/model.onnx` plus a card (`model.yaml` or `card.json`). Any other
directory under a model (such as `data/`) is not a version. A version that fails any check is kept
as a `failed` entry with the reason; it never stops the other versions from serving.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gateway.card import CardError, GoldenExample, ModelCard, Signature, find_card, load_card
from gateway.errors import InferenceFailed
from gateway.runtime import OnnxModel, RuntimeOptions, UnsupportedModel
from gateway.tensors import NUMPY_DTYPES

log = logging.getLogger("gateway.repository")

MODEL_FILE = "model.onnx"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
GOLDEN_RTOL = 1e-4
GOLDEN_ATOL = 1e-5

VersionState = Literal["ready", "failed"]


@dataclass
class ModelVersion:
    """One version of one model: either ready (with a session) or failed (with the reason)."""

    name: str
    version: str
    path: Path
    state: VersionState
    reason: str = ""
    card: ModelCard | None = None
    model: OnnxModel | None = None
    sha256: str = ""
    load_ms: float = 0.0
    golden_checked: int = 0
    loaded_at: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        """Whether this version can answer requests."""
        return self.state == "ready" and self.model is not None

    @property
    def signature(self) -> Signature | None:
        """The verified signature (from the session), if loaded."""
        return self.model.signature if self.model else None

    def status(self) -> dict[str, Any]:
        """JSON-ready description for status endpoints."""
        return {"version": self.version, "state": self.state, "reason": self.reason or None,
                "sha256": self.sha256 or None, "load_ms": round(self.load_ms, 1),
                "golden_checked": self.golden_checked,
                "run_ms": round(self.model.run_ms, 4) if self.model is not None and self.model.run_ms else None}


def version_key(version: str) -> tuple[int, int, str]:
    """Order versions numerically when they are numbers, else by name (numbers sort first)."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class ModelRepository:
    """Reads model versions from a directory tree."""

    def __init__(self, root: Path, options: RuntimeOptions) -> None:
        self.root = root
        self.options = options

    def discover(self) -> dict[str, list[str]]:
        """Model name -> its version directory names (those holding a model.onnx), in version order."""
        found: dict[str, list[str]] = {}
        if not self.root.is_dir():
            return found
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not NAME_PATTERN.match(model_dir.name):
                continue
            versions = [v.name for v in model_dir.iterdir()
                        if v.is_dir() and NAME_PATTERN.match(v.name) and (v / MODEL_FILE).exists()]
            if versions:
                found[model_dir.name] = sorted(versions, key=version_key)
        return found

    def load_all(self) -> dict[str, dict[str, ModelVersion]]:
        """Load every version of every model (failures are recorded, not raised)."""
        return {name: {v: self.load_version(name, v) for v in versions}
                for name, versions in self.discover().items()}

    def load_version(self, name: str, version: str) -> ModelVersion:
        """Verify one version against its card, load it and warm it up; never raises."""
        path = self.root / name / version
        started = time.perf_counter()
        try:
            entry = self._load(name, version, path)
        except _Refused as exc:
            entry = ModelVersion(name, version, path, "failed", reason=str(exc), card=exc.card, sha256=exc.sha256)
            log.error("model %s version %s refused: %s", name, version, exc)
        entry.load_ms = (time.perf_counter() - started) * 1000
        if entry.ready:
            log.info("model %s version %s ready (%.0f ms, %d golden examples reproduced)",
                     name, version, entry.load_ms, entry.golden_checked)
        return entry

    def _load(self, name: str, version: str, path: Path) -> ModelVersion:
        card_path = find_card(path)
        if card_path is None:
            raise _Refused("no model card (model.yaml or card.json) next to model.onnx")
        try:
            card = load_card(card_path)
        except CardError as exc:
            raise _Refused(f"invalid model card: {exc}") from None
        if card.name != name or card.version != version:
            raise _Refused(f"card names {card.name}/{card.version}, but the file lives at {name}/{version}")
        try:
            return self._verify(name, version, path, card)
        except _Refused as exc:
            exc.card = card  # a refused file's card still tells the model's signature (the fallback needs it)
            raise

    def _verify(self, name: str, version: str, path: Path, card: ModelCard) -> ModelVersion:
        try:
            model_bytes = (path / MODEL_FILE).read_bytes()
        except OSError as exc:
            raise _Refused(f"cannot read {MODEL_FILE}: {exc}") from None
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest != card.sha256:
            raise _Refused(f"sha256 of {MODEL_FILE} is {digest}, the card says {card.sha256}", digest)
        try:
            model = OnnxModel(model_bytes, self.options)
        except UnsupportedModel as exc:
            raise _Refused(f"unsupported model: {exc}", digest) from None
        except Exception as exc:  # onnxruntime raises its own types for corrupt files
            raise _Refused(f"onnxruntime cannot load {MODEL_FILE}: {exc}", digest) from None
        mismatch = _signature_mismatch(card.signature, model.signature)
        if mismatch:
            raise _Refused(f"signature differs from the card: {mismatch}", digest)
        checked = _warm_up(model, card.golden)
        return ModelVersion(name, version, path, "ready", card=card, model=model, sha256=digest,
                            golden_checked=checked)


class _Refused(Exception):
    def __init__(self, reason: str, sha256: str = "", card: ModelCard | None = None) -> None:
        super().__init__(reason)
        self.sha256 = sha256
        self.card = card


def _signature_mismatch(declared: Signature, actual: Signature) -> str:
    problems = []
    for kind in ("inputs", "outputs"):
        want = {t.name: t for t in getattr(declared, kind)}
        have = {t.name: t for t in getattr(actual, kind)}
        for missing in sorted(want.keys() - have.keys()):
            problems.append(f"{kind[:-1]} {missing!r} is in the card but not in the file")
        for extra in sorted(have.keys() - want.keys()):
            problems.append(f"{kind[:-1]} {extra!r} is in the file but not in the card")
        for tensor_name in sorted(want.keys() & have.keys()):
            w, h = want[tensor_name], have[tensor_name]
            if w.datatype != h.datatype or w.shape != h.shape:
                problems.append(f"{tensor_name!r} is {h.datatype}{h.shape} in the file, "
                                f"{w.datatype}{w.shape} in the card")
    return "; ".join(problems)


def _warm_up(model: OnnxModel, golden: list[GoldenExample]) -> int:
    """Run the session once (first runs allocate), and check the card's golden examples reproduce."""
    try:
        zero = _zero_feeds(model.signature)
        model.run(zero)
        model.measure(zero)  # decides whether `guard.execution: auto` runs it inline
        if not golden:
            return 0
        outputs = model.run(_golden_feeds(model.signature, golden))
    except InferenceFailed as exc:
        raise _Refused(f"warm-up run failed: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _Refused(f"golden example inputs do not fit the signature: {exc}") from None
    for i, example in enumerate(golden):
        for out_name, expected in example.outputs.items():
            if out_name not in outputs:
                raise _Refused(f"golden example {example.id!r} names unknown output {out_name!r}")
            got = outputs[out_name][i]
            if not _close(got, expected):
                raise _Refused(f"golden example {example.id!r}: output {out_name!r} is {got.tolist()!r}, "
                               f"the card expects {expected!r}")
    return len(golden)


def _close(got: np.ndarray, expected: Any) -> bool:
    want = np.asarray(expected)
    if got.dtype.kind in "OSU" or want.dtype.kind in "OSU":
        return bool(np.array_equal(got.astype(str), want.astype(str)))
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL))


def _zero_feeds(signature: Signature) -> dict[str, np.ndarray]:
    feeds = {}
    for tensor in signature.inputs:
        shape = [1 if d == -1 else d for d in tensor.shape]
        if tensor.datatype == "BYTES":
            feeds[tensor.name] = np.full(shape, "", dtype=object)
        else:
            feeds[tensor.name] = np.zeros(shape, dtype=NUMPY_DTYPES[tensor.datatype])
    return feeds


def _golden_feeds(signature: Signature, golden: list[GoldenExample]) -> dict[str, np.ndarray]:
    feeds = {}
    for tensor in signature.inputs:
        rows = [example.inputs[tensor.name] for example in golden]
        shape = [len(golden)] + [d if d != -1 else -1 for d in tensor.shape[1:]]
        if tensor.datatype == "BYTES":
            feeds[tensor.name] = np.array(rows, dtype=object).reshape(shape)
        else:
            values = [np.nan if v is None else v for v in rows]
            feeds[tensor.name] = np.array(values, dtype=NUMPY_DTYPES[tensor.datatype]).reshape(shape)
    return feeds
