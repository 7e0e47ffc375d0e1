"""The model repository: `DIR/NAME/VERSION/` artifacts, each loaded into a runtime with its
own batching scheduler. A request names a model and optionally a version; without one it
gets the numerically highest version.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.artifact import load_artifact
from serving.batching import Batcher, BatchLimits
from serving.errors import invalid, not_found
from serving.metrics import Metrics
from serving.runtime import ModelRuntime

log = logging.getLogger(__name__)
TASK_NAMES = {"lm": "a language model", "tag": "a tagger", "classify": "a classifier"}


@dataclass
class LoadedModel:
    name: str
    version: int
    runtime: ModelRuntime
    batcher: Batcher
    latest: bool = False
    start: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def task(self) -> str:
        return self.runtime.task

    @property
    def sessions_allowed(self) -> str | None:
        """None if sessions work on this model, else why not."""
        meta = self.runtime.artifact.metadata
        if not self.runtime.incremental:
            return (f"model {self.label} is bidirectional: it needs the whole text, so it "
                    "cannot read text piece by piece; use Tag or Classify")
        if self.task == "classify" and meta.get("pooling", "final") != "final":
            return (f"model {self.label} pools with '{meta['pooling']}', which needs the whole "
                    "text; sessions need a classifier with final-state pooling")
        return None

    def initial_state(self) -> np.ndarray:
        return self.runtime.initial_state(1)[:, 0]

    async def start_point(self) -> tuple[np.ndarray, np.ndarray]:
        """(state, next-token log-probs) after reading `<eos>`: where every sentence starts."""
        if self.start is None:
            eos = np.array([self.runtime.vocab.eos_id], np.int64)
            result = await self.batcher.run(eos, self.initial_state(), eos)
            self.start = (result.state, result.next_logprobs)
        return self.start


class ModelRepository:
    """Loads every `NAME/VERSION/` at start (a broken artifact stops the server with its
    reason); `refresh` then picks up versions added while serving, so a rollout can add a
    version next to the ones in use without a restart."""

    def __init__(self, root: str | Path, device: str, threads: int, allow_cpu_fallback: bool,
                 limits: BatchLimits, metrics: Metrics, spin_threads: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root}: no such directory")
        self.device, self.threads, self.spin_threads = device, threads, spin_threads
        self.allow_cpu_fallback, self.limits, self.metrics = allow_cpu_fallback, limits, metrics
        self.models: dict[str, dict[int, LoadedModel]] = {}
        self._refused: dict[Path, str] = {}  # versions that failed to load while serving
        self.started = False
        for name, version, path in self._scan():
            self._add(self._load(name, version, path))
        if not self.models:
            raise FileNotFoundError(f"model repository {self.root}: no models (expected "
                                    "NAME/VERSION/ artifact directories)")

    def _scan(self) -> list[tuple[str, int, Path]]:
        found = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            versions = sorted((int(v.name), v) for v in model_dir.iterdir()
                              if v.is_dir() and re.fullmatch(r"\d+", v.name))
            if not versions:
                log.warning("%s: no integer version directories; skipped", model_dir)
            found += [(model_dir.name, version, path) for version, path in versions]
        return found

    def _load(self, name: str, version: int, path: Path) -> LoadedModel:
        runtime = ModelRuntime(load_artifact(path), self.device, self.threads,
                               self.allow_cpu_fallback, self.spin_threads)
        label = f"{name}/{version}"
        return LoadedModel(name, version, runtime,
                           Batcher(runtime, label, self.limits, self.metrics))

    def _add(self, model: LoadedModel) -> None:
        meta = model.runtime.artifact.metadata
        self.metrics.add_model(model.label, model.name, model.version, model.task,
                               meta["cell"], model.runtime.device)
        versions = self.models.setdefault(model.name, {})
        versions[model.version] = model
        for loaded in versions.values():
            loaded.latest = loaded.version == max(versions)
        if self.started:
            model.batcher.start()

    async def refresh(self) -> list[str]:
        """Loads versions that appeared since the last look (ONNX Runtime's session setup
        runs off the event loop, so requests keep flowing); returns their labels. A version
        that fails to load (still being copied, or corrupt) is logged once and retried."""
        added = []
        for name, version, path in self._scan():
            if version in self.models.get(name, {}):
                continue
            try:
                model = await asyncio.to_thread(self._load, name, version, path)
            except Exception as error:  # noqa: BLE001 (any failure: skip it, keep serving)
                if self._refused.get(path) != str(error):
                    log.warning("%s: not loaded: %s", path, error)
                    self._refused[path] = str(error)
                continue
            self._refused.pop(path, None)
            self._add(model)
            added.append(model.label)
            log.info("loaded %s from %s", model.label, path)
        return added

    async def refresh_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()

    def all(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def get(self, name: str, version: int, task: str | None = None,
            field_name: str = "model", name_field: str | None = None,
            version_field: str | None = None) -> LoadedModel:
        """The model a request names; errors name the request's fields (`model.name`, or
        `name_field` / `version_field` where a protocol spells them otherwise)."""
        name_field = name_field or f"{field_name}.name"
        version_field = version_field or f"{field_name}.version"
        if not name:
            raise invalid(name_field, "required")
        if version < 0:
            raise invalid(version_field, f"must be >= 0, got {version}")
        versions = self.models.get(name)
        if versions is None:
            raise not_found(f"{name_field}: no model named {name!r} (serving: "
                            f"{', '.join(sorted(self.models))})", model=name)
        model = versions.get(version) if version else max(versions.items())[1]
        if model is None:
            raise not_found(f"{version_field}: model {name!r} has no version {version} "
                            f"(versions: {', '.join(map(str, sorted(versions)))})", model=name)
        if task is not None and model.task != task:
            raise invalid(name_field, f"model {model.label} is "
                          f"{TASK_NAMES[model.task]}, not {TASK_NAMES[task]}")
        return model

    def start(self) -> None:
        self.started = True
        for model in self.all():
            model.batcher.start()

    async def close(self) -> None:
        for model in self.all():
            await model.batcher.close()

