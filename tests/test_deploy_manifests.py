"""deploy/: the Dockerfiles lint, every kustomization builds and validates against
Kubernetes 1.30, and the manifests agree with the code they run (arguments, config keys,
ports, probes, drain timing, the autoscaler's metric)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from serving import cli as serving_cli
from serving.api.health import LIVENESS
from serving.config import ServerConfig
from training import cli as training_cli

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
KUBERNETES = "1.30.0"


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is not installed: make install adds it (the dev extra)"
    return found


def kustomizations() -> dict[str, str]:
    """Every folder under deploy/k8s with a kustomization: path -> kind."""
    found = {}
    for file in sorted(K8S.rglob("kustomization.yaml")):
        found[str(file.parent.relative_to(K8S))] = yaml.safe_load(file.read_text())["kind"]
    return found


def build(path: Path) -> list[dict]:
    done = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def build_with_component(component: str, tmp_path: Path) -> list[dict]:
    """A component applied to the cpu overlay (components cannot be built alone)."""
    root = tmp_path / component.replace("/", "-")
    root.mkdir()
    relative = os.path.relpath(K8S, root)
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{relative}/overlays/cpu"], "components": [f"{relative}/{component}"]}))
    return build(root)


def validate(documents: list[dict], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    file = tmp_path / f"{name.replace('/', '-')}.yaml"
    file.write_text(yaml.safe_dump_all(documents))
    return subprocess.run([tool("kubernetes-validate"), "-k", KUBERNETES, "--strict",
                           str(file)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("kustomize")
    return {path: (build(K8S / path) if kind == "Kustomization"
                   else build_with_component(path, tmp))
            for path, kind in kustomizations().items()}


def of_kind(documents: list[dict], kind: str) -> list[dict]:
    return [d for d in documents if d["kind"] == kind]


def server_config(documents: list[dict], tmp_path: Path) -> ServerConfig:
    """The ConfigMap's serve.toml, read as `recur serve --config` reads it (unknown keys
    and bad values are refused there)."""
    (config_map,) = [d for d in of_kind(documents, "ConfigMap")
                     if d["metadata"]["name"].startswith("recur-config")]
    file = tmp_path / "serve.toml"
    file.write_text(config_map["data"]["serve.toml"])
    assert "serve" in tomllib.loads(file.read_text())
    return ServerConfig.resolve({}, env={}, file=file)


def test_every_overlay_and_component_is_there():
    assert {"base": "Kustomization", "overlays/cpu": "Kustomization",
            "overlays/gpu": "Kustomization", "batch-score": "Kustomization",
            "training": "Kustomization", "components/service-monitor": "Component",
            "components/istio-session-affinity": "Component",
            "components/models-volume": "Component", "components/portable-sessions": "Component",
            "components/tls-auth": "Component",
            "components/grafana-dashboard": "Component"}.items() <= kustomizations().items()


def test_dockerfiles_pass_hadolint():
    files = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
    assert len(files) == 3
    done = subprocess.run([tool("hadolint"), "--config", str(DEPLOY / "docker" / "hadolint.yaml"),
                           *map(str, files)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfiles_run_the_repository_scripts_as_a_non_root_user():
    for file in sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        text = file.read_text()
        assert re.search(r"^RUN .*deploy/docker/install\.sh", text, re.M | re.S), file.name
        assert 'ENTRYPOINT ["/usr/local/bin/recur-entrypoint"]' in text, file.name
        assert "COPY deploy/docker/entrypoint.sh /usr/local/bin/recur-entrypoint" in text
        assert re.search(r"^USER 10001:10001$", text, re.M), file.name
        extra = re.search(r"install\.sh (\S+) /opt/recur/venv", text)[1]
        assert extra == {"Dockerfile.serve-cpu": "serve-cpu", "Dockerfile.serve-gpu": "serve",
                         "Dockerfile.train": "train"}[file.name]


def test_yaml_passes_yamllint():
    done = subprocess.run([tool("yamllint"), "-c", str(DEPLOY / "yamllint.yaml"), str(DEPLOY)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_build_validates_against_kubernetes(built, tmp_path):
    for name, documents in built.items():
        done = validate(documents, tmp_path, name)
        assert done.returncode == 0, f"{name}:\n{done.stdout}{done.stderr}"
        crds = {"ServiceMonitor", "DestinationRule"}
        for line in done.stdout.splitlines() + done.stderr.splitlines():
            if line.startswith("WARN"):  # only custom resources may go unchecked
                assert any(kind in line for kind in crds), line


def test_the_validator_rejects_a_misspelt_field(built, tmp_path):
    (deployment,) = of_kind(built["overlays/cpu"], "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    done = validate([deployment], tmp_path, "misspelt")
    assert done.returncode != 0 and "readinesProbe" in done.stdout + done.stderr


def containers(documents: list[dict]):
    for d in documents:
        if d["kind"] in ("Deployment", "Job"):
            for container in d["spec"]["template"]["spec"]["containers"]:
                yield d, container


def substitute(args: list[str]) -> list[str]:
    """Kubernetes expands $(VAR) from the container's environment: any index will do."""
    return [re.sub(r"\$\([A-Z_]+\)", "0", a) for a in args]


