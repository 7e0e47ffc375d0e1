"""The layout is the architecture: each layer imports only what is below it.

    serving/model/    numpy, onnxruntime and tokenizers only; the only part of serving/
                      training imports
    serving/engine/   the model contract, no grpc, protobuf or generated code
    serving/api/      adapters over the engine; none imports another (rpc/ is their shared
                      gRPC plumbing and http/ their shared HTTP plumbing, not adapters)

and no module of the project imports, directly or through others, one that imports it.
Imports are read from the source (every import statement, in functions too), then checked
by importing the layers with the forbidden packages made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("recur", "serving", "training", "bench", "tools")
ADAPTERS = ("recur_v1", "inference_v2", "health", "reflection", "openai")
PROTOCOL = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.protobuf",
            "google.rpc", "serving.proto_gen", "serving.api", "serving.server",
            "serving.client", "serving.cli", "serving.config", "fastapi", "starlette",
            "uvicorn", "h11")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "proto_gen" not in path.parts:
                modules[module_name(path)] = path
    return modules


MODULES = project_modules()


def imports_of(path: Path) -> set[str]:
    """Every module an import statement of the file names (`from a.b import c` names
    a.b.c when that is a module, else a.b)."""
    names = set()
    package = module_name(path).rpartition(".")[0] if path.name != "__init__.py" else \
        module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate in MODULES else base)
    return names


GRAPH = {name: {i for i in imports_of(path)} for name, path in MODULES.items()}


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_model_contract_needs_only_numpy_onnxruntime_and_tokenizers():
    stdlib = set(sys.stdlib_module_names)
    for module, imported in GRAPH.items():
        if under(module, "serving.model"):
            for name in imported:
                top = name.split(".")[0]
                assert top in stdlib or top in ("numpy", "onnxruntime", "tokenizers") or under(
                    name, "serving.model"), f"{module} imports {name}"


def test_the_engine_speaks_no_protocol():
    for module in GRAPH:
        if under(module, "serving.engine"):
            for name in GRAPH[module] | reachable(module):
                assert not any(under(name, p) for p in PROTOCOL), f"{module} imports {name}"
                if under(name, "serving"):
                    assert under(name, "serving.engine") or under(name, "serving.model"), (
                        f"{module} imports {name}")


def reachable(module: str) -> set[str]:
    """The project's modules `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for name in GRAPH.get(todo.pop(), ()):
            if name in MODULES and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_no_adapter_imports_another():
    for module in GRAPH:
        for adapter in ADAPTERS:
            if under(module, f"serving.api.{adapter}"):
                for name in reachable(module):
                    others = [a for a in ADAPTERS if a != adapter]
                    assert not any(under(name, f"serving.api.{o}") for o in others), (
                        f"{module} reaches {name}")
                    assert not under(name, "serving.server"), f"{module} reaches {name}"


def test_adapters_use_the_engine_not_its_parts():
    """Through Engine and its model handles: an adapter that drove a scheduler or a
    runtime itself would skip admission, batching and the versions' accounting."""
    internals = {"scheduler", "runtime", "repository", "sessions", "token_keys"}
    for module, path in MODULES.items():
        if under(module, "serving.api"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute):
                    assert node.attr not in internals, (
                        f"{path.name}:{node.lineno} uses .{node.attr}")


def test_training_imports_only_the_model_contract_from_serving():
    for module, imported in GRAPH.items():
        if under(module, "training"):
            for name in imported:
                if under(name, "serving"):
                    assert under(name, "serving.model"), f"{module} imports {name}"


def test_no_import_cycles():
    internal = {m: {i for i in deps if i in MODULES and i != m} for m, deps in GRAPH.items()}
    visiting, done, cycles = [], set(), []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(visiting[visiting.index(module):] + [module])
            return
        visiting.append(module)
        for dependency in sorted(internal[module]):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in sorted(internal):
        visit(module)
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_the_layers_import_with_what_they_must_not_use_removed():
    blocked = {"serving.engine.engine": ["grpc", "google.protobuf", "torch", "training"],
               "serving.model.runtime": ["grpc", "google.protobuf", "torch", "training",
                                         "prometheus_client"],
               "training.export": ["grpc", "serving.engine", "serving.api"]}
    for module, names in blocked.items():
        code = ("import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)
                + f"import {module}\nprint('ok')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert done.stdout.strip() == "ok", f"{module}: {done.stderr[-2000:]}"
