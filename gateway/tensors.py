"""Tensor data types of the protocol, their numpy and ONNX equivalents, and binary tensor data.

Binary tensor data follows Triton's binary data extension: fixed-size types are raw little-endian
row-major bytes; BYTES elements are each a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

#: protocol datatype -> numpy dtype (BYTES holds Python str objects)
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

#: onnxruntime type string -> protocol datatype
ONNX_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
INT_TYPES = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})
NUMERIC_TYPES = FLOAT_TYPES | INT_TYPES


def is_safe_cast(declared: str, target: str) -> bool:
    """Whether data declared as `declared` may be coerced to `target` without losing meaning.

    Integers and booleans widen to floats and to other integers (range is checked per value);
    floats narrow to integers only value by value (checked by the validator); BYTES never turns
    into a number and a number never into BYTES.
    """
    if declared == target:
        return True
    if target == "BYTES" or declared == "BYTES":
        return False
    if target == "BOOL":
        return declared in INT_TYPES
    return declared in NUMERIC_TYPES or declared == "BOOL"


def flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested JSON tensor data (flat data is returned as is)."""
    if not data or not isinstance(data[0], list):
        if any(isinstance(x, list) for x in data):
            return _flatten_slow(data)
        return data
    return _flatten_slow(data)


def _flatten_slow(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


class BinaryDataError(ValueError):
    """Binary tensor data does not match its declared size or type."""


def decode_binary(raw: bytes | memoryview, datatype: str, count: int) -> np.ndarray:
    """Decode binary tensor data of `count` elements into a flat numpy array."""
    if datatype == "BYTES":
        items: list[str] = []
        view = memoryview(raw)
        offset = 0
        while offset < len(view):
            if offset + 4 > len(view):
                raise BinaryDataError("BYTES element length prefix is truncated")
            (length,) = struct.unpack_from("<I", view, offset)
            offset += 4
            if offset + length > len(view):
                raise BinaryDataError("BYTES element is longer than the data left")
            try:
                items.append(bytes(view[offset:offset + length]).decode("utf-8"))
            except UnicodeDecodeError:
                raise BinaryDataError("BYTES element is not valid UTF-8") from None
            offset += length
        if len(items) != count:
            raise BinaryDataError(f"holds {len(items)} BYTES elements, shape says {count}")
        return np.array(items, dtype=object)
    dtype = NUMPY_DTYPES[datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise BinaryDataError(f"holds {len(raw)} bytes, shape and datatype need {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def encode_binary(array: np.ndarray, datatype: str) -> bytes:
    """Encode a tensor as binary data in row-major order."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            value = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(value)))
            parts.append(value)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype].newbyteorder("<")).tobytes()


def to_json_data(array: np.ndarray) -> np.ndarray | list[Any]:
    """Flat tensor data for `orjson` with OPT_SERIALIZE_NUMPY.

    Numeric arrays stay numpy (orjson writes float32 in its shortest float32 form and NaN as
    null, since JSON has no NaN); BYTES become a list of str.
    """
    flat = np.ascontiguousarray(array.reshape(-1))
    if flat.dtype.kind in "SO":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat.tolist()]
    if flat.dtype == np.float16:
        return flat.astype(np.float32)
    return flat