def parse(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as error:
        raise AssertionError(f"{parser.prog} refuses {shlex.join(argv)}") from error


def test_every_container_command_accepts_its_arguments(built):
    from torch.distributed.run import get_args_parser

    parsers = {"serve": serving_cli.serve_parser, "score": serving_cli.score_parser,
               "train": training_cli.train_parser}
    seen = set()
    for name, documents in built.items():
        for _, container in containers(documents):
            args = substitute(container.get("args", []))
            command = container.get("command")
            if command is None:  # the image's entry point: recur COMMAND ...
                parse(parsers[args[0]](), args[1:])
                seen.add(args[0])
            else:
                assert command == ["/opt/recur/venv/bin/torchrun"], name
                launch = parse(get_args_parser(), args)
                assert launch.module and launch.training_script == "recur.cli"
                assert launch.training_script_args[0] == "train"
                parse(training_cli.train_parser(), launch.training_script_args[1:])
                seen.add("torchrun")
    assert seen == {"serve", "score", "torchrun"}


def test_serving_manifests_agree_with_the_server_config(built, tmp_path):
    for name in ("base", "overlays/cpu", "overlays/gpu"):
        documents = built[name]
        config = server_config(documents, tmp_path)
        (deployment,) = of_kind(documents, "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = parse(serving_cli.serve_parser(), container["args"][1:])
        assert args.config == "/etc/recur/serve.toml"
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == str(Path(args.config).parent)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": config.port, "health": config.health_port,
                         "metrics": config.metrics_port, "http": config.http_port}
        assert config.host == "0.0.0.0"
        # probes: native gRPC on the plaintext health port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == config.health_port, (name, probe)
        assert container["readinessProbe"]["grpc"].get("service", "") == ""
        assert container["livenessProbe"]["grpc"]["service"] == LIVENESS
        # the drain fits in the grace period
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] >= config.grace_s + float(pre_stop[1])
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(config.metrics_port)
        assert config.threads <= float(container["resources"]["limits"]["cpu"])
    gpu = built["overlays/gpu"]
    assert server_config(gpu, tmp_path).device == "cuda"
    (deployment,) = of_kind(gpu, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 1


def test_server_environment_variables_are_settings_and_their_files_are_mounted(built):
    from dataclasses import fields

    settings = {f"RECUR_{f.name.upper()}" for f in fields(ServerConfig)}
    for name, documents in built.items():
        for workload, container in containers(documents):
            if container.get("args", [None])[0] != "serve":
                continue
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            volumes = {v["name"] for v in workload["spec"]["template"]["spec"]["volumes"]}
            assert {m["name"] for m in container["volumeMounts"]} <= volumes, name
            for variable in container.get("env", []):
                assert variable["name"] in settings, (name, variable["name"])
                value = variable.get("value", "")
                if value.startswith("/"):  # a file: it must lie on a mounted volume
                    assert any(value.startswith(m + "/") for m in mounts), (name, value)


def test_every_pod_runs_restricted(built):
    for name, documents in built.items():
        for workload, container in containers(documents):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["runAsUser"] == 10001, name
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), name
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_services_select_the_serving_pods_and_one_is_headless(built):
    documents = built["overlays/cpu"]
    (deployment,) = of_kind(documents, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in of_kind(documents, "Service")}
    assert services["recur-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    (budget,) = of_kind(documents, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_batch_job_shards_match_its_completions(built):
    (job,) = of_kind(built["batch-score"], "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = parse(serving_cli.score_parser(), container["args"][1:])
    index, count = args.shard.split("/")
    assert int(count) == job["spec"]["completions"]
    variable = re.fullmatch(r"\$\(([A-Z_]+)\)", index)[1]
    env = {e["name"]: e for e in container["env"]}
    assert "job-completion-index" in env[variable]["valueFrom"]["fieldRef"]["fieldPath"]


def test_the_training_job_rendezvous_matches_its_pods(built):
    from torch.distributed.run import get_args_parser

    documents = built["training"]
    (job,) = of_kind(documents, "Job")
    spec = job["spec"]["template"]["spec"]
    launch = get_args_parser().parse_args(spec["containers"][0]["args"])
    assert int(launch.nnodes) == job["spec"]["completions"]
    assert launch.rdzv_endpoint.split(":")[0] == (
        f"{job['metadata']['name']}-0.{spec['subdomain']}")
    (service,) = [s for s in of_kind(documents, "Service")
                  if s["metadata"]["name"] == spec["subdomain"]]
    assert service["spec"]["clusterIP"] == "None"


def test_the_autoscaler_metric_is_on_a_running_server(built, model_repository):
    from serving_helpers import RunningServer

    (hpa,) = of_kind(built["overlays/cpu"], "HorizontalPodAutoscaler")
    custom = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert custom, "the HPA scales on a custom per-pod metric"
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    series = {}
    for rule in rules["rules"]["custom"]:
        series[rule["name"]["as"]] = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])[0]
    server = RunningServer(model_repository)
    try:
        server.client.score("demo-lm", ["the dog"])
        page = server.metrics_text()
    finally:
        server.stop()
    for name in custom:
        assert name in series, f"no prometheus-adapter rule serves {name}"
        assert re.search(rf"^{series[name]}\{{", page, re.M), f"{series[name]} not on /metrics"


