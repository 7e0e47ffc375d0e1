"""The benchmark scripts, at tiny sizes and writing nothing: their figures come from long
runs on idle machines (make bench, make bench-gpu), but a broken script should fail here."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

BENCHMARKS = ["bench.train", "bench.export", "bench.serve", "bench.cache", "bench.gpu",
              "bench.quant", "bench.softmax", "bench.soak"]


@pytest.mark.parametrize("module", BENCHMARKS)
def test_each_benchmark_parses_its_flags(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main()
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bench_export_times_every_variant_and_checks_it_against_torch():
    from bench.export import bench_one

    result = bench_one("gru", 16, threads=1, rounds=1)
    for name in ("loop", "fused_op", "torch_eager"):
        assert set(result[name]) >= {"step_b1_ms", "step_b32_ms", "score_ms"}
        assert all(result[name][k] > 0 for k in ("step_b1_ms", "step_b32_ms", "score_ms"))
    assert result["loop_max_abs_diff_vs_torch"] <= 1e-4
    assert result["fused_op_max_abs_diff_vs_torch"] <= 1e-4


@pytest.mark.parametrize("nodes", [1, 11])
def test_bench_gpu_loop_reference_adds_once_per_node_and_step(nodes):
    from bench.gpu import _loop_of_adds

    model = _loop_of_adds(nodes, 3, 5)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    state = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    (out,) = session.run(None, {"x": np.zeros((7, 1), np.float32), "h0": state})
    np.testing.assert_allclose(out, state + 7 * nodes, rtol=1e-6)


def test_bench_cache_measures_what_the_prefix_cache_accounts_for():
    from bench.cache import cache_memory

    with_states = cache_memory(50, 20, (2, 6), 1000, True)
    bare = cache_memory(50, 20, (2, 6), 1000, False)
    assert with_states["entries"] == 50 and bare["entries"] == 0
    assert with_states["nodes"] == bare["nodes"] >= 50  # the same paths, so the same tree
    for result in (with_states, bare):
        assert 0.75 <= result["measured_bytes"] / result["accounted_bytes"] <= 1.25


def test_the_report_is_what_the_results_make():
    from bench.report import REPORT, render

    assert REPORT.read_text() == render(), "docs/benchmarks.md is stale: python -m bench.report"
