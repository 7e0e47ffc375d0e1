"""Tensors of the Open Inference Protocol: input tensors from a ModelInferRequest (typed
contents or raw bytes) into numpy, and numpy into raw output contents.

Raw contents are little-endian and row-major; a BYTES tensor's elements are each a 4-byte
little-endian length followed by that many bytes. Every mismatch (shape against data size,
an unknown datatype, a truncated element) is an INVALID_ARGUMENT naming the input.
"""

from __future__ import annotations

import struct

import numpy as np

from serving.engine.errors import InvalidArgument
from serving.proto_gen.inference import grpc_service_pb2 as v2

NUMERIC = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
           "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP32": "<f4",
           "FP64": "<f8"}
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
MAX_ELEMENTS = 1 << 26


def _elements(shape, field: str) -> int:
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


def read_input(tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None,
               field: str) -> np.ndarray:
    """The tensor as an array of its shape (BYTES: an object array of bytes)."""
    datatype = tensor.datatype
    if datatype not in CONTENTS:
        raise InvalidArgument(f"{field}.datatype", f"unknown datatype {datatype!r}")
    count = _elements(tensor.shape, f"{field}.shape")
    if raw is not None:
        if datatype == "BYTES":
            # each element takes at least its 4-byte length: checked before allocating
            # anything by the declared shape
            if count * 4 > len(raw):
                raise InvalidArgument(field, f"raw contents are {len(raw)} bytes; shape "
                                      f"{list(tensor.shape)} of BYTES needs at least "
                                      f"{count * 4} (4 a length prefix)")
            values = np.empty(count, object)
            values[:] = decode_bytes(raw, count, field)
        else:
            itemsize = np.dtype(NUMERIC[datatype]).itemsize
            if len(raw) != count * itemsize:
                raise InvalidArgument(field, f"raw contents are {len(raw)} bytes; shape "
                              f"{list(tensor.shape)} of {datatype} needs {count * itemsize}")
            values = np.frombuffer(raw, NUMERIC[datatype])
    else:
        contents = getattr(tensor.contents, CONTENTS[datatype])
        if len(contents) != count:
            raise InvalidArgument(f"{field}.contents", f"{len(contents)} values for shape "
                          f"{list(tensor.shape)}")
        if datatype == "BYTES":
            values = np.empty(count, object)
            values[:] = list(contents)
        else:
            values = np.array(list(contents), NUMERIC[datatype])
    return values.reshape(tuple(tensor.shape))


def output(name: str, array: np.ndarray, datatype: str,
           response: v2.ModelInferResponse) -> None:
    """Appends `array` to the response as raw contents."""
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if datatype == "BYTES":
        raw = encode_bytes(array.reshape(-1).tolist())
    else:
        raw = np.ascontiguousarray(array, NUMERIC[datatype]).tobytes()
    response.raw_output_contents.append(raw)
