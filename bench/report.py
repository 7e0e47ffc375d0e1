"""docs/benchmarks.md, generated from bench/results/*.json: `python -m bench.report` (every
benchmark also runs it after saving its results; tests/test_benchmarks.py fails when the
report is stale)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import REPO, RESULTS
from bench.train_report import train_section

REPORT = REPO / "docs" / "benchmarks.md"
def _load(name: str, results: Path) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def export_section(report: dict) -> list[str]:
    rows = ["## Export: the Loop graph, torch eager and ONNX's fused operators "
            "(`make bench-export`)", "",
            "2-layer models with V = 10,000 and random weights (`bench/export.py`); median "
            "milliseconds. \"of MatMul rate\" is the scoring FLOP rate (2 x (input projections "
            "+ recurrent products + output projection) per token) over ONNX Runtime's own "
            "MatMul rate for the [8192,H] x [H,10000] shape, measured in the same run.", "",
            "| cell | H | variant | step B=1 ms | step B=32 ms | score 32x256 ms | tokens/s | "
            "of MatMul rate |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for name in ("loop", "fused_op", "torch_eager"):
            v = r[name]
            rows.append(f"| {r['cell']} | {r['hidden']} | {name} | {v['step_b1_ms']} | "
                        f"{v['step_b32_ms']} | {v['score_ms']} | {v['score_tokens_per_s']} | "
                        f"{100 * v['score_fraction_of_matmul_rate']:.0f}% |")
    rows += ["", "| cell | H | Loop vs fused op, scoring | Loop vs torch eager, B=1 step | "
             "ONNX Runtime MatMul [8192,H]x[H,10000] | B=1 step weights, streamed once | "
             "Loop B=1 / that | torch B=1 / that |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        rows.append(f"| {r['cell']} | {r['hidden']} | {r['loop_vs_fused_op_scoring']:.2f}x | "
                    f"{r['loop_vs_torch_step_b1']:.2f}x | {r['matmul_gflops']:.0f} GFLOP/s | "
                    f"{r['step_b1_weight_mb']} MB in {r['step_b1_streaming_bound_ms']} ms | "
                    f"{r['loop_step_b1_vs_bound']:.2f}x | {r['torch_step_b1_vs_bound']:.2f}x |")
    rows += ["", f"Medians over {report['rounds']} rounds in which the variants take turns; "
             "targets: Loop >= 1x the fused op on scoring, >= 5x torch eager at H=650, >= 85% "
             "of the MatMul rate. \"Streamed once\": ONNX Runtime's [1,H] x [H,N] MatMul over "
             "as many bytes as a B=1 step's weights, the least time any implementation's B=1 "
             f"step can take here once they exceed the caches. {report['machine']}, "
             f"{report['date']}.", "",
             "Reading it: \"of MatMul rate\" near 100% means scoring runs at the float32 "
             "limit of the cores; below it, the per-step element-wise kernels and the "
             "[T*B, V] LogSoftmax (which the MatMul reference does not do) take the rest. A "
             "B = 1 step reads every weight once, so no implementation's step can beat the "
             "\"streamed once\" bound, and the ratio of torch eager's step to that bound caps "
             "how much faster than torch eager any step can be."]
    return rows


def serve_section(report: dict, cuda: dict | None) -> list[str]:
    s, p = report["server"], report["in_process"]
    met = "met" if report["append_target_met"] else "not met"
    rows = [
        "## Serving (`make bench-serve`)", "",
        "A 2-layer, 650-unit LSTM over 10,000 words (random weights) exported through the "
        "normal path; `recur serve` as its own process (prefix cache off: the scoring rounds "
        "repeat their sentences, which it would answer from memory) against the runtime "
        "called in process, client and server on the same machine (`bench/serve.py`). Each "
        "comparison "
        "alternates its two sides in rounds; ratios are medians over the rounds.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| no-op unary RPC (health Check), p50 | {s['noop_rpc_ms_p50']:.3f} ms | |",
        f"| in-process B=1 step | {p['step_b1_ms_p50']:.3f} ms | |",
        f"| Append of one token, p50 / p99 (history 10) | {s['append_ms_p50_history_10']:.3f} / "
        f"{s['append_ms_p99_history_10']:.3f} ms | |",
        f"| ... Append p50 - (no-op RPC p50 + in-process step p50), median of "
        f"{report['rounds']} rounds | {report['append_overhead_ms']:.3f} ms | <= 0.2 ms ({met}) |",
        f"| ... no-op RPC right after an in-process step (cold caches), p50 | "
        f"{report['noop_rpc_after_step_ms_p50']:.3f} ms | |",
        f"| ... Append p50 - p50 of (in-process step, then no-op RPC) | "
        f"{report['append_overhead_vs_step_then_noop_ms']:.3f} ms | |",
        f"| Append p50 after 10,000 tokens of history / after 10 | "
        f"{report['append_history_ratio']:.3f} | <= 1.1 |",
        f"| 64 completion streams, tokens/s | {s['streams_64_tokens_per_s']:,.0f} | |",
        f"| ... / in-process B=64 decoding with sampling ({p['decode_b64_tokens_per_s']:,.0f} "
        f"tokens/s) | {100 * report['streams_vs_in_process']:.0f}% | >= 70% |",
        *([f"| 64 packed streams (stream_interval_ms = {report['packed_interval_ms']}), "
           f"tokens/s | {s['streams_64_packed_tokens_per_s']:,.0f} "
           f"({100 * report['streams_packed_vs_in_process']:.0f}% of in-process) | >= 75% |"]
          if "streams_64_packed_tokens_per_s" in s else []),
        f"| ... / the streams one at a time ({s['streams_one_at_a_time_tokens_per_s']:,.0f} "
        f"tokens/s) | {report['streams_vs_one_at_a_time']:.1f}x | >= 4x |",
        f"| Score tokens/s / in-process scoring of the same batches "
        f"({p['score_tokens_per_s']:,.0f}) | {100 * report['score_vs_in_process']:.0f}% | "
        ">= 80% |",
        "", f"{report['machine']}, {report['date']}.", "",
        "Reading it: a B = 1 step reads the LSTM's 53 MB of weights; where they do not fit "
        "in the last-level cache, the RPC that follows it runs on flushed caches, which the "
        "\"cold caches\" row measures (a no-op RPC issued right after an in-process step). "
        "Against that (a step, then a no-op RPC) an Append's own cost is the \"step, then "
        "no-op\" row. The 64 streams share the machine's cores between the ONNX Runtime "
        "call, gRPC's per-message work on the server, and the benchmark's client."]
    if (steps := report.get("incremental")) is not None:
        rows += incremental_rows(steps)
    if cuda is not None:
        cs, cp = cuda["server"], cuda["in_process"]
        rows += ["", "On a GPU (`python -m bench.serve --device cuda`, bench/results/"
                 f"serve-cuda.json; {cuda['machine']}, {cuda['date']}): in-process B = 64 "
                 f"decoding {cp['decode_b64_tokens_per_s']:,.0f} tokens/s, the server's 64 "
                 f"streams {cs['streams_64_tokens_per_s']:,.0f} tokens/s "
                 f"({100 * cuda['streams_vs_in_process']:.0f}%, "
                 f"{cuda['streams_vs_one_at_a_time']:.1f}x the streams one at a time); Score "
                 f"{cs['score_tokens_per_s']:,.0f} tokens/s "
                 f"({100 * cuda['score_vs_in_process']:.0f}% of in-process); Append after "
                 f"10,000 tokens / after 10: {cuda['append_history_ratio']:.2f}. With the model "
                 "on the GPU, the server's per-message Python and gRPC work is what limits a "
                 "replica; more replicas give more throughput."]
    return rows


def incremental_rows(r: dict) -> list[str]:
    """bench/steps.py: many sessions stepping one token per request."""
    def met(key: str) -> str:
        return next(("met" if ok else "not met") for name, ok in r["targets"].items()
                    if name.startswith(key))

    batch, cpu = r["mean_batch_rows"], r.get("server_cpu_ms_per_request", {})
    loop = r.get("server_loop_cpu_ms_per_request", {})

    def server_cpu(name: str) -> str:
        return (f"; server CPU {cpu[name]:.2f} ms a request, {loop[name]:.2f} of it the "
                "event loop's" if name in cpu else "")

    return [
        "", "### Many sessions, one token a request (`bench/steps.py`)", "",
        f"A 2-layer, 256-unit LSTM over 10,000 words (random weights): {r['sessions']} "
        f"sessions (or V2 sequences, or scoring clients), each a closed loop of "
        f"{r['steps_per_session']} requests, grpc.aio clients in the benchmark's process on "
        "the same cores as the server, against the same work batched in process; "
        f"{r['rounds']} rounds, medians. Rows per call are the server's own statistics.", "",
        "| workload | tokens/s | / in process | rows per call | target |", "|---|---|---|---|---|",
        f"| in process, B = 64 one-token steps | "
        f"{r['in_process_b64_steps_tokens_per_s']:,.0f} | | 64 | |",
        f"| 64 sessions, recur.v1 Append{server_cpu('appends')} | "
        f"{r['appends_64_tokens_per_s']:,.0f} | {100 * r['appends_64_vs_in_process']:.1f}% | "
        f"{batch['appends']:.1f} | >= 25% ({met('appends')}) |",
        f"| 64 V2 sequences, ModelInfer{server_cpu('sequences')} | "
        f"{r['v2_sequences_64_tokens_per_s']:,.0f} | "
        f"{100 * r['v2_sequences_64_vs_in_process']:.1f}% | {batch['sequences']:.1f} | "
        f">= 20% ({met('v2_sequences')}) |",
        f"| 64 clients scoring 35-token sequences (each new) | "
        f"{r['scores_64_clients_tokens_per_s']:,.0f} | "
        f"{100 * r['scores_64_clients_vs_in_process']:.0f}% of "
        f"{r['in_process_score_b64_tokens_per_s']:,.0f} | {batch['scores']:.1f} | "
        f">= 70% ({met('scores')}) |",
        "",
        f"One session's Append p50 {r['append_ms_p50']:.3f} ms against a no-op RPC "
        f"{r['noop_rpc_ms_p50']:.3f} ms plus an in-process step {r['step_b1_ms_p50']:.3f} ms: "
        f"{r['append_overhead_ms']:.3f} ms over (target <= 0.5 ms, "
        f"{met('append_overhead')})."]


def _rows(mc: dict, side: str) -> str:
    rows = mc[side].get("rows_per_call")
    return "?" if not rows else f"{statistics.median(rows):.1f}"


def _batched_rows(mc: dict | None) -> list[str]:
    """Multiple choice with many questions to a request, if the run had it."""
    if mc is None:
        return []
    low, high = min(mc["speedup_per_round"]), max(mc["speedup_per_round"])
    met = "met" if mc["target_met"] else "not met"
    return [f"| the same, {mc['questions_per_request']} questions to a request "
            f"({mc['in_flight']} in flight): contexts/s | {mc['off_contexts_per_s']:,.1f} | "
            f"{mc['on_contexts_per_s']:,.1f} | {mc['speedup']:.2f}x (rounds {low:.2f}-"
            f"{high:.2f}) | >= {mc['target']:g}x ({met}) |",
            f"| ... tokens run per second | {mc['off_tokens_run_per_s']:,.0f} | "
            f"{mc['on_tokens_run_per_s']:,.0f} | "
            f"{mc['off_tokens_run_per_s'] / mc['on_tokens_run_per_s']:.2f}x | |"]


def cache_section(report: dict) -> list[str]:
    mc, sp, mem, mix = (report["multiple_choice"], report["shared_prompt"], report["memory"],
                        report["mixed"])
    met = "met" if mc["target_met"] else "not met"
    per_context = [statistics.median(mc[side]["tokens_run"]) / mc["contexts_per_round"]
                   for side in ("off", "on")]
    low, high = min(mc["speedup_per_round"]), max(mc["speedup_per_round"])
    return [
        "## Prefix cache (`make bench-cache`)", "",
        "bench/serve.py's LSTM (2 x 650, V = 10,000, random weights) in two `recur serve` "
        f"processes, one with the default prefix cache ({mix['budget_bytes'] / 2**20:.0f} "
        "MiB), one with "
        "`--prefix-cache-mib 0`, loaded one at a time in alternating rounds, each round on "
        "fresh random token ids so the cache starts cold for its contexts and prompts "
        "(`bench/cache.py`). Tokens run are the servers' `recur_executed_tokens_total`; "
        "figures are medians over the rounds, ratios medians of the per-round ratios.", "",
        "| measure | cache off | cache on | off / on | target |", "|---|---|---|---|---|",
        f"| multiple choice: contexts/s ({mc['contexts_per_round']} contexts of "
        f"{mc['context_tokens'][0]}-{mc['context_tokens'][1]} tokens per round, "
        f"{mc['choices']} continuations of {mc['continuation_tokens'][0]}-"
        f"{mc['continuation_tokens'][1]}, one LogLikelihood request each, "
        f"{mc['in_flight']} in flight) | {mc['off_contexts_per_s']:,.1f} | "
        f"{mc['on_contexts_per_s']:,.1f} | {mc['speedup']:.2f}x (rounds {low:.2f}-"
        f"{high:.2f}) | >= {mc['target']:g}x ({met}) |",
        f"| ... tokens run per context | {per_context[0]:,.0f} | {per_context[1]:,.0f} | "
        f"{mc['tokens_run_ratio']:.2f}x | |",
        f"| ... tokens run per second | {mc['off_tokens_run_per_s']:,.0f} | "
        f"{mc['on_tokens_run_per_s']:,.0f} | "
        f"{mc['off_tokens_run_per_s'] / mc['on_tokens_run_per_s']:.2f}x | |",
        *_batched_rows(report.get("multiple_choice_batched")),
        f"| {sp['completions']} concurrent completions of one {sp['prompt_tokens']}-token "
        f"prompt ({sp['max_tokens']} tokens each): first token p50 | "
        f"{sp['off_first_token_ms_p50']:,.0f} ms | {sp['on_first_token_ms_p50']:,.0f} ms | "
        f"{sp['first_token_p50_speedup']:.1f}x | |",
        f"| ... first token p90 | {sp['off_first_token_ms_p90']:,.0f} ms | "
        f"{sp['on_first_token_ms_p90']:,.0f} ms | {sp['first_token_p90_speedup']:.1f}x | |",
        f"| ... all {sp['completions']} done | {sp['off_wall_ms']:,.0f} ms | "
        f"{sp['on_wall_ms']:,.0f} ms | {sp['wall_speedup']:.1f}x | |",
        f"| ... tokens run (prompts and decoding) | {sp['off_tokens_run']:,.0f} | "
        f"{sp['on_tokens_run']:,.0f} | {sp['tokens_run_ratio']:.1f}x | |",
        "", f"{mc['rounds']} rounds ({mc['contexts_per_side']:,} contexts per side in all); "
        f"{report['machine']}, {report['date']}.", "",
        "Reading it: without the cache each of a context's continuations reads the context "
        "again from the start; with it the context runs once and each continuation alone, "
        "so the tokens run fall by the ratio in the second row: at these lengths, "
        "4 x (100 + 10 - 1) / (100 - 1 + 4 x 10), about 3.1x, the most the cache can save. "
        "The speedup is that ratio over the ratio of the two sides' tokens run per second. "
        "With one question to a request the cache-on side's contexts come one a request, "
        "as requests finish, so its calls are narrower (rows per ONNX Runtime call: "
        f"{_rows(mc, 'off')} off, {_rows(mc, 'on')} on; a step streams the weights "
        "whatever its batch, so narrow calls run fewer tokens per second); with many "
        "questions to a request both sides batch alike. Concurrent completions of one "
        "prompt read it once: the first request claims it, the others wait for its entry "
        "and run one token each.", "",
        f"Memory, measured in process with tracemalloc against the cache's own accounting "
        f"({mem['with_states']['paths']:,} paths of 100 random tokens): an entry (a "
        f"{mem['state_shape'][0]} x {mem['state_shape'][1]} float32 state, "
        f"{mem['state_bytes']:,} bytes, with its node and path) "
        f"{mem['bytes_per_entry_measured']:,.0f} bytes (accounted "
        f"{mem['bytes_per_entry_accounted']:,.0f}); a cached token without a state "
        f"{mem['bytes_per_token_measured']:.1f} bytes (accounted "
        f"{mem['bytes_per_token_accounted']:.1f}): a node's own overhead "
        f"{mem['node_bytes_measured']:.0f} bytes against {mem['node_bytes_accounted']} "
        f"accounted; measured / accounted {mem['measured_vs_accounted_with_states']:.3f} "
        f"with states, {mem['measured_vs_accounted_without_states']:.3f} without.", "",
        f"A mixed workload on the cache-on server ({mix['requests']:,} requests, "
        f"{mix['in_flight']} in flight, interleaved at random: 40% completions of one of 4 "
        "shared 60-token system prompts plus a fresh 10-30-token user turn, 30% multiple "
        "choice as above, 20% Score of fresh 20-40-token sentences, 10% sessions created "
        "with a system prompt, then one Append): hit rate "
        f"{100 * mix['hit_rate']:.1f}% of the {mix['lookup_tokens']:,} tokens its reads "
        f"would run without the cache ({mix['lookups_hit']:,} reads hit, "
        f"{mix['lookups_miss']:,} missed); {mix['entries_added']:,} entries and "
        f"{mix['cached_bytes_added'] / 2**20:.1f} MiB added, "
        f"{mix['cached_bytes_end'] / 2**20:.1f} MiB of {mix['budget_bytes'] / 2**20:.0f} MiB "
        f"held at the end with the earlier rounds' entries, {mix['evictions']:,} "
        "evictions."]


def quant_section(report: dict) -> list[str]:
    f, q, source = report["float32"], report["int8"], report["source"]
    low, high = min(report["score_speedup_per_round"]), max(report["score_speedup_per_round"])
    model = (f"a {source['layers']} x {source['hidden']} {source['cell'].upper()} over "
             f"{source['vocab']:,} words")
    model += (" with random weights (`--random-model`: speed only)"
              if report["mode"] == "random-model" else f", trained (`{source['model']}`)")
    rows = ["## int8 quantization (`make bench-quant`)", "",
            f"`recur export --quantize int8` against the float32 export of the same model, "
            f"{model}, both through the serving runtime (`bench/quant.py`); the two take turns "
            "in rounds. Scoring reads the test split (random ids for a random model) in "
            f"{report['rows']} columns, {report['window']} steps a call with the state "
            "carried; a step is one token (B = 1) from a carried state, as decoding runs.", "",
            "| measure | float32 | int8 | int8 vs float32 |", "|---|---|---|---|",
            f"| scoring tokens/s | {f['score_tokens_per_s']:,.0f} | "
            f"{q['score_tokens_per_s']:,.0f} | {report['score_speedup']:.2f}x the speed "
            f"(rounds {low:.2f}-{high:.2f}) |",
            f"| one-token step, ms | {f['step_b1_ms']:.3f} | {q['step_b1_ms']:.3f} | "
            f"{report['step_b1_speedup']:.2f}x the speed |",
            f"| model.onnx, MB | {f['onnx_mb']:.1f} | {q['onnx_mb']:.1f} | "
            f"{q['onnx_mb'] / f['onnx_mb']:.2f}x the size |"]
    test, export = report.get("test"), report["export"]
    if test is not None:
        rows.append(f"| test perplexity ({test['tokens']:,} tokens) | {test['ppl_float32']:.2f} "
                    f"| {test['ppl_int8']:.2f} | {100 * test['relative_ppl_cost']:+.2f}% |")
        rows.append(f"| validation perplexity at export ({export['tokens']:,} tokens) | "
                    f"{export['validation_ppl_float32']:.2f} | "
                    f"{export['validation_ppl_int8']:.2f} | "
                    f"{100 * export['relative_ppl_cost']:+.2f}% |")
    nodes = export["nodes"]
    rows += ["", f"Medians over {report['rounds']} rounds; the speed ratio is the median of "
             f"the per-round ratios. The int8 graph has {nodes['int8_products']} int8 products "
             f"({nodes['in_recurrence_bodies']} in the recurrence's Loop bodies, "
             f"{nodes['in_output_head']} in the output head) and no float32 one; its log-probs "
             f"are within {export['max_logprob_diff']:.1e} of float32's on the export's "
             f"verification batches. Scheme: {report['scheme']}. {report['machine']}, "
             f"{report['date']}."]
    return rows


SIDE_NAMES = {"full": "full softmax, float32", "full_int8": "full softmax, int8",
              "adaptive": "adaptive softmax, float32", "adaptive_int8": "adaptive softmax, int8"}


def softmax_section(report: dict) -> list[str]:
    rows = ["## Fewer FLOPs per token (`make bench-softmax`)", "",
            "Pairs of trained language models that differ in their output layer, the full "
            "softmax and the adaptive softmax, each exported in float32 and in int8 (`recur "
            "export --quantize int8`), all four through the serving runtime "
            "(`bench/softmax.py`), taking turns in rounds. Scoring reads the test split in "
            f"{report['rows']} columns, {report['window']} steps a call with the state "
            "carried; a step is one token (B = 1) from a carried state, as decoding runs."]
    for pair in report["pairs"]:
        rows += [""] + _softmax_pair(pair)
    rows += ["", f"Medians over {report['rounds']} rounds; each ratio is the median of the "
             f"per-round ratios to the full softmax in float32. {report['machine']}, "
             f"{report['date']}."]
    return rows


def _softmax_pair(pair: dict) -> list[str]:
    models, sides, test = pair["models"], pair["sides"], pair["test"]

    def described(kind: str) -> str:
        m = models[kind]
        layer = m["output_layer"]
        shown = (f"cutoffs {layer['cutoffs']}, div_value {layer['div_value']:g}"
                 if layer["type"] == "adaptive" else "tied" if m["tied"] else "untied")
        return f"`{m['run']}` ({shown})"

    full = models["full"]
    rows = [f"**{full['layers']} x {full['hidden']} LSTM over {full['vocab']:,} words**: "
            f"{described('full')} and {described('adaptive')}"
            + (f"; test perplexity on {test['tokens']:,} tokens of `{test['split']}`, "
               f"{test['columns']} columns with the state carried." if test else "."), "",
            "| model | scoring tokens/s | vs full float32 (rounds) | one-token step, ms | "
            "model.onnx, MB | test ppl | vs full float32 |", "|---|---|---|---|---|---|---|"]
    for name, side in sides.items():
        per_round = side["score_speedup_per_round"]
        ppl = cost = "-"
        if test is not None:
            ppl = f"{test['perplexity'][name]:.2f}"
            cost = f"{100 * test['relative_ppl_cost'][name]:+.2f}%"
        rows.append(f"| {SIDE_NAMES.get(name, name)} | {side['score_tokens_per_s']:,.0f} | "
                    f"{side['score_speedup']:.2f}x ({min(per_round):.2f}-{max(per_round):.2f}) "
                    f"| {side['step_b1_ms']:.3f} | {side['onnx_mb']:.1f} | {ppl} | {cost} |")
    return rows


def gpu_section(report: dict) -> list[str]:
    rows = ["## The Loop graph on CUDA (`make bench-gpu`)", "",
            "The exported graph through the serving runtime on ONNX Runtime's CUDA provider "
            "(states kept on the GPU by I/O binding) against torch eager on CUDA with cuDNN, "
            "same weights, float32, TF32 off in both (`bench/gpu.py`).", "",
            "| cell | H | variant | step B=1 ms | step B=32 ms | score 32x256 ms | tokens/s |",
            "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for name in ("loop_cuda", "torch_cuda"):
            v = r[name]
            rows.append(f"| {r['cell']} | {r['hidden']} | {name} | {v['step_b1_ms']} | "
                        f"{v['step_b32_ms']} | {v['score_ms']} | {v['score_tokens_per_s']} |")
    rows += ["", "| cell | H | Loop vs torch: step B=1 | step B=32 | scoring | max abs diff |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        rows.append(f"| {r['cell']} | {r['hidden']} | {r['loop_vs_torch_step_b1']:.2f}x | "
                    f"{r['loop_vs_torch_step_b32']:.2f}x | {r['loop_vs_torch_score']:.2f}x | "
                    f"{r['max_abs_diff_vs_torch']:.1e} |")
    loop = report["loop_on_cuda"]
    rows += ["", f"Medians over {report['rounds']} rounds in which the two take turns "
             f"(above 1x: the Loop graph is faster). ONNX Runtime's Loop on CUDA, measured in "
             f"the same run: {loop['one_node_body_us']} us per iteration with one element-wise "
             f"node in the body, plus {loop['per_node_us']} us per further node (B = 32, "
             f"H = 650). {report['machine']}, {report['date']}.", "",
             "Reading it: a single step is faster through the Loop graph, since torch eager "
             "launches more kernels per step from Python; scoring a whole batch is slower, "
             "since cuDNN runs each layer's sequence in a few kernels while ONNX Runtime drives "
             "the Loop from the host, one iteration and its kernel launches at a time."]
    return rows


def soak_section(report: dict) -> list[str]:
    latency = report["latency_ms"]
    shown = "; ".join(f"{kind} {v['p50']:,.0f} / {v['p99']:,.0f} ms"
                      for kind, v in latency.items() if v["p50"] is not None
                      and v["p99"] is not None)
    rss = report["rss_bytes"]
    return ["## Soak (`make soak`)", "",
            f"{report['minutes']:g} minutes of mixed traffic against `recur serve` on the demo "
            "models (`bench/soak.py`), client and server on the same machine: sessions (create "
            "with a prefix, three appends, close), 16-token completions, Score of 8 sentences, "
            "Tag and Classify of 4 texts, in equal shares, at "
            f"{100 * report['load']:.0f}% of the maximum first measured closed-loop "
            f"({report['max_operations_per_s']:,} operations/s with 32 callers), open-loop: "
            f"{report['operations_done']:,} operations.", "",
            "| errors | resident memory after warm-up → end | latency from due time, p50 / p99 |",
            "|---|---|---|",
            f"| {report['errors']} | {rss['after_warmup'] / 2**20:.1f} MB → "
            f"{rss['end'] / 2**20:.1f} MB ({100 * report['rss_growth']:+.1f}%) | {shown} |", "",
            "Latency counts from when an operation was due, so a server that falls behind shows "
            "it; near saturation the p99 is queueing."]


def fuzz_section(report: dict) -> list[str]:
    checks = report["checks"]
    failed = [name for name, check in checks.items() if not check["passed"]]
    rss, health, replay = report["rss"], report["health"], report["replay"]
    rows = ["## Fuzzing (`make fuzz`)", "",
            f"{sum(report['requests'].values()):,} generated requests, valid and hostile, at "
            f"every RPC of both protocols ({report['requests_per_rpc']:,} each, "
            f"{report['workers']} concurrent workers, seed {report['seed']}) against a real "
            f"`recur serve` (`bench/fuzz.py`), in {report['wall_s']:.0f} s on "
            f"{report['machine']}. Checks after every batch: "
            + ("all passed" if not failed else f"FAILED: {', '.join(failed)}") + ". "
            f"No INTERNAL or UNKNOWN; resident memory at most "
            f"{rss['max_over_baseline_mb']:.1f} MB over its level after the warm-up (bound "
            f"{rss['bound_mb'] - rss['after_warmup_mb']:.0f} MB); health after each batch p99 "
            f"{health['after_batch']['p99_ms']:.1f} ms, at most "
            f"{health['after_batch']['max_ms']:.1f} ms (limit "
            f"{health['after_batch']['limit_ms']:.0f} ms); {replay['done']:,} sessions, streams "
            f"and sequences replayed, {replay['failed']} differing.", "",
            "| RPC | requests | status codes |", "|---|---|---|"]
    for rpc, count in sorted(report["requests"].items()):
        codes = sorted(report["statuses"].get(rpc, {}).items(), key=lambda kv: -kv[1])
        rows.append(f"| {rpc} | {count:,} | "
                    + ", ".join(f"{code} {n:,}" for code, n in codes) + " |")
    return rows


def render(results: Path = RESULTS) -> str:
    parts = [["# Benchmarks", "",
              "Generated by `python -m bench.report` from `bench/results/*.json`; each "
              "`make bench-*` target rewrites its JSON and this page. Speed is reported as "
              "ratios measured in one run, the two sides alternating in rounds, as medians: the "
              "machines here are shared and noisy, so absolute times move between runs while "
              "ratios hold. Each section names the machine its run was on; sections may come "
              "from different runs and machines."]]
    for name, section in (("train", train_section), ("export", export_section)):
        if (data := _load(name, results)) is not None:
            parts.append(section(data))
    if (serve := _load("serve", results)) is not None:
        parts.append(serve_section(serve, _load("serve-cuda", results)))
    if (cache := _load("cache", results)) is not None:
        parts.append(cache_section(cache))
    for name, section in (("quant", quant_section), ("softmax", softmax_section),
                          ("gpu", gpu_section),
                          ("soak", soak_section), ("fuzz", fuzz_section)):
        if (data := _load(name, results)) is not None:
            parts.append(section(data))
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def save_results(name: str, report: dict) -> Path:
    """Writes bench/results/NAME.json, prints it (what a CI or device log keeps) and
    regenerates the report from all results."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=name == "train") + "\n")
    print(json.dumps(report, indent=2))
    write_report()
    return path


def write_report() -> Path:
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(render())
    return REPORT


if __name__ == "__main__":
    print(write_report())
