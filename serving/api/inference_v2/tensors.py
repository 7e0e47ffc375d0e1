"""Tensors of the Open Inference Protocol, for both bindings: raw bytes (gRPC's
raw_input_contents, HTTP's binary tensor extension) and value lists (gRPC's typed
contents, JSON's `data`) into numpy arrays of their declared shape, and arrays back into
raw bytes.

Raw contents are little-endian and row-major; a BYTES tensor's elements are each a 4-byte
little-endian length followed by that many bytes. Every mismatch (shape against data size,
an unknown datatype, a truncated element) is an INVALID_ARGUMENT naming the input, found
before anything is allocated by the declared shape.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from serving.engine.errors import InvalidArgument

NUMERIC = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
           "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP32": "<f4",
           "FP64": "<f8"}
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
DATATYPES = frozenset(CONTENTS)
MAX_ELEMENTS = 1 << 26


def elements(shape: Sequence[int], field: str) -> int:
    """The element count of `shape`, refused past MAX_ELEMENTS as soon as the running
    product passes it."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(field, f"shape {list(shape)} has a negative dimension")
    count = 1
    for d in shape:
        count *= d
        if count > MAX_ELEMENTS:
            raise InvalidArgument(field, f"shape {list(shape)} has more than {MAX_ELEMENTS} "
                                  "elements")
    return count


def decode_bytes(raw: bytes, count: int, field: str) -> list[bytes]:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidArgument(field, "BYTES contents end inside an element's length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(field, "BYTES contents end inside an element")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidArgument(field, f"BYTES contents hold more than the shape's {count} "
                              "elements")
    return items


def encode_bytes(items) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _known(datatype: str, field: str) -> None:
    if datatype not in DATATYPES:
        raise InvalidArgument(f"{field}.datatype", f"unknown datatype {datatype!r}")


def read_raw(datatype: str, shape: Sequence[int], raw: bytes, field: str) -> np.ndarray:
    """Raw contents as an array of `shape` (BYTES: an object array of bytes)."""
    _known(datatype, field)
    count = elements(shape, f"{field}.shape")
    if datatype == "BYTES":
        # each element takes at least its 4-byte length: checked before allocating
        # anything by the declared shape
        if count * 4 > len(raw):
            raise InvalidArgument(field, f"raw contents are {len(raw)} bytes; shape "
                                  f"{list(shape)} of BYTES needs at least "
                                  f"{count * 4} (4 a length prefix)")
        values = np.empty(count, object)
        values[:] = decode_bytes(raw, count, field)
    else:
        itemsize = np.dtype(NUMERIC[datatype]).itemsize
        if len(raw) != count * itemsize:
            raise InvalidArgument(field, f"raw contents are {len(raw)} bytes; shape "
                                  f"{list(shape)} of {datatype} needs {count * itemsize}")
        values = np.frombuffer(raw, NUMERIC[datatype])
    return values.reshape(tuple(shape))


def read_values(datatype: str, shape: Sequence[int], values: Sequence, field: str,
                part: str = "contents") -> np.ndarray:
    """A flat list of values (of the datatype's Python type, checked by the caller) as an
    array of `shape`; errors name the tensor's `field` and, for a count that does not fit
    the shape, the list (`part`: gRPC's `contents`, JSON's `data`)."""
    _known(datatype, field)
    count = elements(shape, f"{field}.shape")
    if len(values) != count:
        raise InvalidArgument(f"{field}.{part}", f"{len(values)} values for shape "
                              f"{list(shape)}")
    if datatype == "BYTES":
        array = np.empty(count, object)
        array[:] = list(values)
    else:
        try:
            array = np.array(list(values), NUMERIC[datatype])
        except OverflowError:
            raise InvalidArgument(f"{field}.{part}", f"a value is out of the range of "
                                  f"{datatype}") from None
    return array.reshape(tuple(shape))


def read_input(tensor, raw: bytes | None, field: str) -> np.ndarray:
    """A gRPC input tensor (name, datatype, shape, typed contents) as an array of its shape:
    from `raw` (its raw_input_contents entry) when given, else from its typed contents."""
    if raw is not None:
        return read_raw(tensor.datatype, tensor.shape, raw, field)
    _known(tensor.datatype, field)
    contents = getattr(tensor.contents, CONTENTS[tensor.datatype])
    return read_values(tensor.datatype, tensor.shape, contents, field)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """An output array as raw contents."""
    if datatype == "BYTES":
        return encode_bytes(array.reshape(-1).tolist())
    return np.ascontiguousarray(array, NUMERIC[datatype]).tobytes()
