"""The model's data files for the readiness checklist: CSV tables and golden examples.

Tables are read with the standard library (no pandas at run time) and kept as text columns; they
are typed per feature of the policy's schema only when they become request columns, so a value
the schema would refuse reaches validation exactly as a client would send it. Every file is
fingerprinted (sha256) so the report names the data it was judged on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.card import GoldenExample
from gateway.policy import FeatureSpec
from gateway.validation import Column


class DataError(Exception):
    """A data file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Table:
    """A CSV file as text columns of equal length."""

    path: Path
    sha256: str
    columns: dict[str, list[str]]
    rows: int

    def column(self, name: str) -> list[str]:
        """One column's text values; DataError naming the columns there are when it is absent."""
        if name not in self.columns:
            raise DataError(f"{self.path}: no column {name!r} (columns: {', '.join(self.columns)})")
        return self.columns[name]

    def take(self, indices: NDArray[np.intp]) -> Table:
        """A table of the given rows, in the given order."""
        picked = {name: [values[i] for i in indices] for name, values in self.columns.items()}
        return Table(self.path, self.sha256, picked, len(indices))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_table(path: Path) -> Table:
    """Read a CSV file with a header row; DataError on a missing file or a ragged line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: empty file (a header row is needed)")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}:1: duplicated columns {duplicated}")
    columns: dict[str, list[str]] = {name: [] for name in header}
    lists = list(columns.values())
    rows = 0
    for line in reader:
        if not line:
            continue
        if len(line) != len(header):
            raise DataError(f"{path}:{reader.line_num}: {len(line)} fields, the header has {len(header)}")
        for values, value in zip(lists, line, strict=True):
            values.append(value)
        rows += 1
    if rows == 0:
        raise DataError(f"{path}: no data rows")
    return Table(path, hashlib.sha256(data).hexdigest(), columns, rows)


def _typed(text: str, spec: FeatureSpec) -> Any:
    """A CSV cell as a client would send it in JSON for this feature (empty: null)."""
    if text == "":
        return None
    if spec.type in ("category", "string"):
        return text
    if spec.type == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "1.0", "true", "yes"):
            return True
        if lowered in ("0", "0.0", "false", "no"):
            return False
        return text  # validation reports it
    try:
        number = float(text)
    except ValueError:
        return text  # validation reports it
    if spec.type == "int" and math.isfinite(number) and number.is_integer():
        return int(number)
    return number


def request_columns(table: Table, features: dict[str, FeatureSpec]) -> dict[str, Column]:
    """The table's feature columns as request columns (extra columns such as labels are left out)."""
    columns: dict[str, Column] = {}
    for name, spec in features.items():
        if name in table.columns:
            columns[name] = Column(name, [_typed(v, spec) for v in table.columns[name]])
    return columns


def labels(table: Table, column: str) -> NDArray[np.int64]:
    """A 0/1 outcome column as integers; DataError naming the first other value."""
    values = table.column(column)
    out = np.empty(len(values), dtype=np.int64)
    for i, text in enumerate(values):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if number not in (0.0, 1.0):
            raise DataError(f"{table.path}:{i + 2}: label {column!r} must be 0 or 1, got {text!r}")
        out[i] = int(number)
    return out


@dataclass(frozen=True)
class GoldenLine:
    """One line of golden.jsonl: the version it belongs to and the example."""

    version: str
    example: GoldenExample


def read_golden(path: Path) -> list[GoldenLine]:
    """Read golden.jsonl (one JSON object per line: version, id, inputs, outputs[, expected])."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            version = str(item.pop("version"))
            lines.append(GoldenLine(version, GoldenExample(**item)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}:{number}: not a golden example ({exc})") from None
    return lines
