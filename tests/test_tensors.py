"""Protocol datatypes: the safe-cast table, flattening of nested data, and binary tensor data."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from gateway.tensors import (
    FLOAT_TYPES,
    INT_TYPES,
    NUMPY_DTYPES,
    BinaryDataError,
    decode_binary,
    encode_binary,
    flatten,
    is_safe_cast,
    to_json_data,
)

ALL_TYPES = sorted(NUMPY_DTYPES)


# --- is_safe_cast -----------------------------------------------------------------------------

@pytest.mark.parametrize(("declared", "target", "safe"), [
    # same type is always fine
    ("FP32", "FP32", True),
    ("BYTES", "BYTES", True),
    ("BOOL", "BOOL", True),
    # integers and booleans widen to floats
    ("INT64", "FP32", True),
    ("UINT8", "FP16", True),
    ("BOOL", "FP32", True),
    # floats to other floats and (value by value) to integers
    ("FP64", "FP32", True),
    ("FP16", "FP64", True),
    ("FP64", "INT32", True),
    # integers to other integers (range is checked per value)
    ("INT64", "INT8", True),
    ("UINT64", "INT64", True),
    ("BOOL", "INT64", True),
    # BOOL targets take integers only
    ("INT8", "BOOL", True),
    ("UINT64", "BOOL", True),
    ("FP32", "BOOL", False),
    ("FP64", "BOOL", False),
    # BYTES never becomes a number, a number never BYTES
    ("BYTES", "FP32", False),
    ("BYTES", "INT64", False),
    ("BYTES", "BOOL", False),
    ("FP32", "BYTES", False),
    ("INT64", "BYTES", False),
    ("BOOL", "BYTES", False),
])
def test_is_safe_cast_table(declared: str, target: str, safe: bool) -> None:
    assert is_safe_cast(declared, target) is safe


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_every_datatype_casts_to_itself(datatype: str) -> None:
    assert is_safe_cast(datatype, datatype)


@pytest.mark.parametrize("numeric", sorted(INT_TYPES | FLOAT_TYPES | {"BOOL"}))
def test_bytes_and_numbers_never_mix(numeric: str) -> None:
    assert not is_safe_cast("BYTES", numeric)
    assert not is_safe_cast(numeric, "BYTES")


# --- flatten ----------------------------------------------------------------------------------

def test_flatten_returns_flat_data_unchanged() -> None:
    data = [1, 2.5, "x", True, None]
    assert flatten(data) is data


@pytest.mark.parametrize(("nested", "flat"), [
    ([[1, 2], [3, 4]], [1, 2, 3, 4]),
    ([[[1], [2]], [[3], [4]]], [1, 2, 3, 4]),
    ([1, [2, 3], 4], [1, 2, 3, 4]),
    ([[1, [2, [3, [4]]]]], [1, 2, 3, 4]),
    ([["a", "b"], ["c", None]], ["a", "b", "c", None]),
    ([], []),
    ([[]], []),
    ([[], [1]], [1]),
])
def test_flatten_is_row_major(nested: list[Any], flat: list[Any]) -> None:
    assert flatten(nested) == flat


# --- binary tensor data -----------------------------------------------------------------------

def _sample(datatype: str) -> np.ndarray:
    """A 2x3 array of the datatype that includes its extreme values."""
    if datatype == "BYTES":
        return np.array([["", "a", "héllo wörld"], ["\u20ac", "x" * 300, "tab\there"]], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    dtype = NUMPY_DTYPES[datatype]
    if datatype in INT_TYPES:
        info = np.iinfo(dtype)
        return np.array([[info.min, 0, 1], [info.max, info.max - 1, 7]], dtype=dtype)
    finfo = np.finfo(dtype)
    return np.array([[finfo.min, -0.0, 1.5], [finfo.max, np.inf, np.nan]], dtype=dtype)


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_binary_round_trip(datatype: str) -> None:
    array = _sample(datatype)
    raw = encode_binary(array, datatype)
    decoded = decode_binary(raw, datatype, array.size)
    assert decoded.shape == (array.size,)
    assert decoded.dtype == NUMPY_DTYPES[datatype]
    np.testing.assert_array_equal(decoded, array.reshape(-1))


@pytest.mark.parametrize("datatype", [t for t in ALL_TYPES if t != "BYTES"])
def test_fixed_size_binary_uses_native_size(datatype: str) -> None:
    array = _sample(datatype)
    assert len(encode_binary(array, datatype)) == array.size * NUMPY_DTYPES[datatype].itemsize


def test_binary_is_little_endian_even_from_big_endian_arrays() -> None:
    assert encode_binary(np.array([1, 258], dtype=">i4"), "INT32") == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    assert encode_binary(np.array([1.0], dtype=np.float32), "FP32") == struct.pack("<f", 1.0)
    np.testing.assert_array_equal(decode_binary(b"\x02\x01\x00\x00", "INT32", 1), [258])


def test_binary_bytes_elements_are_length_prefixed() -> None:
    raw = encode_binary(np.array(["ab", "", "é"], dtype=object), "BYTES")
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"
    assert decode_binary(raw, "BYTES", 3).tolist() == ["ab", "", "é"]


def test_binary_bytes_accepts_bytes_elements() -> None:
    raw = encode_binary(np.array([b"raw", "text"], dtype=object), "BYTES")
    assert decode_binary(raw, "BYTES", 2).tolist() == ["raw", "text"]


def test_binary_bool_is_one_byte_per_element() -> None:
    assert encode_binary(np.array([True, False, True]), "BOOL") == b"\x01\x00\x01"
    assert decode_binary(b"\x00\x01", "BOOL", 2).tolist() == [False, True]


def test_decode_binary_accepts_a_memoryview_slice() -> None:
    raw = b"junk" + struct.pack("<2q", -5, 9) + b"tail"
    view = memoryview(raw)[4:20]
    assert decode_binary(view, "INT64", 2).tolist() == [-5, 9]


def test_empty_tensor_round_trips() -> None:
    for datatype in ("FP32", "BYTES"):
        empty = np.array([], dtype=NUMPY_DTYPES[datatype])
        assert decode_binary(encode_binary(empty, datatype), datatype, 0).size == 0


@pytest.mark.parametrize(("datatype", "raw", "count"), [
    ("FP32", b"\x00" * 7, 2),
    ("FP32", b"\x00" * 12, 2),
    ("INT64", b"\x00" * 8, 2),
    ("FP16", b"\x00" * 3, 1),
    ("BOOL", b"\x01\x00", 3),
    ("UINT8", b"", 1),
])
def test_fixed_size_binary_of_the_wrong_length_is_an_error(datatype: str, raw: bytes, count: int) -> None:
    with pytest.raises(BinaryDataError, match="bytes"):
        decode_binary(raw, datatype, count)


@pytest.mark.parametrize(("raw", "count", "message"), [
    (b"\x01\x00", 1, "length prefix is truncated"),
    (b"\x01\x00\x00\x00a\x03\x00", 2, "length prefix is truncated"),
    (b"\x05\x00\x00\x00abc", 1, "longer than the data left"),
    (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", 1, "holds 2 BYTES elements, shape says 1"),
    (b"\x01\x00\x00\x00a", 2, "holds 1 BYTES elements, shape says 2"),
    (b"", 1, "holds 0 BYTES elements, shape says 1"),
    (b"\x02\x00\x00\x00\xff\xfe", 1, "not valid UTF-8"),
])
def test_malformed_bytes_binary_is_an_error(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(BinaryDataError, match=message):
        decode_binary(raw, "BYTES", count)


def test_binary_data_error_is_a_value_error() -> None:
    assert issubclass(BinaryDataError, ValueError)


# --- JSON tensor data -------------------------------------------------------------------------

def test_to_json_data_flattens_and_stringifies() -> None:
    assert list(to_json_data(np.array([[1, 2], [3, 4]], dtype=np.int64))) == [1, 2, 3, 4]
    assert to_json_data(np.array([[b"a"], ["b"]], dtype=object)) == ["a", "b"]
    half = to_json_data(np.array([0.5, 1.5], dtype=np.float16))
    assert isinstance(half, np.ndarray) and half.dtype == np.float32
    np.testing.assert_array_equal(half, [0.5, 1.5])
