"""A real Prometheus scrapes a running server while traffic runs on every front (recur.v1
and V2 over gRPC, OpenAI and V2 over HTTP), and the PromQL of Triton's standard Grafana
dashboard and of Recur's own reads it.

The queries are those of triton-inference-server/server's deploy/k8s-onprem/dashboard.json
(the standard dashboard) and of the older one shared by deploy/aws, gcp, oci and
fleetcommand. Those that concern inference (`nv_inference_*`) must return data for the
model. Not checked, because Recur does not export them:

- `nv_gpu_power_usage`, `nv_gpu_memory_used_bytes`, `nv_gpu_utilization` (the GPU panels):
  Triton reads them from DCGM; a CPU server has no GPU, and on a GPU the DCGM exporter is
  the tool for them.
- `nv_cpu_memory_used_bytes`, `nv_cpu_utilization` (the host panels): Triton's host
  metrics from /proc, not inference metrics; node-exporter or the kubelet's cAdvisor
  report the same.
- `nv_inference_load_ratio_bucket` and `nv_inference_compute_duration_us` (the older
  dashboard): names Triton itself no longer exports (its metrics documentation lists
  neither; `nv_inference_compute_infer_duration_us` replaced the second).

Each message of a stream (Converse, ScoreStream, ModelStreamInfer) is one request, so the
counts read through Prometheus must equal the requests sent, streamed ones included.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serving_helpers import RunningServer

from serving.api.inference_v2.tensors import encode_bytes
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.recur.v1 import recur_pb2 as pb

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary (Debian: apt-get install prometheus; "
    ".ci/run installs it when it runs as root)")

MODEL = "demo-lm"
DASHBOARD = (Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "components"
             / "grafana-dashboard" / "recur-dashboard.json")
# Recur's dashboard panels that stay empty under this traffic: no request fails, no
# session is evicted
QUIET_PANELS = {"Errors by code", "Evictions by reason"}
# (dashboard, panel, PromQL): every nv_inference_* query of Triton's dashboards, verbatim
TRITON_QUERIES = (
    ("k8s-onprem", "Active Triton Instances", "count(count(nv_inference_count) by (instance))"),
    ("k8s-onprem", "Proportion of Requests by Pod",
     "sum by (pod) (rate(nv_inference_count[1m])) / ignoring(pod) group_left "
     "sum (rate(nv_inference_count[1m]))"),
    ("k8s-onprem", "Cumulative Inference Requests by Pod",
     "sum(nv_inference_request_success) by (pod)"),
    ("k8s-onprem", "Cumulative Inference Requests by Pod",
     "sum(nv_inference_request_failure) by (pod)"),
    ("k8s-onprem", "Compute Time by Model (milliseconds)",
     "sum(rate(nv_inference_compute_infer_duration_us[30s])) by (model) / 1000"),
    ("k8s-onprem", "Average Queue Time by Pod (microseconds)",
     "avg(rate(nv_inference_queue_duration_us[30s])/(1+rate(nv_inference_request_success[30s])))"
     " by (pod)"),
    ("aws", "Cumulative Inference Requests", "nv_inference_request_success"),
    ("aws", "Cumulative Inference Requests", "nv_inference_request_failure"),
    ("aws", "Queue Time (milliseconds)", "rate(nv_inference_queue_duration_us[30s]) / 1000"),
)
# Every family the issue names: each must have a series for the model's version
TRITON_FAMILIES = (
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def running_prometheus(metrics_port: int, folder: Path) -> Iterator[Callable[[str], list]]:
    """Prometheus on 127.0.0.1 scraping the metrics port every second; yields an instant
    query function (PromQL -> the result vector). Stopped, and waited for, on the way out."""
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "recur", "static_configs": [
            {"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={folder / 'tsdb'}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def query(promql: str) -> list:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            answer = get_json(url)
        except urllib.error.HTTPError as error:  # 400 or 422: the expression is refused
            raise AssertionError(f"{promql}: {error.read().decode()}") from None
        assert answer["status"] == "success", (promql, answer)
        return answer["data"]["result"]

    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                if [r["value"][1] for r in query('up{job="recur"}')] == ["1"]:
                    break
            assert time.monotonic() < deadline, "Prometheus did not scrape the server"
            time.sleep(0.25)
        yield query
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def text_tensor(*texts: str) -> dict:
    return {"inputs": [v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES",
                                                             shape=[len(texts), 1])],
            "raw_input_contents": [encode_bytes([t.encode() for t in texts])]}


def sequence_step(sequence: int, text: str, start: bool = False,
                  end: bool = False) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=MODEL, **text_tensor(text))
    request.parameters["sequence_id"].uint64_param = sequence
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


def send_traffic(server: RunningServer) -> tuple[dict[str, int], int]:
    """Requests on every front; returns the requests sent by gRPC method or HTTP route,
    and the sequences they infer (Triton's inference count: a request of B inputs
    counts B)."""
    sent, sequences = {}, 0
    for texts in (["the old dogs", "run"], ["that the cat sees", "the dog"], ["a cat", "run"]):
        assert len(server.client.score(MODEL, texts)) == 2
        sequences += 2
    sent["Score"] = 3
    assert len(server.client.complete_text(MODEL, "the old", max_tokens=5, seed=3)) == 1
    sent["Complete"], sequences = 1, sequences + 1

    def converse():
        yield pb.ConverseRequest(model=pb.ModelRef(name=MODEL), input=pb.Input(text="the"))
        yield pb.ConverseRequest(input=pb.Input(text="old dogs"))
        yield pb.ConverseRequest(input=pb.Input(text="run"))

    assert len(list(server.client.language_model.Converse(converse(), timeout=30))) == 3
    sent["Converse"], sequences = 3, sequences + 3

    groups = [("g0", ["the dog"]), ("g1", ["the old dogs", "run"]), ("g2", ["a cat"]),
              ("g3", ["the cat sees", "the dog runs", "run"])]
    assert [r.id for r in server.client.score_stream(MODEL, groups, timeout=30)] == [
        "g0", "g1", "g2", "g3"]
    sent["ScoreStream"], sequences = len(groups), sequences + 7

    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    for texts in (("the old dogs", "run"), ("a cat", "the dog")):
        stub.ModelInfer(v2.ModelInferRequest(model_name=MODEL, **text_tensor(*texts)),
                        timeout=30)
    sent["ModelInfer"], sequences = 2, sequences + 4

    stream = [sequence_step(7, "the", start=True), sequence_step(7, "old dogs"),
              sequence_step(7, "run", end=True),
              v2.ModelInferRequest(model_name=MODEL, **text_tensor("the cat", "run"))]
    replies = list(stub.ModelStreamInfer(iter(stream), timeout=30))
    assert [r.error_message for r in replies] == [""] * len(stream)
    sent["ModelStreamInfer"], sequences = len(stream), sequences + 5

    for prompt in ("the old", "a cat"):
        answer = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt,
                                                  "max_tokens": 4, "seed": 1})
        assert len(answer["choices"]) == 1
    sent["/v1/completions"], sequences = 2, sequences + 2
    answer = post(server, f"/v2/models/{MODEL}/infer", {"inputs": [
        {"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "data": ["the dog", "run"]}]})
    assert answer["model_name"] == MODEL
    sent["/v2/models/{name}/infer"], sequences = 1, sequences + 2
    return sent, sequences


def post(server: RunningServer, path: str, body: dict) -> dict:
    request = urllib.request.Request(server.http_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def value(vector: list) -> float:
    (series,) = vector
    return float(series["value"][1])


def wait_for(query: Callable[[str], list], promql: str, expected: float) -> float:
    """The query's value once Prometheus has scraped the page that counts every request
    (or the last value read, after 20 s)."""
    deadline, got = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        result = query(promql)
        got = value(result) if result else None
        if got == expected:
            break
        time.sleep(0.5)
    return got


@pytest.fixture(scope="module")
def scraped(model_repository, tmp_path_factory):
    """A server, a Prometheus scraping it, and the traffic sent (by method) once the
    scrapes count all of it: (query, sent, sequences)."""
    server = RunningServer(model_repository, http_port=0)
    try:
        with running_prometheus(server.ports.metrics, tmp_path_factory.mktemp("prom")) as query:
            sent, sequences = send_traffic(server)
            wait_for(query, f'sum(nv_inference_request_success{{model="{MODEL}"}})',
                     sum(sent.values()))
            # and for one more scrape: a series the traffic created then has the two
            # samples rate() needs
            counted = time.time()
            wait_for(query, f'timestamp(up{{job="recur"}}) > bool {counted:.3f}', 1)
            yield query, sent, sequences
    finally:
        server.stop()


def test_triton_counts_equal_the_requests_sent_streamed_ones_included(scraped):
    query, sent, sequences = scraped
    selector = f'{{model="{MODEL}",version="1"}}'
    assert value(query(f"sum(nv_inference_request_success{selector})")) == sum(sent.values())
    assert value(query(f"sum(nv_inference_count{selector})")) == sequences
    for family in TRITON_FAMILIES:
        assert query(f"{family}{selector}"), f"{family} has no series for {MODEL}/1"
    assert value(query(f"sum(nv_inference_request_failure{selector})")) == 0
    assert value(query(f"nv_inference_pending_request_count{selector}")) == 0
    assert value(query(f"sum(nv_inference_exec_count{selector})")) >= 1


def test_recur_counts_by_model_equal_the_requests_sent(scraped):
    """Each request (each message of a stream) is counted and timed under the model it
    addressed, on every message: a Converse names its model only in its first."""
    query, sent, _ = scraped
    over_http = {k: v for k, v in sent.items() if k.startswith("/")}
    for family in ("recur_http_requests_total", "recur_http_request_duration_seconds_count"):
        by_route = {s["metric"]["route"]: float(s["value"][1]) for s in query(
            f'sum by (route) ({family}{{model="{MODEL}"}})')}
        assert by_route == over_http, family
    assert value(query(f'sum(recur_http_requests_total{{model="{MODEL}",status="200"}})')) == (
        sum(over_http.values()))
    over_grpc = {k: v for k, v in sent.items() if not k.startswith("/")}
    for family in ("recur_requests_total", "recur_request_duration_seconds_count"):
        by_method = {s["metric"]["method"]: float(s["value"][1]) for s in query(
            f'sum by (method) ({family}{{model="{MODEL}"}})')}
        assert by_method == over_grpc, family
    assert value(query(f'sum(recur_requests_total{{model="{MODEL}",code="OK"}})')) == sum(
        over_grpc.values())


def test_triton_dashboard_queries_return_data_for_the_model(scraped):
    query, sent, _ = scraped
    results = {promql: query(promql) for _, _, promql in TRITON_QUERIES}
    for board, panel, promql in TRITON_QUERIES:
        assert results[promql], f"{board} dashboard, {panel!r}: no data for {promql}"
        for series in results[promql]:
            assert math.isfinite(float(series["value"][1])), (panel, promql, series)
    active, proportion, success, failure, compute, queue = (
        results[promql] for _, _, promql in TRITON_QUERIES[:6])
    assert value(active) == 1
    assert value(proportion) == pytest.approx(1)
    assert value(success) == sum(sent.values())  # every request went to the one model
    assert value(failure) == 0
    assert {s["metric"].get("model"): float(s["value"][1]) for s in compute}[MODEL] > 0
    assert value(queue) >= 0
    for _, panel, promql in TRITON_QUERIES[6:]:
        assert any(s["metric"].get("model") == MODEL and s["metric"].get("version") == "1"
                   for s in results[promql]), (panel, promql)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of Recur's dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels
            for target in panel.get("targets", [])]


def test_recur_dashboard_queries_return_data_for_the_model(scraped):
    """Grafana's variables as it would fill them with the model chosen: $model is a regex
    of model names, $instance of scrape targets."""
    query, _, _ = scraped
    quiet = set()
    for panel, expr in dashboard_queries():
        promql = (expr.replace("$__rate_interval", "1m").replace("$model", MODEL)
                  .replace("$instance", ".*"))
        assert "$" not in promql, promql
        result = query(promql)  # Prometheus refuses an expression it cannot parse
        if not result:
            quiet.add(panel)
        assert result or panel in QUIET_PANELS, f"{panel!r}: no data for {promql}"
    assert quiet == QUIET_PANELS