DASHBOARD = K8S / "components" / "grafana-dashboard" / "recur-dashboard.json"


def dashboard_expressions(dashboard: dict) -> list[str]:
    """The PromQL of every panel target and of every query variable."""
    found = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    found += [v["query"]["query"] for v in dashboard["templating"]["list"]
              if v["type"] == "query"]
    return found


def exported_metric_names() -> set[str]:
    """The sample names a server's metrics page can carry (serving/engine/metrics.py)."""
    from serving.engine.metrics import TRITON_FAMILIES, Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",)}
    names = {family.name + suffix for family in Metrics().registry.collect()
             for suffix in suffixes[family.type]}
    return names | {name for name, *_ in TRITON_FAMILIES}


def test_the_grafana_dashboard_reads_only_metrics_the_server_exports(built):
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    (config_map,) = [d for d in of_kind(built["components/grafana-dashboard"], "ConfigMap")
                     if d["metadata"]["name"] == "recur-grafana-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's label
    assert json.loads(config_map["data"]["recur-dashboard.json"]) == dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and "model" in variables
    exported = exported_metric_names()
    expressions = dashboard_expressions(dashboard)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    for expr in expressions:
        names = re.findall(r"\b(?:recur|nv)_[a-z0-9_]+", expr)
        assert names, expr
        assert set(names) <= exported, f"not on the metrics page: {set(names) - exported}"
    for family in ("recur_requests_total", "recur_request_duration_seconds_bucket",
                   "recur_http_requests_total", "recur_http_request_duration_seconds_bucket",
                   "recur_queue_depth", "recur_queue_wait_seconds_bucket",
                   "recur_batch_size_bucket", "recur_tokens_total",
                   "recur_active_sessions", "recur_session_evictions_total",
                   "recur_time_to_first_token_seconds_bucket"):
        assert any(family in expr for expr in expressions), f"no panel shows {family}"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="no promtool (Debian: apt-get install prometheus)")
def test_the_grafana_dashboard_queries_parse_as_promql(tmp_path):
    """promtool parses each expression as a recording rule would (Grafana's variables
    filled in as Grafana fills them)."""
    import json

    expressions = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    rules = [{"record": f"recur:dashboard_{i}",
              "expr": (e.replace("$__rate_interval", "1m").replace("$model", ".*")
                       .replace("$instance", ".*"))}
             for i, e in enumerate(expressions) if not e.startswith("label_values(")]
    file = tmp_path / "rules.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([shutil.which("promtool"), "check", "rules", str(file)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
