"""The engine's results as the protocol's values: output tensors per task (as (array,
datatype) by output name; tensors.py writes them to the wire), and the statistics as
Triton's JSON."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.engine.repository import LoadedModel
from serving.engine.results import Classified, Scored, SessionStep, Tagged
from serving.engine.stats import Duration, ModelStatistics


def _duration(d: Duration) -> dict:
    return {"count": d.count, "ns": d.ns}


def statistics_json(s: ModelStatistics) -> dict:
    """One engine ModelStatistics as Triton's JSON (no response cache: its hits and misses
    stay zero; perf_analyzer reads them)."""
    zero = {"count": 0, "ns": 0}
    return {
        "name": s.name, "version": str(s.version), "last_inference": s.last_inference,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success), "fail": _duration(s.fail),
            "queue": _duration(s.queue), "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
            "cache_hit": zero, "cache_miss": zero},
        "batch_stats": [{"batch_size": b.batch_size,
                         "compute_input": _duration(b.compute_input),
                         "compute_infer": _duration(b.compute_infer),
                         "compute_output": _duration(b.compute_output)}
                        for b in s.batch_stats],
        "memory_usage": []}


def session_outputs(model: LoadedModel, step: SessionStep, wanted: Sequence[str]) -> dict:
    if model.task == "lm":
        scored = step.scored or Scored([], [], [], 0, 0.0)
        return {**lm_outputs([scored]), **next_outputs(step, wanted)}
    if model.task == "tag":
        tagged = step.tagged or Tagged([], [], [], np.zeros((0, 0), np.float32))
        return tag_outputs([tagged])
    if step.classified is None:  # an empty first request: no distribution yet
        return {"LABEL": (np.array([[b""]], object), "BYTES"),
                "CLASS_PROBS": (np.zeros((1, len(model.labels)), np.float32), "FP32")}
    return class_outputs([step.classified])


def next_outputs(step: SessionStep, wanted: Sequence[str]) -> dict:
    """The NEXT_ outputs of those `wanted`, as a batch of one: the step's top-k next tokens
    (most likely first) and, if the step carries it, the whole next-token distribution."""
    outputs = {}
    if "NEXT_TOKEN_IDS" in wanted:
        outputs["NEXT_TOKEN_IDS"] = (np.array([[i for i, _, _ in step.next_tokens]],
                                              np.int64), "INT64")
    if "NEXT_TOKEN_LOGPROBS" in wanted:
        outputs["NEXT_TOKEN_LOGPROBS"] = (np.array([[lp for _, _, lp in step.next_tokens]],
                                                   np.float32), "FP32")
    if "NEXT_LOGPROBS" in wanted and step.next_logprobs is not None:
        outputs["NEXT_LOGPROBS"] = (step.next_logprobs.reshape(1, -1), "FP32")
    return outputs


def _padded(rows: list[list], fill, dtype) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    array = np.full((len(rows), width), fill, dtype)
    for i, row in enumerate(rows):
        array[i, : len(row)] = row
    return array


def lm_outputs(scores: list[Scored]) -> dict:
    rows = [s.logprobs for s in scores]
    logprobs = _padded(rows, 0.0, np.float32)
    counts = np.array([[len(r)] for r in rows], np.int64)
    totals = np.array([[float(np.sum(r, dtype=np.float64))] for r in rows], np.float32)
    return {"TOKEN_LOGPROBS": (logprobs, "FP32"), "TOKEN_COUNT": (counts, "INT64"),
            "TOTAL_LOGPROB": (totals, "FP32")}


def tag_outputs(results: list[Tagged]) -> dict:
    encoded = _padded([[t.encode() for t in r.tags] for r in results], b"", object)
    logprobs = _padded([r.logprobs for r in results], 0.0, np.float32)
    counts = np.array([[len(r.tags)] for r in results], np.int64)
    return {"TAGS": (encoded, "BYTES"), "TAG_LOGPROBS": (logprobs, "FP32"),
            "TOKEN_COUNT": (counts, "INT64")}


def class_outputs(results: list[Classified]) -> dict:
    probs = np.exp(np.stack([r.logprobs for r in results])).astype(np.float32)
    labels = np.array([[r.label.encode()] for r in results], object)
    return {"LABEL": (labels, "BYTES"), "CLASS_PROBS": (probs, "FP32")}
