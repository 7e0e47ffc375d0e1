"""Building ONNX graphs by hand: a builder of nodes and initializers with unique names, and
the run-time sizes a graph derives from its inputs. The export (graph.py, lm_head.py) and
the export benchmark build their graphs with it."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers; names are unique across the model and its bodies."""

    def __init__(self, counter: list[int] | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._counter = counter if counter is not None else [0]

    def fresh(self, prefix: str) -> str:
        self._counter[0] += 1
        return f"{prefix}_{self._counter[0]}"

    def child(self) -> GraphBuilder:
        return GraphBuilder(self._counter)

    def const(self, value, name: str | None = None, dtype=np.float32) -> str:
        array = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                           else value, dtype=dtype)
        name = name or self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs):
        names = ([self.fresh(op_type.lower()) for _ in range(outputs)]
                 if isinstance(outputs, int) else outputs)
        self.nodes.append(helper.make_node(op_type, inputs, names, **attrs))
        return names[0] if len(names) == 1 else names


class Dims:
    """Run-time sizes the graph derives once from its inputs: the batch ([1] and scalar),
    the number of steps (a scalar, the Loops' trip count), [T, B], the row numbers [B],
    and for picking each row's final state, its last step [B], the (step, row) index of it
    [B, 2] and whether it has any step [B, 1]."""

    def __init__(self, g: GraphBuilder, tokens_tm: str, lengths: str):
        one = g.const([1], dtype=np.int64)
        self.lengths = lengths
        self.time_batch = g.op("Shape", [tokens_tm])
        self.steps = g.op("Gather", [self.time_batch, g.const(0, dtype=np.int64)], axis=0)
        self.batch_size = g.op("Gather", [self.time_batch, g.const(1, dtype=np.int64)],
                               axis=0)  # scalar
        self.batch = g.op("Unsqueeze", [self.batch_size, g.const([0], dtype=np.int64)])
        self.rows = g.op("Range", [g.const(0, dtype=np.int64), self.batch_size,
                                   g.const(1, dtype=np.int64)])
        self.last = g.op("Sub", [lengths, one])  # [B]
        self.last_step = g.op("Concat", [g.op("Unsqueeze", [self.last, one]),
                                         g.op("Unsqueeze", [self.rows, one])], axis=1)
        self.nonempty = g.op("Unsqueeze", [g.op("Greater", [lengths,
                                                            g.const(0, dtype=np.int64)]), one])
