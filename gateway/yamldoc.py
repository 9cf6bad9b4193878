"""YAML documents that remember where each value came from, so errors can name a line and column."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

try:  # the C loader is much faster when PyYAML was built with libyaml
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on the wheel
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]


@dataclass(frozen=True)
class Problem:
    """One problem found in a document: where, which path, and what."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def describe(self) -> str:
        """`file:line:col: path: message`, the form editors and CI logs link to."""
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class YamlDocumentError(Exception):
    """A document could not be read, parsed or validated; carries every problem found."""

    def __init__(self, problems: list[Problem], data: Any = None) -> None:
        super().__init__("; ".join(p.describe() for p in problems))
        self.problems = problems
        self.data = data
        """What the document held, when it could be parsed (to name the file's subject in reports)."""


def format_path(loc: Sequence[str | int]) -> str:
    """Dotted path with list indices in brackets: `schema.features.age.min`, `golden[3].id`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unconstructable(file: str, root: Any) -> list[Problem]:
    """Positioned problems for scalars PyYAML parses but cannot turn into values (e.g. 2026-02-30)."""
    constructor = yaml.constructor.SafeConstructor()
    problems: list[Problem] = []

    def walk(node: Any, loc: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, (*loc, str(key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*loc, i))
        elif isinstance(node, yaml.ScalarNode):
            try:
                constructor.construct_object(node, deep=True)
            except (ValueError, OverflowError, yaml.YAMLError) as exc:
                kind = "date" if node.tag == "tag:yaml.org,2002:timestamp" else "value"
                problems.append(Problem(file, node.start_mark.line + 1, node.start_mark.column + 1,
                                        format_path(loc), f"not a valid {kind} ({exc}) (got {node.value!r})"))

    walk(root, ())
    return problems


class YamlDocument:
    """A parsed YAML mapping plus its node tree for positions."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        try:
            self.root = yaml.compose(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            reason = getattr(exc, "problem", None) or str(exc)
            raise YamlDocumentError([Problem(file, line, column, "", f"invalid YAML: {reason}")]) from None
        self.duplicate_keys = self._duplicate_keys(self.root, ())
        """Keys given twice in one mapping (YAML keeps the last silently; we report them)."""
        try:
            self.data: Any = yaml.load(text, Loader=_Loader) if self.root is not None else None
        except (ValueError, OverflowError) as exc:  # a well-formed scalar no value fits, e.g. 2026-02-30
            problems = _unconstructable(file, self.root) or [Problem(file, 1, 1, "", f"invalid value: {exc}")]
            raise YamlDocumentError(problems) from None

    @classmethod
    def read(cls, path: Path) -> YamlDocument:
        """Read and parse a file; unreadable files become a positioned problem."""
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise YamlDocumentError([Problem(str(path), 1, 1, "", f"cannot read file: {exc}")]) from None
        return cls(str(path), text)

    def problem(self, loc: Sequence[str | int], message: str) -> Problem:
        """A problem at the deepest node of `loc` that exists in the document."""
        line, column = self.position(loc)
        return Problem(self.file, line, column, format_path(loc), message)

    def position(self, loc: Sequence[str | int]) -> tuple[int, int]:
        """1-based line and column of the node at `loc` (or of its nearest existing ancestor)."""
        node = self.root
        if node is None:
            return 1, 1
        best = node.start_mark
        for part in loc:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if str(key.value) == str(part):
                        child = value if not isinstance(value, yaml.ScalarNode) or value.value else key
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                child = node.value[part]
            if child is None:
                break
            node = child
            best = node.start_mark
        return best.line + 1, best.column + 1

    def existing_prefix(self, loc: Sequence[str | int]) -> tuple[str | int, ...]:
        """The longest leading part of `loc` that names a node in the document."""
        node = self.root
        kept: list[str | int] = []
        for part in loc:
            child = None
            if isinstance(node, yaml.MappingNode):
                child = next((v for k, v in node.value if str(k.value) == str(part)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                child = node.value[part]
            if child is None:
                break
            kept.append(part)
            node = child
        return tuple(kept)

    def _duplicate_keys(self, node: Any, loc: tuple[str | int, ...]) -> list[Problem]:
        problems: list[Problem] = []
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                name = str(key.value)
                if name in seen:
                    problems.append(Problem(self.file, key.start_mark.line + 1, key.start_mark.column + 1,
                                            format_path((*loc, name)), "duplicate key"))
                seen.add(name)
                problems += self._duplicate_keys(value, (*loc, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                problems += self._duplicate_keys(item, (*loc, i))
        return problems


Model = TypeVar("Model", bound=BaseModel)


def read_validated(path: Path, model: type[Model], what: str,
                   prepare: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> tuple[Model, YamlDocument]:
    """Read a YAML mapping and validate it as `model`; YamlDocumentError lists every problem."""
    doc = YamlDocument.read(path)
    if not isinstance(doc.data, dict):
        raise YamlDocumentError([*doc.duplicate_keys, doc.problem((), f"{what} must be a YAML mapping")])
    try:
        value = model.model_validate(prepare(doc.data))
    except ValidationError as exc:
        raise YamlDocumentError([*doc.duplicate_keys, *pydantic_problems(doc, exc.errors())], doc.data) from None
    if doc.duplicate_keys:
        raise YamlDocumentError(doc.duplicate_keys, doc.data)
    return value, doc


def pydantic_problems(doc: YamlDocument, errors: list[Any]) -> list[Problem]:
    """Translate pydantic's `ValidationError.errors()` into positioned problems.

    A value that fits none of a union's members makes pydantic report once per member, with the
    member's name appended to the path (`default.float`, `default.int`, ...). Such paths are cut
    back to what exists in the document and merged into one problem.
    """
    merged: dict[tuple[str | int, ...], list[str]] = {}
    for err in errors:
        loc = tuple(part for part in err.get("loc", ()) if not (isinstance(part, str) and part.startswith("function-")))
        loc = doc.existing_prefix(loc) if err.get("type") not in ("missing", "extra_forbidden") else loc
        message = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            message = "unknown key (not in the schema)"
        elif "input" in err and err.get("type") != "missing" and not isinstance(err["input"], dict):
            message = f"{message} (got {err['input']!r})"
        messages = merged.setdefault(loc, [])
        if message not in messages:
            messages.append(message)
    return [doc.problem(loc, messages[0] if len(messages) == 1 else "fits none of the allowed forms: "
                        + "; ".join(messages)) for loc, messages in merged.items()]
