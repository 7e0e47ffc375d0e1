"""The plain values of one inference request and its answer, as both bindings of the Open
Inference Protocol (service.py over gRPC, rest.py over HTTP/JSON) hand them to the
protocol core (core.py) and take them back: no protobuf and no JSON here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _never(index: int) -> bool:
    return False


@dataclass(frozen=True)
class InputTensor:
    """One input as a binding received it: `read(field)` gives its data as an array of
    `shape` (BYTES: an object array of bytes), and is called only once the name, datatype
    and shape have passed their checks; errors it raises name `field`."""

    name: str
    datatype: str
    shape: Sequence[int]
    read: Callable[[str], np.ndarray]


@dataclass
class InferRequest:
    """`parameters` hold plain values (bool, int, float, str; None for a value of no type
    the protocol knows); `outputs` the names asked for, in order (none: all);
    `json_output(i)`: whether the binding writes the i-th output answered as JSON text
    (else raw bytes), which the response's size is counted by."""

    model_name: str
    model_version: str = ""
    id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[InputTensor] = ()
    outputs: Sequence[str] = ()
    json_output: Callable[[int], bool] = _never


@dataclass
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass
class InferResult:
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, str]
    outputs: list[OutputTensor]
